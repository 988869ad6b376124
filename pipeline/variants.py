"""Variant expansion: each source row becomes `variants` sample rows with id, seed and prompt."""

from __future__ import annotations

import csv
import io
import json
import posixpath
import string
from typing import Any, Callable

import pyarrow as pa

from pipeline.config import PromptConfig
from pipeline.ids import sample_identity
from pipeline.io.sources import SourceError, filesystem
from pipeline.rows import Row, map_rows


class MissingPrompt(LookupError):
    """A configured per-image prompt source has no prompt for this image."""

    def __str__(self) -> str:  # LookupError would quote the message
        return str(self.args[0])


def render_prompt(cfg: PromptConfig, variant: int, caption: str | None, prompt: str | list[str] | None = None) -> str:
    """The template filled for one variant; `prompt`: the image's own prompt(s) (a list cycles by variant),
    else the config's prompts list, cycled by variant."""
    prompts = cfg.prompts if prompt is None else [prompt] if isinstance(prompt, str) else prompt
    return fill_template(cfg.template, {"prompt": prompts[variant % len(prompts)], "caption": caption or "",
                                        "variant": str(variant)})


def fill_template(template: str, values: dict[str, str]) -> str:
    """`template` with its fields filled, where an empty field is dropped together with the text that
    joins it to its neighbour: text between two fields is kept only when both sides are non-empty (of
    several in a row, the one just before the next non-empty field); text before the first field and
    after the last stays. So "{prompt}, {caption}" with no caption gives "a painting", not "a painting,"."""
    out: list[str] = []
    kept = seen = False
    for literal, field, _, _ in string.Formatter().parse(template):
        if field is None:  # the text after the last field
            out.append(literal)
            continue
        value = values[field].strip()
        if value:
            if kept or not seen:  # it joins two kept fields, or leads the template
                out.append(literal)
            out.append(value)
            kept = True
        elif not seen:
            out.append(literal)
        seen = True
    return "".join(out).strip()


def source_name(uri: str) -> str:
    """A source's file name, as a prompts file names it: the last part of its uri (after `#` for a
    member of a Parquet file or a tar shard)."""
    return posixpath.basename(uri.rsplit("#", 1)[-1]) or uri


def load_prompt_file(cfg: PromptConfig, storage_options: dict[str, Any] | None = None) -> dict[str, str | list[str]]:
    """`cfg.file` as {key: prompt}: JSONL (one object per line with `name` or `sha256`, and `prompt`, a
    string or a list) or CSV (a header row with those columns)."""
    path, key = cfg.file, cfg.key
    fs, local = filesystem(path, storage_options or {})
    try:
        with fs.open(local, "rt", encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Excel's "CSV UTF-8") is not text
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise PromptFileError(f"generation.prompt.file {path}: cannot read it: {e}") from None
    if path.lower().endswith(".csv"):
        records = list(csv.DictReader(io.StringIO(text)))
        where = [f"row {i + 2}" for i in range(len(records))]
    else:
        records, where = [], []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except ValueError as e:
                    raise PromptFileError(f"generation.prompt.file {path} line {i}: not JSON ({e})") from None
                where.append(f"line {i}")
    prompts: dict[str, str | list[str]] = {}
    for record, at in zip(records, where):
        if not isinstance(record, dict) or not record.get(key) or "prompt" not in record:
            raise PromptFileError(f"generation.prompt.file {path} {at}: needs the fields {key!r} and 'prompt'")
        value = record["prompt"]
        if not (isinstance(value, str) or isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
            raise PromptFileError(f"generation.prompt.file {path} {at}: 'prompt' must be a string or a list of strings")
        if not all(v.strip() for v in ([value] if isinstance(value, str) else value)):
            raise PromptFileError(f"generation.prompt.file {path} {at}: 'prompt' is empty")
        name = str(record[key]).strip().lower() if key == "sha256" else str(record[key])
        if prompts.get(name, value) != value:
            raise PromptFileError(f"generation.prompt.file {path} {at}: {name!r} has two different prompts")
        prompts[name] = value
    return prompts


class PromptFileError(SourceError):
    """A prompts file that cannot be used; the message names the file and the line."""


class ExpandVariants:
    """Each source row becomes `variants` sample rows with id, seed and (for generation) prompt.
    `written(sample_id)` says whether an earlier run of the job already wrote that sample; those are
    skipped."""

    def __init__(self, job_seed: int, variants: int, prompts: PromptConfig | None,
                 written: Callable[[str], bool] | None = None, image_prompts: Any = None,
                 source_written: Callable[[str], bool] | None = None):
        self.job_seed, self.variants, self.prompts, self.written = job_seed, variants, prompts, written
        # output.layout normalized: whether a source's row is in sources/ already; the first variant row of a
        # source without one is marked `writes_source` (the writer writes the source's row from it)
        self.source_written = source_written
        self.image_prompts = image_prompts  # load_prompt_file's dict, or a Ray object reference to it

    def __call__(self, batch: pa.Table) -> pa.Table:
        return map_rows("expand", batch, self.expand)

    def image_prompt(self, row: Row) -> str | list[str] | None:
        """The row's own prompt: from the source's prompt column (`source_prompt`) or the prompts file."""
        if "source_prompt" in row:  # source.prompt_column is set
            if not (row["source_prompt"] or "").strip():
                raise MissingPrompt("no prompt for this image: its source.prompt_column value is empty")
            return row["source_prompt"]
        if self.image_prompts is None:
            return None
        if not isinstance(self.image_prompts, dict):  # a Ray object reference, fetched once per worker
            import ray

            self.image_prompts = ray.get(self.image_prompts)
        key = row["source_sha256"] if self.prompts.key == "sha256" else source_name(row["source_uri"])
        if key not in self.image_prompts:
            raise MissingPrompt(f"no prompt for {key} in {self.prompts.file} (generation.prompt.key: {self.prompts.key})")
        return self.image_prompts[key]

    def expand(self, row: Row) -> list[Row]:
        out = []
        own = self.image_prompt(row) if self.prompts is not None else None
        for v in range(self.variants):
            sample_id, seed = sample_identity(self.job_seed, row["source_sha256"], v)
            if self.written is not None and self.written(sample_id):
                continue
            sample = {**row, "sample_id": sample_id, "variant_index": v, "seed": seed}
            if self.prompts is not None:  # None: an annotate-only job, one row per source
                sample.update(prompt=render_prompt(self.prompts, v, row.get("caption"), own),
                              negative_prompt=self.prompts.negative)
            out.append(sample)
        if out and self.source_written is not None and not self.source_written(row["source_sha256"]):
            out[0]["writes_source"] = True
        return out
