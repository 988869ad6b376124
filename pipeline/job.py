"""The job: wire the stages from a config into one streaming Ray Dataset, run it, write the manifest.

Reads top to bottom like the data flow:
sources -> decode -> annotate (one stage per annotator) -> expand variants -> generate -> write.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Callable

import ray

from pipeline.annotators import ANNOTATORS
from pipeline.annotators.stage import Annotate
from pipeline.captioners import CAPTIONERS
from pipeline.captioners.stage import Caption
from pipeline.cpus import cpus_of
from pipeline.config import JobConfig, QualityConfig
from pipeline.console import Bar, start_progress, timed
from pipeline.generators import flat, generator_class
from pipeline.io.images import Decode
from pipeline.io.output import RunOutput, Written
from pipeline.io.lock import RunLock
from pipeline.io.resume import FirstCopy, Output, OutputExists, SkipWritten, fingerprint, job_identity, open_output
from pipeline.io.sink import SplitParquetSink
from pipeline.io.sources import Listing, check_columns, list_inputs, read_source, source_extensions
from pipeline.models import ModelUnavailable, ResolvedModel, pickle_only_weights, resolve_model, weights_problem
from pipeline.provenance import code_version, library_versions, new_run_id, redacted
from pipeline.schema import samples_schema
from pipeline.scorers.stage import Score, gate_settings, needs_actor, quality_record, score_columns
from pipeline.variants import ExpandVariants, load_prompt_file

DECODE_BATCH = 4  # inputs per decode task, and so per block through the actor stages
WRITE_INPUTS = 16  # inputs' rows per write task (at least; a file holds at most output.rows_per_file rows)


@dataclass(frozen=True)
class Models:
    annotators: dict[str, ResolvedModel | None]  # annotator id -> weights (None: weight-free)
    generation: dict[str, Any]  # the generator's models by manifest key (empty: an annotate-only job)
    scorers: dict[str, ResolvedModel] = field(default_factory=dict)  # quality gate models ("clip"), if any
    captioner: ResolvedModel | None = None  # the captioning model, if the job has a captioner section

    def provenance(self) -> dict[str, Any]:
        generation = {k: [m.provenance() for m in v] if isinstance(v, list) else v.provenance()
                      for k, v in self.generation.items()}
        # an annotate-only job records no base model and no ControlNets, as it always has
        return (generation or {"base_model": None, "controlnets": []}) | {
            "annotators": {k: m.provenance() if m else None for k, m in self.annotators.items()}} | (
            {"scorers": {k: m.provenance() for k, m in self.scorers.items()}} if self.scorers else {}) | (
            {"captioner": self.captioner.provenance()} if self.captioner else {})


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
        """One line: what this run added (and, after a resume, what the output holds in all)."""
        added = self.manifest.get("this_run", {}).get("samples", self.samples)
        rate = added / self.seconds if self.seconds else 0.0
        runs = len(self.manifest.get("runs", [])) > 1
        what = (f"added {added} samples ({self.samples} in all), {self.errors} errors from {self.inputs} inputs"
                if runs else f"{self.samples} samples, {self.errors} errors from {self.inputs} inputs")
        if (below := self.manifest.get("counts", {}).get("rejected_samples")) is not None:
            what += f" ({below} samples below the quality thresholds in rejected/)"
        return f"run {self.run_id}: {what} in {self.seconds:.1f}s ({rate:.2f} samples/s) -> {self.output}"


def resolve_models(cfg: JobConfig) -> Models:
    """Resolve every model the job needs, before any data moves (fails fast with ModelUnavailable)."""
    gen = cfg.generation
    local_only = gen.local_files_only if gen else False
    annotators = {}
    for a in cfg.annotators:
        cls = ANNOTATORS[a.name]
        model = a.model or cls.default_model
        with named(f"annotator {a.key}"):
            annotators[a.key] = resolve_model(model, a.revision, cls.files[0], local_only, cls.files) if model else None
    captioner = captioner_model(cfg)
    if gen is None:
        return Models(annotators, {}, captioner=captioner)
    pickles = ("*.bin", "*.ckpt", "*.pt", "*.pth") if gen.allow_pickle else ()
    passed = ("controlnet", *getattr(generator_class(gen.family), "pipeline_kwargs", {}))  # given to the loader

    def resolve(ref):
        with named(f"generation {ref.role}"):
            model = resolve_model(ref.model, ref.revision, ref.probe, local_only, (*ref.patterns, *pickles))
            if not gen.allow_pickle and (pickled := pickle_only_weights(model)):
                raise ModelUnavailable(
                    f"model {model.model!r} has pickle weights only ({', '.join(pickled[:3])}); pickle can run code "
                    f"when loaded. Convert them to safetensors, or set generation.allow_pickle=true if you trust the "
                    f"source")
            check_weights(model, gen.allow_pickle, passed)
            return model

    refs = generator_class(gen.family).model_refs(gen)
    models = Models(annotators, {k: [resolve(r) for r in v] if isinstance(v, list) else resolve(v) for k, v in refs.items()},
                    scorer_models(cfg.quality, local_only), captioner)
    generator_class(gen.family).check_models(gen, models.generation)
    return models


def model_roles(cfg: JobConfig, models: Models) -> list[tuple[str, ResolvedModel | None]]:
    """Every model of the job with its role, as start-up errors name it (`generation controlnet hed`)."""
    roles: list[tuple[str, ResolvedModel | None]] = [(f"annotator {k}", m) for k, m in models.annotators.items()]
    if models.captioner:
        roles.append(("captioner", models.captioner))
    if cfg.generation:
        refs = flat(generator_class(cfg.generation.family).model_refs(cfg.generation))
        roles += [(f"generation {r.role}", m) for r, m in zip(refs, flat(models.generation))]
    return roles + [(f"quality {k}_model", m) for k, m in models.scorers.items()]


def check_weights(model: ResolvedModel, allow_pickle: bool = False, passed: tuple[str, ...] = (),
                  processor: bool = False) -> None:
    """Raise ModelUnavailable where a local model directory cannot load (models.weights_problem)."""
    if problem := weights_problem(model, allow_pickle, passed, processor):
        raise ModelUnavailable(f"model {model.model!r} cannot load: {problem}")


@contextlib.contextmanager
def named(role: str):
    """A model that cannot be resolved is named by its role in the job (`annotator hed`, `generation base_model`)."""
    try:
        yield
    except ModelUnavailable as e:
        raise ModelUnavailable(f"{role}: {e}") from None


def scorer_models(quality: QualityConfig | None, local_only: bool = False) -> dict[str, ResolvedModel]:
    """The quality gate's own models (the CLIP model, when configured); its annotators are the job's."""
    if quality is None or not quality.clip_model:
        return {}
    from pipeline.scorers.clip import FILES, PROBE

    with named("quality clip_model"):
        model = resolve_model(quality.clip_model, quality.clip_revision, PROBE, local_only, FILES)
        check_weights(model, processor=True)  # it reads prompts and images
    return {"clip": model}


def captioner_model(cfg: JobConfig) -> ResolvedModel | None:
    """The captioning model (safetensors only), when the job has a captioner section."""
    c = cfg.captioner
    if c is None:
        return None
    cls = CAPTIONERS[c.kind]
    with named("captioner"):
        model = resolve_model(c.model, c.revision, cls.probe, c.local_files_only, cls.files)
        check_weights(model, processor=True)  # it reads images and writes words
    return model


def on_gpu(section, gpus: float) -> bool:
    """Whether a stage's actors (annotator, captioner, generation or quality section) claim GPUs: the cluster
    has some and the section asks for them (`num_gpus`); otherwise they run on CPUs."""
    return bool(gpus and section.num_gpus)


def actor_cpus(cfg: JobConfig, models: Models, gpus: float, cpus: float, node: float | None = None) -> dict[str, float]:
    """CPUs each actor claims, scaled down if the actors would leave no CPU for read and decode tasks.
    `node`: the CPUs of the largest node (what generation's `num_cpus: auto` means)."""
    wanted = {a.key: a.num_cpus for a in cfg.annotators if models.annotators[a.key] and not on_gpu(a, gpus)}
    if cfg.captioner and not on_gpu(cfg.captioner, gpus):
        wanted["caption"] = cfg.captioner.num_cpus
    if cfg.generation and not on_gpu(cfg.generation, gpus):
        wanted["generate"] = cpus_of(cfg.generation.num_cpus, node or cpus)
    if cfg.quality and needs_actor(cfg, models.annotators) and not on_gpu(cfg.quality, gpus):
        wanted["score"] = cfg.quality.num_cpus
    total = sum(wanted.values())
    budget = max(cpus - 1, 0.5)
    scale = min(1.0, budget / total) if total else 1.0
    # rounded down: shares rounded up can add up to more than the budget and leave a decode task
    # (1 CPU) unschedulable, which hangs the job (3 actors of 0.323 CPU on 2 CPUs did)
    return {k: int(v * scale * 1000) / 1000 for k, v in wanted.items()}


def _nothing_written(source_sha256: str) -> bool:
    return False


def build_dataset(cfg: JobConfig, models: Models, written: Written | None = None,
                  listing: Listing | None = None, progress=None) -> ray.data.Dataset:
    """The job's Dataset; with `written` (an earlier run's output) the work it holds is skipped. Every
    stage is timed per batch and reports to `progress` (a console.Progress actor; one is started when not
    given), which also keeps the first input of each content for the dedupe stage."""
    progress = progress or start_progress()
    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 1.0)
    node = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]), default=cpus)
    cpu_share = actor_cpus(cfg, models, gpus, cpus, node)
    gen = cfg.generation
    variants = gen.variants_per_image if gen else 1
    skip = None
    if written is not None:
        done = ray.put((written.done_samples, written.done_sources, written.source_rows))
        skip = SkipWritten(done, cfg.seed, variants, after_decode=True)

    def stage(ds: ray.data.Dataset, name: str, fn, before=None, **kw) -> ray.data.Dataset:
        return ds.map_batches(timed(name, fn, progress, before), batch_format="pyarrow", **kw)

    # Cheap stages (weight-free annotators) run inside the CPU actor stage after them: Ray Data fuses a task
    # stage into the actor stage that follows when both claim the same resources. That spares a process each,
    # and their rows no longer wait for a whole free CPU (what a task claims) on a laptop whose actors hold all
    # but one. CPU work stays out of GPU actors. (Variant expansion runs in the generator's actors: see there.)
    cheap: list[tuple[str, Any, dict]] = []

    def actor(ds: ray.data.Dataset, name: str, cls, kwargs: dict, pool, batch_size: int, resources: dict, before=None):
        for cheap_name, fn, kw in cheap:
            ds = stage(ds, cheap_name, fn, **kw, **({} if "num_gpus" in resources else resources))
        cheap.clear()
        return stage(ds, name, cls, before, fn_constructor_kwargs=kwargs, compute=pool, batch_size=batch_size,
                     **resources)

    def claim(section, key: str) -> dict:
        return {"num_gpus": section.num_gpus} if on_gpu(section, gpus) else {"num_cpus": cpu_share[key]}

    ds = read_source(cfg.source, listing, cfg.image.max_bytes)
    if skip is not None:
        ds = stage(ds, "skip-written", SkipWritten(done, cfg.seed, variants, after_decode=False))
    # small blocks: an actor stage hands a block on when all of its rows are done (a block of 16 inputs held
    # the first generated images of a 256-px job back by 7 s behind 16 HED maps); the sink writes several
    ds = stage(ds, "decode", Decode(cfg.image, cfg.source.storage_options, cfg.source.extensions),
               batch_size=DECODE_BATCH)
    if skip is not None:
        ds = stage(ds, "skip-decoded", skip)
    ds = stage(ds, "dedupe", FirstCopy(progress))  # fused into decoding; the Progress actor sees every input
    if (c := cfg.captioner) is not None:
        ds = actor(ds, "caption", Caption, {"cfg": c, "model": models.captioner},
                   ray.data.ActorPoolStrategy(min_size=1, max_size=c.actors), c.batch_size, claim(c, "caption"))
    for a in cfg.annotators:
        model = models.annotators[a.key]
        if model is None:
            cheap.append((f"annotate:{a.key}", Annotate(a, None), {"batch_size": a.batch_size}))
        else:
            ds = actor(ds, f"annotate:{a.key}", Annotate, {"cfg": a, "model": model},
                       ray.data.ActorPoolStrategy(min_size=1, max_size=a.actors), a.batch_size, claim(a, a.key))
    image_prompts = ray.put(load_prompt_file(gen.prompt, cfg.source.storage_options)) if gen and gen.prompt.file else None
    source_written = (skip.source_done if skip else _nothing_written) if cfg.output.layout == "normalized" else None
    expand = ExpandVariants(cfg.seed, variants, gen.prompt if gen else None, skip.variant_done if skip else None,
                            image_prompts, source_written)
    if gen is None:
        for cheap_name, fn, kw in [*cheap, ("expand", expand, {"batch_size": 1})]:
            ds = stage(ds, cheap_name, fn, **kw)
        return ds
    # The generator's batches are inputs, each expanded into its variants in the actor first (row bookkeeping:
    # ids, seeds, prompts; timed as its own stage): as many inputs as make one pipeline call's samples. Fused in
    # front as a task stage, expansion made Ray Data hand the actor a call's worth of *inputs* per task (it
    # bundles a fused stage's input by the largest batch size in it), so the first call waited for `variants`
    # times the annotated inputs it needed (a mid-size CPU job: the generator idle ~2 s at its start, the run
    # ~5% longer).
    # Two batches in each generator actor at once: its lanes take their pipeline calls in turn (one at a time on
    # a GPU), so no lane waits for the other at the end of a batch, and a batch's rows are read and its images
    # encoded while the other generates.
    samples = gen.calls_of("cuda" if on_gpu(gen, gpus) else "cpu")
    ds = actor(ds, "generate", generator_class(gen.family),
               {"gen": gen, "models": models.generation, "progress": progress},
               ray.data.ActorPoolStrategy(min_size=1, max_size=gen.actors, max_concurrent_calls_per_actor=2,
                                          enable_true_multi_threading=True),
               max(1, samples // variants), claim(gen, "generate"), before=timed("expand", expand, progress))
    q = cfg.quality
    if q is None:
        return ds
    score_args = {"cfg": cfg, "annotator_models": models.annotators, "clip_model": models.scorers.get("clip")}
    if not needs_actor(cfg, models.annotators):  # weight-free annotators and sharpness only: Ray tasks
        return stage(ds, "score", Score(**score_args), batch_size=q.batch_size)
    return actor(ds, "score", Score, score_args | {"num_cpus": q.num_cpus},
                 ray.data.ActorPoolStrategy(min_size=1, max_size=q.actors),
                 q.batch_size, claim(q, "score"))


@dataclass
class Plan:
    """What a run will do, decided before Ray starts: the inputs (listed once), the output (validated,
    locked), and whether an earlier run of the same job is resumed or already complete."""

    cfg: JobConfig
    models: Models
    identity: dict[str, Any]
    listing: Listing
    target: Output
    lock: RunLock
    regated: bool = False  # the quality settings are those the output was last gated with, not the job's
    rows: int | None = None  # a Parquet source's rows (its footers'), each an input

    @property
    def inputs_key(self) -> str:
        """The listed inputs (names, sizes, modification stamps) and how many of them the job reads."""
        return f"{self.listing.digest}:{self.cfg.source.limit}"

    @property
    def expected_inputs(self) -> int | None:
        """Inputs this run will process, where the source says before reading (image files; a resume
        counts the inputs with nothing written yet as whole ones)."""
        if self.cfg.source.type != "images":
            return None
        return self.remaining(len(self.listing.limited(self.cfg.source.limit)))

    def remaining(self, inputs: int) -> int:
        """Of the `inputs` the job reads, those without anything written yet (a resume counts the inputs with
        nothing written as whole ones)."""
        variants = self.cfg.generation.variants_per_image if self.cfg.generation else 1
        written = self.target.written
        return max(0, inputs - len(written.done_sources) - len(written.done_samples) // variants)

    @property
    def complete(self) -> bool:
        """An earlier run of this job finished on exactly these inputs: there is nothing to do."""
        manifest = self.target.manifest or {}
        return bool(manifest.get("completed")) and manifest.get("inputs_key") == self.inputs_key


def prepare(cfg: JobConfig, models: Models | None = None, dry_run: bool = False, retry_errors: bool = False) -> Plan:
    """Check the source and the output before anything is written or deleted, take the output's lock,
    and open it (fresh, resumed, a new version, or refused). Needs no Ray. Release `plan.lock` when done.
    `dry_run`: decide the same without locking, deleting or creating anything. `retry_errors`: the error rows of
    the same job's earlier run are removed, so their inputs and samples are done again (see `retry`)."""
    models = models or resolve_models(cfg)
    listing = list_inputs(cfg.source, source_extensions(cfg.source))  # SourceError: nothing is touched
    rows = check_columns(cfg.source, listing)
    prompts = None
    if cfg.generation and cfg.generation.prompt.file:  # a prompts file that cannot be used: also nothing
        prompts = load_prompt_file(cfg.generation.prompt, cfg.source.storage_options)
    output = RunOutput(cfg.output.path, cfg.output.storage_options)
    if (blocking := output.file_in_the_way()) is not None:
        raise OutputExists(f"output.path {cfg.output.path}: {blocking} is a file, not a directory")
    identity = redacted(job_identity(cfg, models.provenance()))  # credentials may change between runs
    if prompts is not None:  # the file's prompts decide the samples as much as the config does
        identity["prompts_file_sha256"] = hashlib.sha256(json.dumps(prompts, sort_keys=True).encode()).hexdigest()
    lock = RunLock(output, new_run_id())
    try:
        if not dry_run:
            lock.acquire()
    except PermissionError as e:
        raise OutputExists(f"output.path {cfg.output.path} is not writable: {e.strerror or e}") from None
    try:
        target = open_output(cfg, identity, dry_run)
        if target.resuming and cfg.source.type == "parquet":
            check_row_names(target, cfg.output.path)
        if retry_errors and target.resuming and target.written.errors:
            target = retry(target, cfg.output.storage_options, dry_run)
    except BaseException:
        lock.release()
        raise
    if target.path != cfg.output.path:
        cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"path": target.path})})
    gate = regated(target.manifest, cfg.quality) if target.resuming else None
    if gate is not None:
        quality = QualityConfig.model_validate({**(cfg.quality.model_dump() if cfg.quality else {}), **gate})
        cfg = cfg.model_copy(update={"quality": quality})
        models = replace(models, scorers=scorer_models(quality, cfg.generation.local_files_only))
    return Plan(cfg, models, identity, listing, target, lock, regated=gate is not None, rows=rows)


def regated(manifest: dict[str, Any] | None, quality: QualityConfig | None) -> dict[str, Any] | None:
    """The quality settings an output was last gated with, where they are not the job's own `quality` (`python -m
    pipeline score` re-gated it, and the runs that resumed it since kept that), else None. A resume gates its new
    samples the same way: with the job's settings (other thresholds, or no gate at all) the output would hold
    samples kept by two rules, and part files with and without the score columns."""
    last = gate_settings((manifest or {}).get("quality"))
    own = gate_settings(quality_record(quality, "")) if quality else {}
    return last if last and last != own else None


def check_row_names(target: Output, path: str) -> None:
    """A Parquet source's rows are named `<file>#row=<i>...`; an output written before were named `<file>#<name>` or
    `<file>#sha256=...` (or by a path cell's file): resumed, each of its finished inputs would come again under its
    new name and be a duplicate of itself. Refused (OutputExists) with what to do."""
    import re

    written = target.written
    for row in written.samples + written.errors + written.rejected:
        uri = row["source_uri"] or ""
        if re.search(r"\.parquet#row=\d", uri, re.IGNORECASE):
            continue
        raise OutputExists(f"output.path {path} was written by an earlier version, which named Parquet rows otherwise "
                           f"({uri}): a resume would take its inputs for new ones; set output.overwrite=true to start "
                           f"over, or output.new_version=true to write next to it")


def retry(target: Output, storage_options: dict[str, Any], dry_run: bool) -> Output:
    """The same job's output without its error rows (errors/ removed, under the lock), to be resumed: their inputs
    and samples are done again, and fail again as new error rows where the cause is still there (a read that timed
    out, a worker that ran out of memory: Ray retries those within a run, not across runs). The manifest says the
    run has not completed before the rows go, so a stop meanwhile (Ray not starting, Ctrl-C) loses nothing: what
    has no row is what the next run of the job does."""
    if not dry_run:
        output = RunOutput(target.path, storage_options)
        output.write_json("manifest.json", target.manifest | {"completed": False})
        output.fs.rm(output.path("errors"), recursive=True)
        return Output(target.path, target.manifest | {"completed": False}, output.written())
    return Output(target.path, target.manifest | {"completed": False}, replace(target.written, errors=[]))


def run(cfg: JobConfig, models: Models | None = None, echo: Callable[[str], None] = print,
        retry_errors: bool = False) -> RunResult:
    """Run a job on the Ray instance this process is connected to (one is started if none is).

    Into an output path holding an interrupted run of the same job, it resumes: what is written
    stays, the rest is done; a run of the same job that finished on the same inputs is left as it is
    (`retry_errors`: but for its error rows, done again)."""
    plan = prepare(cfg, models, retry_errors=retry_errors)
    try:
        return finished(plan, echo) if plan.complete else execute(plan, echo)
    finally:
        plan.lock.release()


def finished(plan: Plan, echo: Callable[[str], None] = print) -> RunResult:
    """The result of the earlier run that completed this job; nothing is written."""
    manifest = plan.target.manifest
    counts = manifest["counts"]
    echo(f"{plan.cfg.output.path} is complete: run {manifest['run_id']} wrote this job on these inputs; "
         f"nothing to do" + (f" ({counts['errors']} error rows: --retry-errors does their inputs and samples again)"
                             if counts["errors"] else ""))
    return RunResult(manifest["run_id"], plan.cfg.output.path, counts["inputs"], counts["samples"], counts["errors"],
                     0.0, manifest)


def execute(plan: Plan, echo: Callable[[str], None] = print, bar: bool = False) -> RunResult:
    """Run the planned job on Ray (started if this process has no instance yet); `bar`: show a progress bar."""
    cfg, models, identity, target = plan.cfg, plan.models, plan.identity, plan.target
    run_id, started = plan.lock.run_id, datetime.now(timezone.utc)
    version = code_version()
    manifest: dict[str, Any] = {
        "run_id": run_id,
        "completed": False,
        "job_fingerprint": fingerprint(identity),
        "inputs_key": plan.inputs_key,
        "runs": (target.manifest or {}).get("runs", []) + [{"run_id": run_id, "started_at": started.isoformat()}],
        "started_at": started.isoformat(),
        "code_version": version,
        "versions": library_versions(),
        "config": redacted(cfg.model_dump(mode="json")),
        "job_identity": identity,
        "models": models.provenance(),
    }
    output = RunOutput(cfg.output.path, cfg.output.storage_options)
    output.write_json("manifest.json", manifest)  # marks the path as this job's, in progress
    if target.resuming:
        echo(f"run {run_id}: resuming {cfg.output.path}: {len(target.written.done_samples)} samples and "
             f"{len(target.written.done_sources)} rejected inputs already written are skipped")
        if plan.regated:
            q = cfg.quality
            bounds = [f"{k} >= {v}" for k, v in q.min.items()] + [f"{k} <= {v}" for k, v in q.max.items()]
            echo(f"  new samples are gated as `score` last gated the output ({', '.join(bounds) or 'no thresholds'}, "
                 f"{q.action}), not as the job's quality section says")
    else:
        echo(f"run {run_id}: {cfg.source.path} -> {cfg.output.path}")

    control_ids = [a.key for a in cfg.annotators]
    keypoint_ids = [a.key for a in cfg.annotators if ANNOTATORS[a.name].keypoints]
    schema = samples_schema(control_ids, keypoint_ids, cfg.generation.family if cfg.generation else None,
                            score_columns(cfg), captioner=cfg.captioner is not None)
    progress = start_progress()
    variants = cfg.generation.variants_per_image if cfg.generation else 1
    sink = SplitParquetSink(cfg.output.path, cfg.output.storage_options, run_id, version, control_ids,
                            cfg.output.rows_per_file, schema, progress,
                            reject=bool(cfg.quality and cfg.quality.action == "drop"), layout=cfg.output.layout,
                            rows_per_write=WRITE_INPUTS * variants)
    gen = cfg.generation
    if gen and gen.compile and not on_gpu(gen, ray.cluster_resources().get("GPU", 0.0)):
        echo("note: generation.compile applies on GPU workers; this run generates on CPU, eagerly")
    t0 = time.perf_counter()
    ds = build_dataset(cfg, models, target.written if target.resuming else None, plan.listing, progress)
    with Bar(progress, plan.expected_inputs, variants) if bar else contextlib.nullcontext():
        ds.write_datasink(sink, ray_remote_args={"num_cpus": 0.25})  # I/O bound: never waits behind compute
    seconds = time.perf_counter() - t0
    stages = ray.get(progress.snapshot.remote())["stages"]
    ray.kill(progress)

    written = output.written()
    counts = written.counts(cfg.generation.variants_per_image if cfg.generation else 1)
    stats = ds.stats()
    manifest.update({
        "completed": True,
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "counts": counts,
        "this_run": {"samples": sink.totals["samples"], "errors": sink.totals["errors"]}
                    | ({"rejected": sink.totals["rejected"]} if cfg.quality else {}),
        **({"quality": quality_record(cfg.quality, "run")} if cfg.quality else {}),
        "stages": stages,  # measured in each stage: batches, rows in and out, seconds of its own work
        "timings": {"total_s": round(seconds, 3),
                    "samples_per_s": round(sink.totals["samples"] / seconds, 4) if seconds else None},
        "files": written.files,
    })
    manifest["runs"][-1]["finished_at"] = manifest["finished_at"]
    output.write_text("stats.txt", stats + "\n")
    output.write_json("manifest.json", manifest)
    from pipeline.docs import write_documents  # report.html, README.md, croissant.json: read the output back

    try:
        write_documents(cfg.output.path, cfg.output.storage_options)
    except Exception as e:  # noqa: BLE001 - the run's data and manifest are written; the documents can be rebuilt
        echo(f"warning: could not write the run's report: {type(e).__name__}: {e} "
             f"(rebuild with `python -m pipeline report {cfg.output.path}`)")
    return RunResult(run_id, cfg.output.path, counts["inputs"], counts["samples"], counts["errors"], seconds, manifest)
