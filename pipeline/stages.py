"""The CPU stages and the annotator stage, each a callable for `Dataset.map_batches`.

Errors are data: a row that fails gets `error_stage`, `error_type` and `error_message` set, and
every later stage passes it through untouched. One bad row never fails its batch or the job.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any, Callable, Iterable

import pyarrow as pa

from pipeline.annotators import ANNOTATORS, Annotator
from pipeline.config import AnnotatorConfig, ImageConfig, PromptConfig
from pipeline.images import array_to_png, decode_image, png_to_array
from pipeline.models import ResolvedModel
from pipeline.sources import read_bytes

log = logging.getLogger(__name__)

Row = dict[str, Any]


def rows_of(batch: pa.Table) -> list[Row]:
    return batch.to_pylist()


def table_of(rows: list[Row]) -> pa.Table:
    """Rows to a table; keys missing from some rows become nulls."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return pa.table({k: pa.array([row.get(k) for row in rows]) for k in keys})


def is_error(row: Row) -> bool:
    return row.get("error_stage") is not None


def error_row(row: Row, stage: str, exc: BaseException) -> Row:
    log.warning("%s failed for %s: %s: %s", stage, row.get("source_uri"), type(exc).__name__, exc)
    return {**row, "error_stage": stage, "error_type": type(exc).__name__, "error_message": str(exc) or repr(exc)}


def map_rows(stage: str, batch: pa.Table, fn: Callable[[Row], Iterable[Row]]) -> pa.Table:
    """Apply `fn` to each good row (it returns zero or more rows); a raising row becomes an error row."""
    out: list[Row] = []
    for row in rows_of(batch):
        if is_error(row):
            out.append(row)
            continue
        try:
            out.extend(fn(row))
        except Exception as exc:  # noqa: BLE001 - errors are data
            out.append(error_row(row, stage, exc))
    return table_of(out)


def map_batch_isolated(stage: str, batch: pa.Table, fn: Callable[[list[Row]], list[Row]]) -> pa.Table:
    """Apply a batched `fn` to the good rows; if the batch raises, redo it row by row so only the
    rows that fail on their own become error rows."""
    rows = rows_of(batch)
    good = [i for i, r in enumerate(rows) if not is_error(r)]
    if good:
        try:
            results = fn([rows[i] for i in good])
        except Exception:  # noqa: BLE001
            results = []
            for i in good:
                try:
                    results.extend(fn([rows[i]]))
                except Exception as exc:  # noqa: BLE001 - errors are data
                    results.append(error_row(rows[i], stage, exc))
        for i, result in zip(good, results):
            rows[i] = result
    return table_of(rows)


class Decode:
    """Fetch (when only a path is known), hash, decode, orient, convert to RGB, resize."""

    def __init__(self, policy: ImageConfig, storage_options: dict[str, Any]):
        self.policy = policy
        self.storage_options = storage_options

    def __call__(self, batch: pa.Table) -> pa.Table:
        return map_rows("decode", batch, self.decode)

    def decode(self, row: Row) -> list[Row]:
        data = row.pop("source_bytes")
        if data is None:
            data = read_bytes(row["source_uri"], self.storage_options)
        row["source_sha256"] = hashlib.sha256(data).hexdigest()
        array, transform = decode_image(data, self.policy)
        row.update(image=array_to_png(array), width=array.shape[1], height=array.shape[0], transform=json.dumps(transform))
        return [row]


class Annotate:
    """One annotator over the `image` column, adding `control_<id>` (PNG) and `annotator_<id>` (JSON
    provenance), and for pose annotators `keypoints_<id>` (OpenPose JSON). Used as a plain function
    for weight-free annotators (Ray tasks) and as an actor class for annotators with weights (loaded
    once per actor)."""

    def __init__(self, cfg: AnnotatorConfig, model: ResolvedModel | None):
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.key = cfg.key
        self.annotator: Annotator = ANNOTATORS[cfg.name](cfg.params, model=model, device=device)
        self.provenance = json.dumps({"id": cfg.key, **self.annotator.provenance()}, sort_keys=True)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return map_batch_isolated(f"annotate:{self.key}", batch, self.annotate)

    def annotate(self, rows: list[Row]) -> list[Row]:
        maps, extras = self.annotator.annotate_with_extras([png_to_array(r["image"]) for r in rows])
        for row, control in zip(rows, maps):
            if control.shape != (row["height"], row["width"], 3):
                raise RuntimeError(f"annotator {self.key} returned {control.shape} for a {row['width']}x{row['height']} image")
        out = [
            {**row, f"control_{self.key}": array_to_png(control), f"annotator_{self.key}": self.provenance}
            for row, control in zip(rows, maps)
        ]
        if self.annotator.extras:  # only annotators with extras (pose: keypoints) add a column
            for row, extra in zip(out, extras):
                row[f"{self.annotator.extras}_{self.key}"] = extra
        return out


def derive(*parts: Any) -> bytes:
    return hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()


def sample_identity(job_seed: int, source_sha256: str, variant: int) -> tuple[str, int]:
    """(sample_id, seed) from the job seed, the source content hash and the variant index only, so
    they are the same on any cluster size, in any order, on a re-run or a resume."""
    sample_id = derive("sample", job_seed, source_sha256, variant).hex()[:32]
    seed = int.from_bytes(derive("seed", job_seed, source_sha256, variant)[:8], "big") >> 1  # fits int64
    return sample_id, seed


def render_prompt(cfg: PromptConfig, variant: int, caption: str | None) -> str:
    prompt = cfg.prompts[variant % len(cfg.prompts)]
    return cfg.template.format(prompt=prompt, caption=caption or "", variant=variant).strip()


class ExpandVariants:
    """Each source row becomes `variants` sample rows with id, seed and prompt."""

    def __init__(self, job_seed: int, variants: int, prompts: PromptConfig | None, skip: Any = None):
        self.job_seed, self.variants, self.prompts = job_seed, variants, prompts
        self.skip = skip  # resume.SkipWritten of an earlier run of the job, or None

    def __call__(self, batch: pa.Table) -> pa.Table:
        return map_rows("expand", batch, self.expand)

    def expand(self, row: Row) -> list[Row]:
        out = []
        for v in range(self.variants):
            sample_id, seed = sample_identity(self.job_seed, row["source_sha256"], v)
            if self.skip is not None and self.skip.variant_done(sample_id):
                continue
            sample = {**row, "sample_id": sample_id, "variant_index": v, "seed": seed}
            if self.prompts is not None:  # None: an annotate-only job, one row per source
                sample.update(prompt=render_prompt(self.prompts, v, row.get("caption")), negative_prompt=self.prompts.negative)
            out.append(sample)
        return out
