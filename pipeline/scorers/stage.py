"""The score stage: control fidelity per condition, CLIP and sharpness scores, and the gate.

For each scored condition the same annotator (same parameters, same resolved weights) runs on the
generated images of a batch, and its map (or, for pose, its keypoints) is compared with the row's
own control map by the condition's metric (base.METRIC_OF). The row gains `score_<id>` per
condition, `clip_score` and `sharpness_score` when configured, `passed` (every bound of
`quality.min` / `quality.max` holds) and `score_provenance` (JSON: metrics, annotators and weights,
CLIP model, thresholds, per-row details such as people counts). The sink routes rows that did not
pass to `rejected/` when `quality.action` is `drop`.

`Scorer` does the work on rows (used by the stage and by `python -m pipeline score`); `Score` is the
Ray Data stage around it (an actor when a model loads, so it loads once per actor).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline.config import AnnotatorConfig, JobConfig, QualityConfig
from pipeline.cpus import actor_device, loading
from pipeline.io.images import png_to_array
from pipeline.models import ResolvedModel
from pipeline.rows import Row, map_batch_isolated
from pipeline.schema import CONTROL_COLUMN, KEYPOINTS_COLUMN
from pipeline.scorers import metrics
from pipeline.scorers.base import CLIP, CLIP_DOC, METRIC_OF, SHARPNESS, SHARPNESS_DOC, Metric, metric_for, passes

SCORE_COLUMN = "score_{id}"
CLIP_COLUMN, SHARPNESS_COLUMN, PASSED_COLUMN, PROVENANCE_COLUMN = (
    "clip_score", "sharpness_score", "passed", "score_provenance")
PASSED_DOC = ("Whether the sample met every threshold of the job's quality section (quality.min / quality.max); "
              "with quality.action drop, samples/ holds the rows that passed and rejected/ the others.")
PROVENANCE_DOC = ("JSON record of the scoring: per condition the metric and the annotator that re-ran on the "
                  "generated image (name, params, weights, revision), the CLIP model and its revision, the "
                  "thresholds and action, what scored the row (the run or `python -m pipeline score`), and per-row "
                  "details (pose: people expected and found).")


def score_doc(key: str, metric: Metric) -> str:
    return (f"Control fidelity of condition {key!r}: {metric.description}; the annotator re-run on the generated "
            f"image against control_{key}.")


@dataclass(frozen=True)
class ScoredCondition:
    cfg: AnnotatorConfig
    metric: Metric

    @property
    def key(self) -> str:
        return self.cfg.key


@dataclass(frozen=True)
class Gate:
    """What scoring reads of a job config: its quality section and its annotators (a JobConfig has both;
    `python -m pipeline score` builds one from a run's manifest)."""

    quality: QualityConfig | None
    annotators: list[AnnotatorConfig]


def scored_conditions(cfg: JobConfig | Gate) -> list[ScoredCondition]:
    """The conditions the job's quality section scores, in annotator order."""
    if cfg.quality is None:
        return []
    wanted = cfg.quality.conditions
    return [ScoredCondition(a, metric_for(a.name)) for a in cfg.annotators
            if metric_for(a.name) and (wanted is None or a.key in wanted)]


def score_columns(cfg: JobConfig | Gate) -> list[tuple[str, pa.DataType, str]]:
    """The columns the quality section adds to every sample (none without one)."""
    if cfg.quality is None:
        return []
    columns = [(SCORE_COLUMN.format(id=c.key), pa.float64(), score_doc(c.key, c.metric)) for c in scored_conditions(cfg)]
    if cfg.quality.clip_model:
        columns.append((CLIP_COLUMN, pa.float64(), CLIP_DOC))
    if cfg.quality.sharpness:
        columns.append((SHARPNESS_COLUMN, pa.float64(), SHARPNESS_DOC))
    return columns + [(PASSED_COLUMN, pa.bool_(), PASSED_DOC), (PROVENANCE_COLUMN, pa.string(), PROVENANCE_DOC)]


def generic_score_columns() -> list[tuple[str, pa.DataType, str]]:
    """The quality columns as documented in schemas/samples.schema.json (`score_{id}` once for all)."""
    doc = ("Control fidelity of the condition with this annotator id: the annotator re-run on the generated image "
           "against control_{id}, by the condition's metric: " + "; ".join(
               f"{m.name} for {', '.join(n for n, mm in METRIC_OF.items() if mm is m)} ({m.description})"
               for m in dict.fromkeys(METRIC_OF.values())) + ". One column per scored condition.")
    return [(SCORE_COLUMN, pa.float64(), doc), (CLIP_COLUMN, pa.float64(), CLIP_DOC + " Only with quality.clip_model."),
            (SHARPNESS_COLUMN, pa.float64(), SHARPNESS_DOC + " Only with quality.sharpness."),
            (PASSED_COLUMN, pa.bool_(), PASSED_DOC), (PROVENANCE_COLUMN, pa.string(), PROVENANCE_DOC)]


def thresholds(quality: QualityConfig) -> dict[str, Any]:
    return {"min": dict(quality.min), "max": dict(quality.max), "action": quality.action}


def quality_record(quality: QualityConfig, scored_by: str) -> dict[str, Any]:
    """The manifest's `quality` entry: the thresholds the output's scores were gated with, and by what
    (the run, or `python -m pipeline score`); the documents read it."""
    from datetime import datetime, timezone

    return {**quality.model_dump(mode="json", include={"min", "max", "action", "conditions", "pck_alpha",
                                                       "clip_model", "clip_revision", "sharpness"}),
            "scored_by": scored_by, "scored_at": datetime.now(timezone.utc).isoformat()}


def gate_settings(record: dict[str, Any] | None) -> dict[str, Any]:
    """The quality settings of a manifest's `quality` record (`quality_record`), without who scored and when."""
    return {k: v for k, v in (record or {}).items() if k not in ("scored_by", "scored_at")}


class Scorer:
    """Scores rows that hold `generated`, `prompt` and the scored `control_<id>` / `keypoints_<id>`."""

    def __init__(self, cfg: JobConfig | Gate, annotator_models: dict[str, ResolvedModel | None],
                 clip_model: ResolvedModel | None, device: str | None = None, scored_by: str = "run"):
        from pipeline.annotators import ANNOTATORS

        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.quality = cfg.quality
        self.conditions = scored_conditions(cfg)
        self.annotators = {c.key: ANNOTATORS[c.cfg.name](c.cfg.params, model=annotator_models.get(c.key), device=device)
                           for c in self.conditions}
        if self.quality.clip_model and clip_model is None:
            raise ValueError("quality.clip_model is set but no resolved CLIP model was given")
        from pipeline.scorers.clip import ClipScorer

        self.clip = ClipScorer(clip_model, device) if self.quality.clip_model else None
        record: dict[str, Any] = {"scored_by": scored_by, **thresholds(self.quality), "conditions": {}}
        for c in self.conditions:
            metric = c.metric.name + (f"@{self.quality.pck_alpha}" if c.metric.keypoints else "")
            record["conditions"][c.key] = {"metric": metric, "annotator": self.annotators[c.key].provenance()}
        if self.clip:
            record["clip"] = {"metric": "cosine", "model": clip_model.model, "revision": clip_model.revision,
                              "commit": clip_model.commit}
        if self.quality.sharpness:
            record["sharpness"] = {"metric": "laplacian_variance"}
        self.record = record

    def score(self, rows: list[Row]) -> list[Row]:
        generated = [png_to_array(r["generated"]) for r in rows]
        values: list[dict[str, float | None]] = [{} for _ in rows]
        details: list[dict[str, Any]] = [{} for _ in rows]
        for c in self.conditions:
            maps, extras = self.annotators[c.key].annotate_with_extras(generated)
            for i, row in enumerate(rows):
                if c.metric.keypoints:
                    expected = row.get(KEYPOINTS_COLUMN.format(id=c.key))
                    if expected is None:
                        raise ValueError(f"row has no {KEYPOINTS_COLUMN.format(id=c.key)} to compare keypoints with")
                    value, counts = metrics.pose_pck(expected, extras[i], self.quality.pck_alpha)
                    details[i][c.key] = counts
                else:
                    value = c.metric.fn(png_to_array(row[CONTROL_COLUMN.format(id=c.key)]), maps[i])
                values[i][c.key] = float(value)
        if self.clip:
            for v, s in zip(values, self.clip(generated, [r.get("prompt") or "" for r in rows])):
                v[CLIP] = float(s)
        if self.quality.sharpness:
            for v, image in zip(values, generated):
                v[SHARPNESS] = metrics.laplacian_variance(image)
        out = []
        for row, v, d in zip(rows, values, details):
            scored = {SCORE_COLUMN.format(id=c.key): v[c.key] for c in self.conditions}
            if self.clip:
                scored[CLIP_COLUMN] = v[CLIP]
            if self.quality.sharpness:
                scored[SHARPNESS_COLUMN] = v[SHARPNESS]
            scored[PASSED_COLUMN] = passes(v, self.quality.min, self.quality.max)
            scored[PROVENANCE_COLUMN] = json.dumps({**self.record, "details": d}, sort_keys=True)
            out.append({**row, **scored})
        return out


def needs_actor(cfg: JobConfig | Gate, annotator_models: dict[str, ResolvedModel | None]) -> bool:
    """Whether the stage loads a model (then it runs in an actor pool, the model loaded once per actor)."""
    return bool(cfg.quality.clip_model) or any(annotator_models.get(c.key) for c in scored_conditions(cfg))


class Score:
    """The Ray Data stage: `Scorer` over the good rows of a batch; a row that fails becomes an error
    row at stage `score`."""

    def __init__(self, cfg: JobConfig | Gate, annotator_models: dict[str, ResolvedModel | None],
                 clip_model: ResolvedModel | None, num_cpus: float | None = None):
        """`num_cpus`: given to an actor (`quality.num_cpus`): on CPU its torch runs on that many threads, not on
        what Ray's claim gives, and keeps the memory it frees (pipeline.cpus.actor_device). None: a Ray task."""
        if num_cpus is None:  # a Ray task
            self.scorer = Scorer(cfg, annotator_models, clip_model)
        else:
            with loading():
                self.scorer = Scorer(cfg, annotator_models, clip_model, actor_device(num_cpus))

    def __call__(self, batch: pa.Table) -> pa.Table:
        return map_batch_isolated("score", batch, self.scorer.score)


def drop_rejected(rows: list[Row]) -> tuple[list[Row], list[Row]]:
    """(rows that passed or were not gated, rows that failed the gate)."""
    kept = [r for r in rows if r.get(PASSED_COLUMN) is not False]
    return kept, [r for r in rows if r.get(PASSED_COLUMN) is False]


