"""`python -m pipeline score OUT`: score an existing run's output in place, without generating anything.

For runs made before the quality gate existed, or to gate again with other thresholds. The quality
section is the one the output was last gated with (the manifest's `quality` record: the run's, or the
last `score`'s), else the run's config's, with `--set quality.…=…` overrides on top. The
annotators are the run's: same parameters, and the weights the run recorded (hub models at the
recorded commit; a local directory must still hold the same files). Every sample of `samples/` and
`rejected/` is scored again; each part file is rewritten atomically under its own name, the rows
that fail going to `rejected/<same name>` with `action: drop` (and rows that now pass coming back),
so an interrupted `score` leaves whole files and running it again finishes the job. `errors/` is
left as it is. The manifest gets the new counts and a `quality` record; the documents are rebuilt.
"""

from __future__ import annotations

import copy
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline.config import (
    AnnotatorConfig,
    ConfigError,
    JobConfig,
    QualityConfig,
    apply_override,
    check_quality,
    error_lines,
)
from pipeline.generators import DEFAULT_FAMILY
from pipeline.io.output import RunOutput, write_parquet
from pipeline.models import ModelUnavailable, ResolvedModel, resolve_model
from pipeline.schema import IMAGE, normalized, samples_schema
from pipeline.scorers.stage import Gate, gate_settings

REDACTED = "<redacted>"


class NotScorable(ValueError):
    """An output that cannot be scored (annotate-only, unfinished, no quality section)."""


@dataclass(frozen=True)
class Scoring:
    """What scoring needs of a run's config: the gate (quality section, annotators) and a few generation
    settings. Read from the manifest section by section, not as a whole job config: the manifest's
    config is redacted and carries values the validators derive, so it need not validate as a whole."""

    gate: Gate
    family: str
    variants: int
    local_files_only: bool
    captioner: bool  # the rows carry the captioner's record (a column the rewritten files keep)


def _config(manifest: dict[str, Any], overrides: list[str]) -> Scoring:
    from pydantic import ValidationError

    data = _unredacted(copy.deepcopy(manifest.get("config") or {}))
    generation = data.get("generation")
    if not generation:
        raise NotScorable("the output holds no generated images (an annotate-only run): nothing to score")
    last = gate_settings(manifest.get("quality"))
    if last:  # the output was scored: start from the thresholds it was last gated with
        data["quality"] = {**(data.get("quality") or {}), **last}
    for assignment in overrides:
        if "=" not in assignment:
            raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. quality.min.canny=0.3")
        if not assignment.strip().startswith("quality."):
            raise ConfigError(f"--set {assignment!r}: only keys of the quality section can change when scoring")
        apply_override(data, assignment, JobConfig)
    if not data.get("quality"):
        raise NotScorable("the run has no quality section: give one with --set, e.g. --set quality.min.canny=0.3 "
                          "--set quality.action=drop")
    try:
        annotators = [AnnotatorConfig.model_validate(a) for a in data.get("annotators", [])]
        quality = QualityConfig.model_validate(data["quality"])
        check_quality(quality, {a.key: a.name for a in annotators}, True)
    except ValidationError as e:
        raise ConfigError(f"invalid quality settings: {error_lines(e, 'quality.')[0]}") from None
    except ValueError as e:
        raise ConfigError(f"invalid quality settings: {e}") from None
    return Scoring(Gate(quality, annotators), generation.get("family") or DEFAULT_FAMILY,
                   int(generation.get("variants_per_image") or 1), bool(generation.get("local_files_only")),
                   data.get("captioner") is not None)


def _unredacted(value: Any) -> Any:
    """The manifest's config without the values its redaction replaced (credentials, and fields that share
    their names, such as generation.prompt.key): they fall back to their defaults, which scoring never reads."""
    if isinstance(value, dict):
        return {k: _unredacted(v) for k, v in value.items() if v != REDACTED}
    if isinstance(value, list):
        return [_unredacted(v) for v in value]
    return value


def _annotator_models(cfg: Scoring, manifest: dict[str, Any]) -> dict[str, ResolvedModel | None]:
    """The weights the run used for each scored condition's annotator, checked to be the same."""
    from pipeline.annotators import ANNOTATORS
    from pipeline.scorers.stage import scored_conditions

    recorded = (manifest.get("models") or {}).get("annotators") or {}
    models: dict[str, ResolvedModel | None] = {}
    for c in scored_conditions(cfg.gate):
        rec = recorded.get(c.key)
        if rec is None:
            models[c.key] = None
            continue
        cls = ANNOTATORS[c.cfg.name]
        local = rec.get("local_dir")
        model = resolve_model(local or rec["model"], rec.get("revision") if local else rec["commit"], cls.files[0],
                              cfg.local_files_only, cls.files)
        if model.commit != rec["commit"]:
            raise ModelUnavailable(f"annotator {c.key}: the weights in {local} changed since the run "
                                   f"({rec['commit']} then, {model.commit} now); scoring needs the run's weights")
        models[c.key] = model
    return models


def _rows_for_scoring(rows: list[dict]) -> list[dict]:
    """Rows as the stages carry them: image columns as PNG bytes."""
    return [{k: v["bytes"] if isinstance(v, dict) and set(v) == {"bytes", "path"} else v for k, v in row.items()}
            for row in rows]


def score_output(url: str, overrides: list[str] = (), storage_options: dict[str, Any] | None = None,
                 echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Score every sample of a run's output; returns the new counts."""
    from pipeline.annotators import ANNOTATORS
    from pipeline.docs import write_documents
    from pipeline.io.lock import RunLock
    from pipeline.job import scorer_models
    from pipeline.provenance import new_run_id
    from pipeline.scorers.stage import PASSED_COLUMN, Scorer, quality_record, score_columns

    out = RunOutput(url, storage_options)
    manifest = out.manifest()
    lock = RunLock(out, new_run_id())
    lock.refuse_if_held()  # a run writing it now: not "run the job again"
    if not manifest.get("completed"):
        raise NotScorable(f"{url}: the run did not finish; run the same job again to complete it, then score it")
    cfg = _config(manifest, list(overrides))
    q = cfg.gate.quality
    scorer = Scorer(cfg.gate, _annotator_models(cfg, manifest), scorer_models(q, cfg.local_files_only).get("clip"),
                    scored_by="python -m pipeline score")
    control_ids = [a.key for a in cfg.gate.annotators]
    keypoint_ids = [a.key for a in cfg.gate.annotators if ANNOTATORS[a.name].keypoints]
    schema = samples_schema(control_ids, keypoint_ids, cfg.family, score_columns(cfg.gate), captioner=cfg.captioner)
    images = {f.name for f in schema if f.type == IMAGE}
    if out.normalized:  # the rows are read with their sources' columns; written back without them
        schema = normalized(schema)[0]

    with lock:  # no run writes into the output meanwhile
        names = sorted({posixpath.basename(p) for kind in ("samples", "rejected") for p in out.files(kind)})
        if q.action == "drop":
            out.fs.makedirs(out.path("rejected"), exist_ok=True)
        for name in names:
            rows: dict[str, dict] = {}
            for kind in ("samples", "rejected"):  # a row in both (an interrupted score) is one sample
                if out.exists(f"{kind}/{name}"):
                    table = out.read_file(out.path(f"{kind}/{name}"), None)
                    rows.update({r["sample_id"]: r for r in table.to_pylist()})
            ordered = list(rows.values())
            scored = []
            for start in range(0, len(ordered), q.batch_size):
                batch = ordered[start:start + q.batch_size]
                for row, new in zip(batch, scorer.score(_rows_for_scoring(batch))):
                    scored.append({**row, **{k: v for k, v in new.items() if k not in images}})
            keep = [r for r in scored if q.action == "flag" or r[PASSED_COLUMN]]
            reject = [r for r in scored if q.action == "drop" and not r[PASSED_COLUMN]]
            for kind, part in (("rejected", reject), ("samples", keep)):
                path = out.path(f"{kind}/{name}")
                if part:
                    write_parquet(out.fs, path, pa.Table.from_pylist(part, schema=schema))
                elif out.fs.exists(path):
                    out.fs.rm(path)
        if q.action == "flag" and out.fs.isdir(out.path("rejected")) and not out.files("rejected"):
            out.fs.rm(out.path("rejected"), recursive=True)
        written = out.written()
        manifest["counts"] = written.counts(cfg.variants)
        manifest["files"] = written.files
        manifest["quality"] = quality_record(q, "python -m pipeline score")
        out.write_json("manifest.json", manifest)
        write_documents(url, storage_options)
    counts = manifest["counts"]
    echo(f"scored {counts['samples'] + counts.get('rejected_samples', 0)} samples of {url}: {counts['samples']} in "
         f"samples/" + (f", {counts.get('rejected_samples', 0)} below the thresholds in rejected/"
                        if q.action == "drop" else f", {sum_failed(out)} flagged passed=false"))
    return counts


def sum_failed(out: RunOutput) -> int:
    table = out.read("samples", ["passed"])
    return 0 if table is None else table.column("passed").to_pylist().count(False)
