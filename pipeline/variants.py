"""Variant expansion: each source row becomes `variants` sample rows with id, seed and prompt."""

from __future__ import annotations

from typing import Callable

import pyarrow as pa

from pipeline.config import PromptConfig
from pipeline.ids import sample_identity
from pipeline.rows import Row, map_rows


def render_prompt(cfg: PromptConfig, variant: int, caption: str | None) -> str:
    prompt = cfg.prompts[variant % len(cfg.prompts)]
    return cfg.template.format(prompt=prompt, caption=caption or "", variant=variant).strip()


class ExpandVariants:
    """Each source row becomes `variants` sample rows with id, seed and (for generation) prompt.
    `written(sample_id)` says whether an earlier run of the job already wrote that sample; those are
    skipped."""

    def __init__(self, job_seed: int, variants: int, prompts: PromptConfig | None,
                 written: Callable[[str], bool] | None = None):
        self.job_seed, self.variants, self.prompts, self.written = job_seed, variants, prompts, written

    def __call__(self, batch: pa.Table) -> pa.Table:
        return map_rows("expand", batch, self.expand)

    def expand(self, row: Row) -> list[Row]:
        out = []
        for v in range(self.variants):
            sample_id, seed = sample_identity(self.job_seed, row["source_sha256"], v)
            if self.written is not None and self.written(sample_id):
                continue
            sample = {**row, "sample_id": sample_id, "variant_index": v, "seed": seed}
            if self.prompts is not None:  # None: an annotate-only job, one row per source
                sample.update(prompt=render_prompt(self.prompts, v, row.get("caption")), negative_prompt=self.prompts.negative)
            out.append(sample)
        return out
