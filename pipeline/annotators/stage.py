"""The annotate stage: one annotator over the `image` column of a batch of rows."""

from __future__ import annotations

import json

import pyarrow as pa

from pipeline.cpus import actor_device, loading
from pipeline.annotators import ANNOTATORS, Annotator
from pipeline.config import AnnotatorConfig
from pipeline.io.images import array_to_png, png_to_array
from pipeline.models import ResolvedModel
from pipeline.rows import Row, map_batch_isolated
from pipeline.schema import KEYPOINTS_COLUMN


class Annotate:
    """One annotator over the `image` column, adding `control_<id>` (PNG) and `annotator_<id>` (JSON
    provenance), and for pose annotators `keypoints_<id>` (OpenPose JSON). Used as a plain function
    for weight-free annotators (Ray tasks) and as an actor class for annotators with weights (loaded
    once per actor)."""

    def __init__(self, cfg: AnnotatorConfig, model: ResolvedModel | None):
        self.annotator: Annotator
        if model is None:  # weight-free: built by the driver and run as Ray tasks (no torch)
            self.annotator = ANNOTATORS[cfg.name](cfg.params)
        else:  # an actor
            with loading():
                self.annotator = ANNOTATORS[cfg.name](cfg.params, model=model, device=actor_device(cfg.num_cpus))
        self.key = cfg.key
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
        if self.annotator.keypoints:  # only pose annotators add a column
            column = KEYPOINTS_COLUMN.format(id=self.key)
            for row, extra in zip(out, extras):
                row[column] = extra
        return out


