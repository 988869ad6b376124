"""Documents of a run, built from its output directory alone (so any output can be re-documented):

- report.html: a self-contained gallery (source, control maps, generated variants as thumbnail
  data: URIs) and the run's stats (counts, errors, per-operator throughput, models);
- README.md: a Hugging Face dataset card with the run's provenance;
- croissant.json: Croissant 1.0 metadata (JSON-LD) of the samples;
- `inspect_text`: what `python -m pipeline inspect OUT` prints.

Only the columns a document needs are read; image bytes only for the sources the gallery shows.
"""

from __future__ import annotations

import base64
import io
import json
import posixpath
import re
from collections import defaultdict
from dataclasses import dataclass
from html import escape
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml
from PIL import Image

from pipeline.generators import DEFAULT_FAMILY, generator_class
from pipeline.io.output import NotARunOutput, RunOutput
from pipeline.schema import IMAGE, sample_columns

MAX_SOURCES = 200  # sources shown in the gallery
THUMB_PX = 256  # longest side of a gallery thumbnail
MAX_ERROR_GROUPS = 100  # error (stage, type, message) groups listed in the report


# ---------------------------------------------------------------- stats: errors, operators, models


def error_groups(out: RunOutput) -> list[dict[str, Any]]:
    """Errors grouped by (stage, type, message), most frequent first within a stage."""
    table = out.read("errors", ["stage", "error_type", "error_message", "source_uri"])
    groups: dict[tuple, dict[str, Any]] = {}
    for row in table.to_pylist() if table is not None else []:
        key = (row["stage"], row["error_type"], row["error_message"])
        group = groups.setdefault(key, {"stage": key[0], "type": key[1], "message": key[2], "count": 0, "examples": []})
        group["count"] += 1
        if len(group["examples"]) < 3:
            group["examples"].append(row["source_uri"])
    return sorted(groups.values(), key=lambda g: (g["stage"] or "", -g["count"], g["message"] or ""))


OPERATOR = re.compile(r"^Operator (\d+) (.+?): (.*)$")
SECONDS = re.compile(r"(?:produced|executed) in ([\d.]+)s")
OUTPUT_ROWS = re.compile(r"Total output num rows: (\d+) rows")
THROUGHPUT = re.compile(r"Ray Data throughput: ([\d.eE+-]+) rows/s")


def parse_stats(text: str) -> tuple[list[dict[str, Any]], float | None]:
    """Per-operator wall time, output rows and throughput from Ray Data's stats text, and the
    dataset's throughput. Lines it does not recognise are ignored; an operator with fused
    sub-operators reports its last sub-operator's rows and throughput."""
    operators: list[dict[str, Any]] = []
    dataset_rate = None
    in_dataset_block = False
    for line in text.splitlines():
        if m := OPERATOR.match(line):
            seconds = SECONDS.search(m.group(3))
            operators.append({"index": int(m.group(1)), "name": m.group(2),
                              "wall_s": float(seconds.group(1)) if seconds else None,
                              "output_rows": None, "rows_per_s": None})
            in_dataset_block = False
        elif line.startswith("Dataset throughput"):
            in_dataset_block = True
        elif m := OUTPUT_ROWS.search(line):
            if operators and not in_dataset_block:
                operators[-1]["output_rows"] = int(m.group(1))
        elif m := THROUGHPUT.search(line):
            if in_dataset_block:
                dataset_rate = float(m.group(1))
            elif operators:
                operators[-1]["rows_per_s"] = float(m.group(1))
        elif line and not line[0].isspace() and not line.startswith("*"):
            in_dataset_block = False  # another top-level section (iterator, memory)
    return operators, dataset_rate


def model_rows(manifest: dict[str, Any]) -> list[dict[str, str | None]]:
    """One row per model the run used: role, model (as configured), configured and resolved revision."""
    models, config = manifest.get("models", {}), manifest.get("config", {})
    conditions = [cn.get("condition") for cn in (config.get("generation") or {}).get("controlnets", [])]

    def row(role: str, m: dict | None) -> dict[str, str | None]:
        m = m or {}
        return {"role": role, "model": m.get("model"), "revision": m.get("revision"), "commit": m.get("commit")}

    rows = []
    for key, value in models.items():  # the generator's models by role ("base_model", "controlnets"), then annotators
        if key == "annotators":
            rows += [row(f"annotator {k}", m) for k, m in value.items()]
        elif isinstance(value, list):  # one model per condition
            rows += [row(f"{key.removesuffix('s')} ({conditions[i] if i < len(conditions) else i})", m)
                     for i, m in enumerate(value)]
        elif value:
            rows.append(row(key.replace("_", " "), value))
    return rows


def annotator_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"id": a.get("id") or a["name"], "name": a["name"], "params": a.get("params", {})}
            for a in manifest.get("config", {}).get("annotators", [])]


def generation_params(manifest: dict[str, Any]) -> dict[str, Any]:
    config = manifest.get("config", {})
    gen = config.get("generation") or {}
    keep = ("scheduler", "steps", "guidance_scale", "dtype", "variants_per_image", "prompt")
    params = {"seed": config.get("seed"), "resolution": config.get("image", {}).get("resolution")}
    params.update({k: gen[k] for k in keep if k in gen})
    params["controlnets"] = [{k: v for k, v in cn.items() if k != "revision"} for cn in gen.get("controlnets", [])]
    return params


def fmt_seconds(s: float | None) -> str:
    return "—" if s is None else f"{s:.2f} s"


def fmt_rate(r: float | None) -> str:
    return "—" if r is None else f"{r:.3g} rows/s"


# ---------------------------------------------------------------- gallery


def thumbnail_uri(png: bytes, px: int) -> str:
    """A JPEG data: URI of the image downscaled to at most px on its longest side."""
    with Image.open(io.BytesIO(png)) as im:
        im = im.convert("RGB")
        im.thumbnail((px, px))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass
class SourceCard:
    uri: str
    image: str  # data: URI
    controls: dict[str, str]  # control column -> data: URI
    variants: list[dict[str, Any]]  # {variant_index, seed, prompt, sample_id, uri}


def gallery(out: RunOutput, max_sources: int, px: int) -> tuple[list[SourceCard], int]:
    """Cards for the first `max_sources` sources (by source URI), and the number of sources in all."""
    files = out.files("samples")
    uris_by_file = {p: set(out.read_file(p, ["source_uri"]).column("source_uri").to_pylist()) for p in files}
    all_uris = sorted(set().union(*uris_by_file.values()))
    shown = set(all_uris[:max_sources])
    controls, generated = out.control_columns(), out.generated()
    columns = ["source_uri", "image", *controls]
    columns += ["sample_id", "variant_index", "seed", "prompt", "generated"] if generated else []
    cards: dict[str, SourceCard] = {}
    for path in files:
        if not uris_by_file[path] & shown:
            continue
        table = out.read_file(path, columns)
        table = table.filter(pc.is_in(table.column("source_uri"), value_set=pa.array(sorted(shown), pa.string())))
        for row in table.to_pylist():
            card = cards.get(row["source_uri"])
            if card is None:  # every variant carries the same source image and control maps
                card = cards[row["source_uri"]] = SourceCard(
                    row["source_uri"], thumbnail_uri(row["image"]["bytes"], px),
                    {c: thumbnail_uri(row[c]["bytes"], px) for c in controls}, [])
            if generated:
                card.variants.append({k: row[k] for k in ("variant_index", "seed", "prompt", "sample_id")}
                                     | {"uri": thumbnail_uri(row["generated"]["bytes"], px)})
    for card in cards.values():
        card.variants.sort(key=lambda v: v["variant_index"])
    return [cards[u] for u in sorted(cards)], len(all_uris)


def figure(uri: str, caption: str, title: str, cls: str) -> str:
    return (f'<figure class="{cls}"><img src="{uri}" alt="{escape(caption)}" title="{escape(title)}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def card_html(card: SourceCard) -> str:
    name = card.uri.rsplit("/", 1)[-1]
    figures = [figure(card.image, "source", card.uri, "source")]
    figures += [figure(uri, col.removeprefix("control_"), f"control map {col}", "control")
                for col, uri in card.controls.items()]
    for v in card.variants:
        title = f"prompt: {v['prompt']}\nseed: {v['seed']}\nvariant: {v['variant_index']}\nsample_id: {v['sample_id']}"
        figures.append(
            f'<figure class="generated"><img src="{v["uri"]}" alt="generated variant {v["variant_index"]}" '
            f'title="{escape(title)}"><figcaption>#{v["variant_index"]} · seed {v["seed"]}'
            f'<br><span class="prompt">{escape(v["prompt"] or "")}</span></figcaption></figure>')
    return (f'<section class="card"><h3 title="{escape(card.uri)}">{escape(name)}</h3>'
            f'<div class="row">{"".join(figures)}</div></section>')


# ---------------------------------------------------------------- report.html

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left;vertical-align:top;white-space:pre-line}
td.n{text-align:right}code,pre{font:12px ui-monospace,monospace}pre{background:#f6f6f6;padding:.5em;overflow:auto}
.card{border-top:1px solid #ddd;padding:.5em 0}.card h3{margin:.2em 0;font-size:14px}
.row{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0;max-width:256px}figure img{display:block;max-width:256px}
figcaption{font-size:12px;color:#555}.source figcaption{font-weight:bold}.generated img{outline:2px solid #8ab}
.note{background:#fff6d5;padding:.3em .6em}
"""


def table_html(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="n">{c}</td>' if isinstance(c, (int, float)) else f"<td>{escape(str(c))}</td>"
                         for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def report_html(out: RunOutput, max_sources: int = MAX_SOURCES, px: int = THUMB_PX) -> str:
    manifest = out.manifest()
    counts, timings = manifest.get("counts", {}), manifest.get("timings", {})
    stats_text = out.read_text("stats.txt", default="")
    operators, dataset_rate = parse_stats(stats_text)
    cards, n_sources = gallery(out, max_sources, px)
    errors = error_groups(out)
    run_id = str(manifest.get("run_id"))

    parts = [f"<h1>ControlNet dataset · run {escape(run_id)}</h1>",
             table_html(["", ""], [["output", out.url], ["code version", manifest.get("code_version")],
                                   ["started", manifest.get("started_at")], ["finished", manifest.get("finished_at")]])]
    parts.append("<h2>Counts</h2>")
    parts.append(table_html(["", ""], [[k.replace("_", " "), v] for k, v in counts.items() if k != "errors_by_stage"]
                            + [[f"errors at {s}", n] for s, n in counts.get("errors_by_stage", {}).items()]))
    parts.append("<h2>Throughput</h2>")
    parts.append(f"<p>{counts.get('samples', 0)} samples in {fmt_seconds(timings.get('total_s'))}"
                 f" = {escape(str(timings.get('samples_per_s')))} samples/s</p>")
    if operators:
        parts.append(table_html(["operator", "wall time", "output rows", "throughput"],
                                [[op["name"], fmt_seconds(op["wall_s"]), op["output_rows"] if op["output_rows"] is not None
                                  else "—", fmt_rate(op["rows_per_s"])] for op in operators]))
        if dataset_rate is not None:
            parts.append(f"<p>Ray Data dataset throughput: {fmt_rate(dataset_rate)}</p>")
    else:
        parts.append("<p>No per-operator timings could be read from stats.txt.</p>")
    parts.append(f"<details><summary>Ray Data stats (stats.txt)</summary><pre>{escape(stats_text)}</pre></details>")

    parts.append("<h2>Errors</h2>")
    if errors:
        shown = errors[:MAX_ERROR_GROUPS]
        parts.append(table_html(["stage", "type", "message", "count", "examples"],
                                [[g["stage"], g["type"], g["message"], g["count"], "\n".join(map(str, g["examples"]))]
                                 for g in shown]))
        if len(errors) > len(shown):
            parts.append(f'<p class="note">{len(errors) - len(shown)} more error groups not listed.</p>')
    else:
        parts.append("<p>None.</p>")

    parts.append("<h2>Models</h2>")
    parts.append(table_html(["role", "model", "revision (configured)", "resolved revision"],
                            [[r["role"], r["model"] or "— (no weights)", r["revision"] or "—", r["commit"] or "—"]
                             for r in model_rows(manifest)]))
    parts.append(table_html(["annotator", "name", "params"],
                            [[a["id"], a["name"], json.dumps(a["params"], sort_keys=True)] for a in annotator_rows(manifest)]))

    parts.append("<h2>Samples</h2>")
    if n_sources > len(cards):
        parts.append(f'<p class="note">Showing the first {len(cards)} of {n_sources} sources (sorted by source URI); '
                     f"rebuild with <code>python -m pipeline report OUT --max-sources N</code> to show more.</p>")
    else:
        parts.append(f"<p>All {n_sources} sources. Hover over an image for its prompt and seed.</p>")
    parts.extend(card_html(c) for c in cards)

    return ('<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            '<link rel="icon" href="data:,">'
            f"<title>Run {escape(run_id)}</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


# ---------------------------------------------------------------- README.md (Hugging Face dataset card)


def md_cell(value: Any) -> str:
    """Text for a Markdown table cell (HTML-escaped; pipes escaped)."""
    return escape(str(value), quote=False).replace("|", "\\|").replace("\n", " ")


def md_code(value: Any) -> str:
    """A Markdown code span (shown literally, so not HTML-escaped)."""
    return "`" + str(value).replace("`", "'").replace("|", "\\|").replace("\n", " ") + "`"


def dataset_card(manifest: dict[str, Any], url: str) -> str:
    front = {
        "license": "unknown",
        "tags": ["controlnet", "synthetic", "image"],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "samples/*.parquet"}]}],
    }
    counts, timings = manifest.get("counts", {}), manifest.get("timings", {})
    models = "\n".join(f"| {md_cell(r['role'])} | {md_code(r['model']) if r['model'] else '— (no weights)'} "
                       f"| {md_cell(r['revision'] or '—')} | {md_code(r['commit']) if r['commit'] else '—'} |"
                       for r in model_rows(manifest))
    annotators = "\n".join(f"| {md_cell(a['id'])} | {md_cell(a['name'])} | {md_code(json.dumps(a['params'], sort_keys=True))} |"
                           for a in annotator_rows(manifest))
    count_rows = "\n".join([f"| {md_cell(k.replace('_', ' '))} | {md_cell(v)} |" for k, v in counts.items() if k != "errors_by_stage"]
                           + [f"| errors at {md_cell(s)} | {n} |" for s, n in counts.get("errors_by_stage", {}).items()])
    versions = yaml.safe_dump(manifest.get("versions", {}), sort_keys=False).strip()
    if family := run_family(manifest):
        generation = yaml.safe_dump(generation_params(manifest), sort_keys=False, allow_unicode=True).strip()
        what = f"Source photos, one control map per annotator and {generator_class(family).label}"
    else:
        generation = "# none: an annotate-only job (source image, control maps, caption per row)"
        what = "Source photos and one control map per annotator (an annotate-only job)"
    return f"""---
{yaml.safe_dump(front, sort_keys=False).strip()}
---

# ControlNet dataset (run {md_cell(manifest.get("run_id"))})

{what},
written by the ControlNet dataset pipeline. Rows are in `samples/*.parquet` (image columns are
`datasets` Image features: `image`, `control_<annotator id>`, `generated`); inputs that failed are
in `errors/*.parquet`. Every row carries its own provenance (models, revisions, seed, prompt).
The license depends on the source images and the models used.

- run id: {md_code(manifest.get("run_id"))}
- code version: {md_code(manifest.get("code_version"))}
- finished: {md_cell(manifest.get("finished_at"))}
- wall time: {md_cell(timings.get("total_s"))} s ({md_cell(timings.get("samples_per_s"))} samples/s)

## Usage

```python
from datasets import load_dataset

ds = load_dataset("parquet", data_files={json.dumps(posixpath.join(url, "samples/*.parquet"))}, split="train")
```

Uploaded to the Hugging Face Hub with this card, `load_dataset("<user>/<repo>")` reads the same files.

## Counts

| | |
|---|---|
{count_rows}

## Models

| role | model | revision (configured) | resolved revision |
|---|---|---|---|
{models}

## Annotators

| id | annotator | params |
|---|---|---|
{annotators}

## Generation parameters

```yaml
{generation}
```

## Library versions

```yaml
{versions}
```
"""


# ---------------------------------------------------------------- croissant.json (Croissant 1.0)

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
    if pa.types.is_floating(t):
        return "sc:Float"
    if pa.types.is_timestamp(t):
        return "sc:Date"
    return None


def run_family(manifest: dict[str, Any]) -> str | None:
    """The run's generator family; None for an annotate-only run (manifests before families: sd15)."""
    gen = manifest.get("config", {}).get("generation")
    return (gen.get("family") or DEFAULT_FAMILY) if gen else None


def croissant(manifest: dict[str, Any], control_ids: list[str], url: str) -> dict[str, Any]:
    """Croissant 1.0 JSON-LD: the samples Parquet files and one field per column
    (the nested `annotators` column is left out; its content is in the dataset card)."""
    family = run_family(manifest)
    fields = []
    for name, type_, doc in sample_columns(control_ids, family=family):
        repeated = pa.types.is_list(type_)
        data_type = croissant_type(type_.value_type if repeated else type_)
        if data_type is None:
            continue
        source: dict[str, Any] = {"fileSet": {"@id": "samples-parquet"}, "extract": {"column": name}}
        if type_ == IMAGE:
            source["transform"] = {"jsonPath": "bytes"}
        fields.append({"@type": "cr:Field", "@id": f"samples/{name}", "name": name, "description": doc,
                       "dataType": data_type, "source": source, **({"repeated": True} if repeated else {})})
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
                          "includes": "samples/*.parquet"}],
        "recordSet": [{"@type": "cr:RecordSet", "@id": "samples", "name": "samples",
                       "description": "One generated sample per row." if family else
                                      "One source image and its control maps per row (an annotate-only run).",
                       "key": {"@id": "samples/sample_id"},
                       "field": fields}],
    }


# ---------------------------------------------------------------- entry points


def write_documents(url: str, storage_options: dict[str, Any] | None = None, max_sources: int = MAX_SOURCES) -> list[str]:
    """Write report.html, README.md and croissant.json into a run's output; returns their paths."""
    out = RunOutput(url, storage_options)
    manifest = out.manifest()
    control_ids = [c.removeprefix("control_") for c in out.control_columns()]
    return [
        out.write_text("report.html", report_html(out, max_sources)),
        out.write_text("README.md", dataset_card(manifest, url)),
        out.write_text("croissant.json",
                       json.dumps(croissant(manifest, control_ids, out.location()), indent=2) + "\n"),
    ]


def inspect_text(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """A plain-text summary of a run's output: counts, errors, throughput, models."""
    out = RunOutput(url, storage_options)
    manifest = out.manifest()
    counts, timings = manifest.get("counts", {}), manifest.get("timings", {})
    sources = out.read("samples", ["source_uri"])
    lines = [f"run {manifest.get('run_id')}  code {manifest.get('code_version')}  finished {manifest.get('finished_at')}",
             f"output: {url}", "", "counts (manifest):"]
    lines += [f"  {k.replace('_', ' ')}: {v}" for k, v in counts.items() if k != "errors_by_stage"]
    lines += ["counts (parquet):",
              f"  samples: {out.num_rows('samples')} rows in {len(out.files('samples'))} files, "
              f"{len(set(sources.column('source_uri').to_pylist())) if sources is not None else 0} sources",
              f"  errors: {out.num_rows('errors')} rows in {len(out.files('errors'))} files", "", "errors:"]
    errors = error_groups(out)
    by_stage: dict[str, list] = defaultdict(list)
    for g in errors:
        by_stage[g["stage"]].append(g)
    for stage, groups in by_stage.items():
        lines.append(f"  {stage}: {sum(g['count'] for g in groups)}")
        lines += [f"    {g['count']} x {g['type']}: {g['message']}" for g in groups]
    if not errors:
        lines.append("  none")
    lines += ["", "throughput:",
              f"  {counts.get('samples', 0)} samples in {fmt_seconds(timings.get('total_s'))} "
              f"= {timings.get('samples_per_s')} samples/s"]
    operators, _ = parse_stats(out.read_text("stats.txt", default=""))
    lines += [f"  {op['name']}: {fmt_seconds(op['wall_s'])}, {op['output_rows']} rows, {fmt_rate(op['rows_per_s'])}"
              for op in operators]
    lines += ["", "models:"]
    lines += [f"  {r['role']}: {r['model'] or '(no weights)'}"
              + (f" @ {r['commit']}" if r["commit"] else "") + (f" (revision {r['revision']})" if r["revision"] else "")
              for r in model_rows(manifest)]
    return "\n".join(lines)
