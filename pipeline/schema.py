"""The output contract: Parquet schemas of `samples/` and `errors/`, generated into `schemas/`.

Image columns are Hugging Face `datasets` image structs ({bytes, path}) and the Parquet files carry
`datasets` feature metadata, so `load_dataset("parquet", ...)` decodes them as images.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.generators import DEFAULT_FAMILY

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
TIMESTAMP = pa.timestamp("us", tz="UTC")
ANNOTATOR = pa.struct(
    [
        ("id", pa.string()),
        ("name", pa.string()),
        ("params", pa.string()),
        ("package", pa.string()),
        ("model", pa.string()),
        ("revision", pa.string()),
        ("weights_file", pa.string()),
        ("weights_sha256", pa.string()),
        ("size_policy", pa.string()),
    ]
)

CONTROL_COLUMN = "control_{id}"
CONTROL_DOC = "Control map of the annotator with this id, at the image's size (PNG)."
KEYPOINTS_COLUMN = "keypoints_{id}"
KEYPOINTS_DOC = ("Keypoints of a pose annotator with this id, OpenPose JSON: {people: [{pose_keypoints_2d, "
                 "hand_left_keypoints_2d, hand_right_keypoints_2d, face_keypoints_2d}], canvas_width, "
                 "canvas_height}; pixel coordinates, [x, y, confidence] per point. Only for pose annotators.")

# The core columns of every sample, (name, type, description), in order. A generation job's samples
# also have the variant columns, the generated image and its generator family's columns.
HEAD_COLUMNS: list[tuple[str, pa.DataType, str]] = [
    ("sample_id", pa.string(), "Deterministic id from (job seed, source sha256, variant index)."),
    ("source_uri", pa.string(), ("Where the source image was read from: a file, `<parquet file>#row=<i>[/<path>]` "
                                 "or `<tar shard>#<key>`.")),
    ("source_sha256", pa.string(), "sha256 of the source file's bytes."),
    ("caption", pa.string(), "Caption from the source, or written by the captioner (see `captioner`), if any."),
    ("variant_index", pa.int32(), "Index of this variant among the source's variants."),
    ("seed", pa.int64(), "Seed of this sample's torch.Generator."),
    ("prompt", pa.string(), "Prompt used for generation."),
    ("negative_prompt", pa.string(), "Negative prompt used for generation."),
    ("width", pa.int32(), "Width of image, control maps and generated image."),
    ("height", pa.int32(), "Height of image, control maps and generated image."),
    ("transform", pa.string(), "JSON record of the decode: original size and mode, EXIF orientation, resize."),
    ("image", IMAGE, "The source image after the size policy (PNG)."),
]
VARIANT_COLUMNS = ("variant_index", "seed", "prompt", "negative_prompt")  # generation jobs only
GENERATED_COLUMN = ("generated", IMAGE, "The generated image (PNG).")
ANNOTATORS_COLUMN = ("annotators", pa.list_(ANNOTATOR), "Provenance of every control map: annotator, params (JSON), weights.")
# jobs with a captioner section (pipeline/captioners): how each written caption was made
CAPTIONER_COLUMNS: list[tuple[str, pa.DataType, str]] = [
    ("captioner", pa.string(), ("JSON provenance of a caption the captioner wrote: kind, model, revision (resolved "
                                "commit, or sha256 fingerprint of a local directory), task, max_new_tokens, decoding "
                                "(greedy), transformers version. Null where the caption came from the source. Only "
                                "in runs with a captioner section.")),
]
TAIL_COLUMNS: list[tuple[str, pa.DataType, str]] = [
    ("run_id", pa.string(), "The run that wrote this row."),
    ("code_version", pa.string(), "Version of this pipeline (package version and git commit)."),
    ("created_at", TIMESTAMP, "When the row was written (UTC)."),
]

ERROR_COLUMNS: list[tuple[str, pa.DataType, str]] = [
    ("source_uri", pa.string(), "The input the error belongs to."),
    ("source_sha256", pa.string(), "sha256 of the input's bytes, when they could be read."),
    ("sample_id", pa.string(), "The sample that failed, for errors after variant expansion."),
    ("variant_index", pa.int32(), "The variant that failed, for errors after variant expansion."),
    ("stage", pa.string(), "Stage that rejected the row: decode, annotate:<id>, expand, generate."),
    ("error_type", pa.string(), "Exception type."),
    ("error_message", pa.string(), "Readable reason."),
    ("run_id", pa.string(), "The run that wrote this row."),
    ("created_at", TIMESTAMP, "When the row was written (UTC)."),
]


# output.layout normalized: these columns go to sources/ once per source, keyed by source_sha256
SOURCE_KEY = ("source_sha256", "source_uri", "width", "height", "transform")
SOURCES_DOC = ("sources/*.parquet (output.layout normalized): one row per source with the columns its samples share "
               "(source_sha256, source_uri, width, height, transform, image, control maps, keypoints, annotators, "
               "run_id, code_version, created_at); samples/ then holds the rest and refers to it by source_sha256")


def source_side(name: str, type_: pa.DataType) -> bool:
    """Whether a samples column lives in sources/ in the normalized layout: the source image, control maps
    and keypoints, the same for every variant of a source."""
    return name == "image" or (name.startswith("control_") and type_ == IMAGE) or name.startswith("keypoints_")


def normalized(schema: pa.Schema) -> tuple[pa.Schema, pa.Schema]:
    """A flat samples schema split into (samples/, sources/) for the normalized layout."""
    samples = pa.schema([f for f in schema if not source_side(f.name, f.type)])
    shared = [schema.field(n) for n in SOURCE_KEY]
    moved = [f for f in schema if source_side(f.name, f.type)]
    tail = [schema.field(n) for n in ("annotators", "run_id", "code_version", "created_at")]
    return _with_hf_features(samples), _with_hf_features(pa.schema(shared + moved + tail))


def _with_hf_features(schema: pa.Schema) -> pa.Schema:
    features = {f.name: {"_type": "Image"} for f in schema if f.type == IMAGE}
    return schema.with_metadata({"huggingface": json.dumps({"info": {"features": features}})})


def generator_columns(family: str) -> list[tuple[str, pa.DataType, str]]:
    from pipeline.generators import generator_class

    return generator_class(family).columns


def sample_columns(control_ids: list[str], keypoint_ids: list[str] = (), family: str | None = DEFAULT_FAMILY,
                   scores: list[tuple[str, pa.DataType, str]] = (), captioner: bool = False
                   ) -> list[tuple[str, pa.DataType, str]]:
    """The samples' columns in order; `family` None: an annotate-only job (no variants, no generation);
    `scores`: the quality section's columns (scorers.stage.score_columns), after the generator's;
    `captioner`: the job has a captioner section (its provenance column, after the annotators')."""
    columns = [c for c in HEAD_COLUMNS if family or c[0] not in VARIANT_COLUMNS]
    columns += [(CONTROL_COLUMN.format(id=c), IMAGE, CONTROL_DOC.replace("this id", repr(c))) for c in control_ids]
    columns += [(KEYPOINTS_COLUMN.format(id=c), pa.string(), KEYPOINTS_DOC) for c in keypoint_ids]
    columns += [GENERATED_COLUMN] if family else []
    columns += [ANNOTATORS_COLUMN, *(CAPTIONER_COLUMNS if captioner else [])]
    columns += [*(generator_columns(family) if family else []), *scores, *TAIL_COLUMNS]
    return columns


def samples_schema(control_ids: list[str], keypoint_ids: list[str] = (), family: str | None = DEFAULT_FAMILY,
                   scores: list[tuple[str, pa.DataType, str]] = (), captioner: bool = False) -> pa.Schema:
    return _with_hf_features(pa.schema([pa.field(n, t) for n, t, _ in sample_columns(control_ids, keypoint_ids, family,
                                                                                     scores, captioner)]))


def errors_schema() -> pa.Schema:
    return pa.schema([pa.field(n, t) for n, t, _ in ERROR_COLUMNS])


def describe(columns: list[tuple[str, pa.DataType, str]]) -> list[dict[str, str]]:
    return [{"name": n, "type": str(t), "description": d} for n, t, d in columns]


def schema_documents() -> dict[str, Any]:
    """The machine-readable contracts written to schemas/ (file name -> JSON document)."""
    from pipeline.config import config_json_schema
    from pipeline.generators import families
    from pipeline.train.config import TrainConfig

    samples = describe(HEAD_COLUMNS)
    samples.append({"name": CONTROL_COLUMN, "type": str(IMAGE), "description": CONTROL_DOC + " One column per annotator."})
    samples.append({"name": KEYPOINTS_COLUMN, "type": str(pa.string()), "description": KEYPOINTS_DOC})
    samples += describe([GENERATED_COLUMN, ANNOTATORS_COLUMN, *generator_columns(DEFAULT_FAMILY), *TAIL_COLUMNS])
    return {
        "job_config.schema.json": config_json_schema(),
        "train_config.schema.json": TrainConfig.model_json_schema(),
        "samples.schema.json": {
            "title": "samples/*.parquet", "image_columns": "Hugging Face datasets Image structs",
            "columns": samples,
            "generation_only_columns": [*VARIANT_COLUMNS, GENERATED_COLUMN[0]] + [c[0] for c in generator_columns(DEFAULT_FAMILY)],
            "generator_columns": {family: describe(generator_columns(family)) for family in families()},
            "captioner_columns": describe(CAPTIONER_COLUMNS),
            "normalized_layout": SOURCES_DOC,
            **quality_documents(),
        },
        "errors.schema.json": {"title": "errors/*.parquet", "columns": describe(ERROR_COLUMNS)},
    }


def quality_documents() -> dict[str, Any]:
    """The quality gate's columns (scorers.stage) for samples.schema.json."""
    from pipeline.scorers.stage import generic_score_columns

    return {"quality_columns": describe(generic_score_columns()),
            "rejected": "rejected/*.parquet: samples below the thresholds of a run with quality.action drop, in this "
                        "same schema (passed = false)"}


def write_schema_files(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, doc in schema_documents().items():
        path = directory / name
        path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
        written.append(path)
    return written
