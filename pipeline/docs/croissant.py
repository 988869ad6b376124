"""croissant.json: Croissant 1.0 metadata (JSON-LD) of the samples."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from pipeline.docs.scores import manifest_score_columns
from pipeline.docs.stats import run_family, run_layout
from pipeline.generators import generator_class
from pipeline.schema import source_side, IMAGE, sample_columns

CROISSANT_CONTEXT = {
    "@language": "en", "@vocab": "https://schema.org/", "citeAs": "cr:citeAs", "column": "cr:column",
    "conformsTo": "dct:conformsTo", "cr": "http://mlcommons.org/croissant/", "rai": "http://mlcommons.org/croissant/RAI/",
    "data": {"@id": "cr:data", "@type": "@json"}, "dataType": {"@id": "cr:dataType", "@type": "@vocab"},
    "dct": "http://purl.org/dc/terms/", "examples": {"@id": "cr:examples", "@type": "@json"}, "extract": "cr:extract",
    "field": "cr:field", "fileProperty": "cr:fileProperty", "fileObject": "cr:fileObject", "fileSet": "cr:fileSet",
    "format": "cr:format", "includes": "cr:includes", "isLiveDataset": "cr:isLiveDataset", "jsonPath": "cr:jsonPath",
    "key": "cr:key", "md5": "cr:md5", "parentField": "cr:parentField", "path": "cr:path", "recordSet": "cr:recordSet",
    "references": "cr:references", "regex": "cr:regex", "repeated": "cr:repeated", "replace": "cr:replace",
    "sc": "https://schema.org/", "separator": "cr:separator", "source": "cr:source", "subField": "cr:subField",
    "transform": "cr:transform", "equivalentProperty": "cr:equivalentProperty", "samplingRate": "cr:samplingRate",
}


def croissant_type(t: pa.DataType) -> str | None:
    if t == IMAGE:
        return "sc:ImageObject"
    if pa.types.is_string(t):
        return "sc:Text"
    if pa.types.is_integer(t):
        return "sc:Integer"
    if pa.types.is_boolean(t):
        return "sc:Boolean"
    if pa.types.is_floating(t):
        return "sc:Float"
    if pa.types.is_timestamp(t):
        return "sc:Date"
    return None


def croissant(manifest: dict[str, Any], control_ids: list[str], url: str) -> dict[str, Any]:
    """Croissant 1.0 JSON-LD: the samples Parquet files and one field per column
    (the nested `annotators` column is left out; its content is in the dataset card)."""
    family = run_family(manifest)
    normalized = run_layout(manifest) == "normalized"
    fields, source_fields = [], []
    for name, type_, doc in sample_columns(control_ids, family=family, scores=manifest_score_columns(manifest)):
        repeated = pa.types.is_list(type_)
        data_type = croissant_type(type_.value_type if repeated else type_)
        if data_type is None:
            continue
        moved = normalized and source_side(name, type_)  # in sources/, joined on source_sha256
        record = "sources" if moved else "samples"
        source: dict[str, Any] = {"fileSet": {"@id": f"{record}-parquet"}, "extract": {"column": name}}
        if type_ == IMAGE:
            source["transform"] = {"jsonPath": "bytes"}
        field = {"@type": "cr:Field", "@id": f"{record}/{name}", "name": name, "description": doc,
                 "dataType": data_type, "source": source, **({"repeated": True} if repeated else {})}
        (source_fields if moved else fields).append(field)
    if source_fields:  # the key that joins the two record sets
        key = {"@type": "cr:Field", "@id": "sources/source_sha256", "name": "source_sha256", "dataType": "sc:Text",
               "description": "sha256 of the source file's bytes (samples/source_sha256 refers to it).",
               "source": {"fileSet": {"@id": "sources-parquet"}, "extract": {"column": "source_sha256"}}}
        source_fields.insert(0, key)
        next(f for f in fields if f["name"] == "source_sha256")["references"] = {"@id": "sources/source_sha256"}
    run_id = str(manifest.get("run_id"))
    return {
        "@context": CROISSANT_CONTEXT,
        "@type": "sc:Dataset",
        "conformsTo": "http://mlcommons.org/croissant/1.0",
        "name": f"controlnet-dataset-{run_id}",
        "description": f"Source photos, control maps{' and ' + generator_class(family).label if family else ''} "
                       f"with per-row provenance, written by the ControlNet dataset pipeline (run {run_id}).",
        "license": "https://spdx.org/licenses/NOASSERTION",
        "url": url,
        "citeAs": f"ControlNet dataset pipeline, run {run_id}",
        "datePublished": manifest.get("finished_at"),
        "keywords": ["controlnet", "synthetic", "image"],
        "distribution": [{"@type": "cr:FileSet", "@id": "samples-parquet", "name": "samples-parquet",
                          "description": "The samples Parquet files.", "encodingFormat": "application/x-parquet",
                          "includes": "samples/*.parquet"}]
                        + ([{"@type": "cr:FileSet", "@id": "sources-parquet", "name": "sources-parquet",
                             "description": "The sources Parquet files (normalized layout).",
                             "encodingFormat": "application/x-parquet", "includes": "sources/*.parquet"}]
                           if source_fields else []),
        "recordSet": [{"@type": "cr:RecordSet", "@id": "samples", "name": "samples",
                       "description": "One generated sample per row." if family else
                                      "One source image and its control maps per row (an annotate-only run).",
                       "key": {"@id": "samples/sample_id"},
                       "field": fields}]
                     + ([{"@type": "cr:RecordSet", "@id": "sources", "name": "sources",
                          "description": "One source image with its control maps per row (normalized layout).",
                          "key": {"@id": "sources/source_sha256"}, "field": source_fields}] if source_fields else []),
    }
