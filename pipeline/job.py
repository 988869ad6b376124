"""The job: wire the stages from a config into one streaming Ray Dataset, run it, write the manifest.

Reads top to bottom like the data flow:
sources -> decode -> annotate (one stage per annotator) -> expand variants -> generate -> write.
"""

from __future__ import annotations

import posixpath
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

import ray

from pipeline.annotators import ANNOTATORS
from pipeline.config import JobConfig
from pipeline.generate import Generate
from pipeline.models import ResolvedModel, resolve_model
from pipeline.provenance import code_version, library_versions, new_run_id, write_json
from pipeline.sinks import SplitParquetSink
from pipeline.sources import filesystem, read_source
from pipeline.stages import Annotate, Decode, ExpandVariants

SECRET_KEY = re.compile(r"key|secret|token|password|credential|session", re.IGNORECASE)


class OutputExists(RuntimeError):
    """The output path already holds a run and the config does not say to overwrite it."""


@dataclass(frozen=True)
class Models:
    annotators: dict[str, ResolvedModel | None]  # annotator id -> weights (None: weight-free)
    base: ResolvedModel
    controlnets: list[ResolvedModel]

    def provenance(self) -> dict[str, Any]:
        return {
            "base_model": self.base.provenance(),
            "controlnets": [m.provenance() for m in self.controlnets],
            "annotators": {k: m.provenance() if m else None for k, m in self.annotators.items()},
        }


@dataclass(frozen=True)
class RunResult:
    run_id: str
    output: str
    inputs: int
    samples: int
    errors: int
    seconds: float
    manifest: dict[str, Any]

    def summary(self) -> str:
        rate = self.samples / self.seconds if self.seconds else 0.0
        return (f"run {self.run_id}: {self.samples} samples, {self.errors} errors from {self.inputs} inputs "
                f"in {self.seconds:.1f}s ({rate:.2f} images/s) -> {self.output}")


def resolve_models(cfg: JobConfig) -> Models:
    """Resolve every model the job needs, before any data moves (fails fast with ModelUnavailable)."""
    gen = cfg.generation
    annotators = {}
    for a in cfg.annotators:
        cls = ANNOTATORS[a.name]
        model = a.model or cls.default_model
        annotators[a.key] = resolve_model(model, a.revision, cls.weights_file, gen.local_files_only) if model else None
    return Models(
        annotators=annotators,
        base=resolve_model(gen.base_model, gen.revision, "model_index.json", gen.local_files_only),
        controlnets=[resolve_model(cn.model, cn.revision, "config.json", gen.local_files_only) for cn in gen.controlnets],
    )


def actor_cpus(cfg: JobConfig, models: Models, gpus: float, cpus: float) -> dict[str, float]:
    """CPUs each actor claims, scaled down if the actors would leave no CPU for read and decode tasks."""
    wanted = {a.key: a.num_cpus for a in cfg.annotators if models.annotators[a.key] and not (gpus and a.num_gpus)}
    if not (gpus and cfg.generation.num_gpus):
        wanted["generate"] = cfg.generation.num_cpus
    total = sum(wanted.values())
    budget = max(cpus - 1, 0.5)
    scale = min(1.0, budget / total) if total else 1.0
    return {k: round(v * scale, 3) for k, v in wanted.items()}


def build_dataset(cfg: JobConfig, models: Models) -> ray.data.Dataset:
    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 1.0)
    cpu_share = actor_cpus(cfg, models, gpus, cpus)

    ds = read_source(cfg.source)
    ds = ds.map_batches(Decode(cfg.image, cfg.source.storage_options), batch_format="pyarrow", batch_size=16)
    for a in cfg.annotators:
        model = models.annotators[a.key]
        if model is None:
            ds = ds.map_batches(Annotate(a, None), batch_format="pyarrow", batch_size=a.batch_size)
        else:
            ds = ds.map_batches(
                Annotate,
                fn_constructor_kwargs={"cfg": a, "model": model},
                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=a.actors),
                batch_size=a.batch_size,
                batch_format="pyarrow",
                **({"num_gpus": a.num_gpus} if gpus and a.num_gpus else {"num_cpus": cpu_share[a.key]}),
            )
    gen = cfg.generation
    ds = ds.map_batches(ExpandVariants(cfg.seed, gen.variants_per_image, gen.prompt), batch_format="pyarrow")
    return ds.map_batches(
        Generate,
        fn_constructor_kwargs={"gen": gen, "base": models.base, "controlnets": models.controlnets},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=gen.actors),
        batch_size=gen.batch_size,
        batch_format="pyarrow",
        **({"num_gpus": gen.num_gpus} if gpus and gen.num_gpus else {"num_cpus": cpu_share["generate"]}),
    )


def prepare_output(cfg: JobConfig) -> None:
    fs, root = filesystem(cfg.output.path, cfg.output.storage_options)
    existing = [p for p in ("manifest.json", "samples", "errors") if fs.exists(posixpath.join(root, p))]
    if existing and not cfg.output.overwrite:
        raise OutputExists(f"output.path {cfg.output.path} already holds a run ({', '.join(existing)}); "
                           f"choose another path or set output.overwrite=true")
    for p in existing:
        fs.rm(posixpath.join(root, p), recursive=True)
    fs.makedirs(root, exist_ok=True)


def redacted(value: Any) -> Any:
    """The config as data, with storage secrets replaced."""
    if isinstance(value, dict):
        return {k: "<redacted>" if SECRET_KEY.search(str(k)) and v else redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redacted(v) for v in value]
    return value


def run(cfg: JobConfig, models: Models | None = None, echo: Callable[[str], None] = print) -> RunResult:
    """Run a job on the Ray instance this process is connected to (one is started if none is)."""
    models = models or resolve_models(cfg)
    prepare_output(cfg)
    run_id, started = new_run_id(), datetime.now(timezone.utc)
    control_ids = [a.key for a in cfg.annotators]
    version = code_version()
    sink = SplitParquetSink(cfg.output.path, cfg.output.storage_options, run_id, version, control_ids,
                            cfg.output.rows_per_file)
    echo(f"run {run_id}: {cfg.source.path} -> {cfg.output.path}")
    t0 = time.perf_counter()
    ds = build_dataset(cfg, models)
    ds.write_datasink(sink)
    seconds = time.perf_counter() - t0

    totals = sink.totals
    variants = cfg.generation.variants_per_image
    # every input ends as one error row before expansion, or as `variants` rows (samples or errors) after it
    inputs = totals["errors"] - totals["expanded_errors"] + (totals["samples"] + totals["expanded_errors"]) // variants
    stats = ds.stats()
    manifest = {
        "run_id": run_id,
        "completed": True,
        "started_at": started.isoformat(),
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "code_version": version,
        "versions": library_versions(),
        "config": redacted(cfg.model_dump(mode="json")),
        "models": models.provenance(),
        "counts": {
            "inputs": inputs,
            "rejected_inputs": totals["errors"] - totals["expanded_errors"],
            "samples": totals["samples"],
            "failed_samples": totals["expanded_errors"],
            "errors": totals["errors"],
            "errors_by_stage": totals["errors_by_stage"],
        },
        "timings": {"total_s": round(seconds, 3), "samples_per_s": round(totals["samples"] / seconds, 4) if seconds else None},
        "files": totals["files"],
    }
    fs, root = filesystem(cfg.output.path, cfg.output.storage_options)
    with fs.open(posixpath.join(root, "stats.txt"), "w") as f:
        f.write(stats + "\n")
    write_json(posixpath.join(cfg.output.path, "manifest.json"), manifest, cfg.output.storage_options)
    from pipeline.report import write_documents  # report.html, README.md, croissant.json: read the output back

    try:
        write_documents(cfg.output.path, cfg.output.storage_options)
    except Exception as e:  # noqa: BLE001 - the run's data and manifest are written; the documents can be rebuilt
        echo(f"warning: could not write the run's report: {type(e).__name__}: {e} "
             f"(rebuild with `python -m pipeline report {cfg.output.path}`)")
    return RunResult(run_id, cfg.output.path, inputs, totals["samples"], totals["errors"], seconds, manifest)
