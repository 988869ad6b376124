"""The caption stage: a captioner over the `image` column of the rows that need a caption."""

from __future__ import annotations

import json

import pyarrow as pa

from pipeline.cpus import actor_device, loading
from pipeline.captioners import CAPTIONERS
from pipeline.config import CaptionerConfig
from pipeline.io.images import png_to_array
from pipeline.models import ResolvedModel
from pipeline.rows import Row, map_batch_isolated
from pipeline.schema import CAPTIONER_COLUMNS

STAGE = "caption"
COLUMN = CAPTIONER_COLUMNS[0][0]


def needs_caption(row: Row, overwrite: bool) -> bool:
    return overwrite or not (row.get("caption") or "").strip()


class Caption:
    """An actor: the captioner loads once, then each batch's rows without a caption (all rows with
    `overwrite`) get `caption` and `captioner` (JSON provenance); the other rows pass unchanged."""

    def __init__(self, cfg: CaptionerConfig, model: ResolvedModel):
        with loading():
            device = actor_device(cfg.num_cpus)
            self.captioner = CAPTIONERS[cfg.kind](model, cfg.effective_task, cfg.max_new_tokens, device)
        self.overwrite = cfg.overwrite
        self.provenance = json.dumps(self.captioner.provenance(), sort_keys=True)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return map_batch_isolated(STAGE, batch, self.caption)

    def caption(self, rows: list[Row]) -> list[Row]:
        todo = [i for i, r in enumerate(rows) if needs_caption(r, self.overwrite)]
        out = [{**r, COLUMN: r.get(COLUMN)} for r in rows]
        if todo:
            captions = self.captioner([png_to_array(rows[i]["image"]) for i in todo])
            for i, text in zip(todo, captions):
                out[i].update({"caption": text, COLUMN: self.provenance})
        return out
