"""README.md: a Hugging Face dataset card with the run's provenance."""

from __future__ import annotations

import json
import posixpath
from html import escape
from typing import Any

import yaml

from pipeline.docs.stats import (
    annotator_rows,
    finished,
    generation_params,
    model_rows,
    run_family,
    run_layout,
    throughput,
)
from pipeline.docs.scores import card_markdown
from pipeline.generators import generator_class


def md_cell(value: Any) -> str:
    """Text for a Markdown table cell (HTML-escaped; pipes escaped)."""
    return escape(str(value), quote=False).replace("|", "\\|").replace("\n", " ")


def md_code(value: Any) -> str:
    """A Markdown code span (shown literally, so not HTML-escaped)."""
    return "`" + str(value).replace("`", "'").replace("|", "\\|").replace("\n", " ") + "`"


NORMALIZED = """
This output has the normalized layout: the source image, control maps and keypoints are written once per
source, in `sources/*.parquet` (config `sources`), and each sample refers to its source by `source_sha256`:

```python
sources = load_dataset("parquet", data_files={sources}, split="train")
by_sha = {{sha: i for i, sha in enumerate(sources["source_sha256"])}}
source = sources[by_sha[ds[0]["source_sha256"]]]  # image, control maps of the first sample
```
"""


def dataset_card(manifest: dict[str, Any], url: str, digest: str | None = None) -> str:
    """The card. `digest`: of the output's data files (RunOutput.digest), in each config's description: `datasets`
    keys the cache of `load_dataset(DIR)` by the folder's name and the card's configs, not by the files, so another
    output in a folder of the same name, this one after a resume added rows, or after `score` rewrote them, was read
    from an earlier cache."""
    job = f"run {manifest.get('run_id')} (job {manifest.get('job_fingerprint')}; files {digest})"
    front = {
        "license": "unknown",
        "tags": ["controlnet", "synthetic", "image"],
        "configs": [{"config_name": "default", "description": f"samples of {job}",
                     "data_files": [{"split": "train", "path": "samples/*.parquet"}]}],
    }
    layout = run_layout(manifest)
    if layout == "normalized":  # a second table: the sources, once each
        front["configs"].append({"config_name": "sources", "description": f"sources of {job}",
                                 "data_files": [{"split": "train", "path": "sources/*.parquet"}]})
    counts = manifest.get("counts", {})
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
- finished: {md_cell(finished(manifest))}
- throughput: {md_cell(throughput(manifest))}

## Usage

```python
from datasets import load_dataset

ds = load_dataset("parquet", data_files={json.dumps(posixpath.join(url, "samples/*.parquet"))}, split="train")
```

Uploaded to the Hugging Face Hub with this card, `load_dataset("<user>/<repo>")` reads the same files.
{NORMALIZED.format(sources=json.dumps(posixpath.join(url, "sources/*.parquet"))) if layout == "normalized" else ""}
## Counts

| | |
|---|---|
{count_rows}
{card_markdown(manifest)}
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
