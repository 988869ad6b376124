"""Train a ControlNet on the pipeline's own output with Ray Train.

`run_training(cfg)` reads the pairs (run outputs or exports) through Ray Data, trains on
`num_workers` Ray Train workers (`TorchTrainer`, DDP), checkpoints to the output path, and at the
end saves the ControlNet with `save_pretrained` (safetensors) and a model card with its training
data's provenance into `OUTPUT/controlnet/`, which a generation job's `controlnets` can name. Run
the same command again after a crash and it resumes from the last checkpoint.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass
from typing import Any, Callable

from pipeline.io.output import RunOutput
from pipeline.models import ResolvedModel, resolve_model
from pipeline.train.config import TrainConfig, load_train_config
from pipeline.train.data import Source, TrainDataError, inspect_source, training_dataset

__all__ = ["NotEnoughResources", "TrainConfig", "TrainDataError", "TrainOutputExists", "TrainResult", "load_train_config",
           "run_training"]

class NotEnoughResources(ValueError):
    """The training workers would leave Ray Data no CPU to prepare their pairs with, or claim GPUs that a Ray
    instance of fixed size does not have."""


class TrainOutputExists(ValueError):
    """The output path holds a training of another config: resuming it would mix the two."""


RUN_NAME = "train"  # Ray Train's run directory under the output path; the same name resumes
# Ray Train's controller takes a worker's report (and sees the run end) when it polls the workers, every 2 s by
# default, and a worker's next report waits for that: a small run (2 workers, 8 steps, a checkpoint every 2) took
# 41-44 s with 2 s and 33-34 s with 0.5 s, idle between. 0.5 s unless set; a poll not answered in time is only
# waited on again (a worker counts as lost after RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S, 10 min).
POLL_INTERVAL = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


@dataclass(frozen=True)
class TrainResult:
    controlnet: str  # where the trained ControlNet is (save_pretrained layout)
    step: int
    loss: float | None
    metrics: dict[str, Any]


def run_training(cfg: TrainConfig, echo: Callable[[str], None] = print, cluster_grows: bool = False) -> TrainResult:
    """`cluster_grows`: Ray was joined, not started here, so an autoscaler may add the GPUs the workers claim."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.console import Steps, TrainBar, start_progress
    from pipeline.train.loop import train_loop

    base, cfg = resolved(cfg)  # ModelUnavailable before anything starts
    sources = [inspect_source(p, cfg) for p in cfg.data.paths]  # and TrainDataError
    check_resources(cfg, cluster_grows, echo)  # and NotEnoughResources
    out = RunOutput(cfg.output.path, cfg.output.storage_options)
    claim_output(cfg, base, out, echo)  # and TrainOutputExists
    for source in sources:
        if source.provenance.get("completed") is False:
            echo(f"note: {source.path}: {'made from a run that' if source.provenance['kind'] == 'export' else 'a run that'}"
                 f" has not completed (still running, or stopped): training on the pairs it holds")
    echo(f"training on {sum(s.rows for s in sources)} pairs from {len(sources)} path(s) with {cfg.num_workers} "
         f"worker(s) -> {cfg.output.path}")
    storage = ray_storage(cfg)
    os.environ.setdefault(POLL_INTERVAL, "0.5")  # read by fit(), passed on to the controller
    steps = start_progress(Steps)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "steps": steps},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker={"CPU": cfg.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(name=RUN_NAME, checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                                       **storage),
        datasets={"train": training_dataset(cfg, sources)},
    )
    with TrainBar(steps, cfg.steps, cfg.checkpoint_every):
        result = fit(trainer)
    if result.checkpoint is None:
        raise RuntimeError("training reported no checkpoint")
    with result.checkpoint.as_directory() as directory:
        metrics = json.loads(open(os.path.join(directory, "metrics.json")).read())
        save_controlnet(cfg, base, directory, sources, metrics, out)
    write_validation_page(cfg, out)
    echo(f"trained {metrics['step']} steps (loss {metrics['loss']:.4f}) -> {out.path('controlnet')}")
    return TrainResult(out.path("controlnet"), metrics["step"], metrics.get("loss"), metrics)


def fit(trainer) -> Any:
    """`trainer.fit()` on a thread of its own, so that Ctrl-C is the caller's KeyboardInterrupt. On the main thread
    Ray Train sets a SIGINT handler of its own that asks its controller to abort: in a local run the training went
    on to its last step regardless. The caller stops Ray, and the training with it; its checkpoints are kept."""
    import threading

    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - raised again on the caller's thread
            outcome["error"] = e

    thread = threading.Thread(target=target, name="ray-train-fit", daemon=True)
    thread.start()
    thread.join()  # a signal interrupts it
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def resolved(cfg: TrainConfig) -> tuple[ResolvedModel, TrainConfig]:
    """The base model resolved as generation jobs resolve theirs (a local directory, or a hub id at its
    commit), and the config the workers get: model and local paths absolute, since a Ray Train worker
    does not run in the driver's directory."""
    base = resolve_model(cfg.base_model, cfg.revision, "unet/config.json")
    net = resolve_model(cfg.controlnet, None, "config.json") if cfg.controlnet else None
    local = lambda p: p if "://" in p else os.path.abspath(os.path.expanduser(p))  # noqa: E731
    return base, cfg.model_copy(update={
        "base_model": base.load_path, "revision": base.load_revision, "controlnet": net.load_path if net else None,
        "data": cfg.data.model_copy(update={"paths": [local(p) for p in cfg.data.paths]}),
        "validation": cfg.validation.model_copy(update={"control_images": [local(p) for p in cfg.validation.control_images]}),
        "output": cfg.output.model_copy(update={"path": local(cfg.output.path)}),
    })


# What a re-run may change and still resume: how long and on what it trains, not what it learns
RESUMABLE = {"steps", "checkpoint_every", "validation", "num_workers", "use_gpu", "cpus_per_worker", "output",
             "storage_options", "precompute"}
CHECKPOINTS = f"{RUN_NAME}/checkpoint_manager_snapshot.json"  # Ray Train's record of the checkpoints it resumes from
TRAINING = ("train.json", RUN_NAME, "validation", "controlnet")  # what a training writes under its output path


def training_identity(cfg: TrainConfig, base: ResolvedModel) -> dict[str, Any]:
    """What decides what a training learns: its config without RESUMABLE keys (data paths absolute), and the
    base model at its resolved revision."""
    def strip(value: Any) -> Any:
        return {k: strip(v) for k, v in value.items() if k not in RESUMABLE} if isinstance(value, dict) else value

    return strip(cfg.model_dump(mode="json")) | {"base_model": base.model, "revision": base.commit}


def claim_output(cfg: TrainConfig, base: ResolvedModel, out: RunOutput, echo: Callable[[str], None] = print) -> None:
    """The output path's training is this config's (OUTPUT/train.json; a re-run resumes it), or none yet. Another
    config's is refused, naming what changed, unless output.overwrite removes it (as it removes this config's). A
    training that stopped before its first checkpoint has nothing to resume: another config takes its place."""
    from pipeline.io.resume import differences

    identity = training_identity(cfg, base)
    if cfg.output.overwrite:
        for name in TRAINING:
            if out.exists(name):
                out.fs.rm(out.path(name), recursive=True)
    elif not out.exists("train.json") and out.exists(CHECKPOINTS):
        echo(f"note: {cfg.output.path} holds checkpoints of a training that did not record its config (an earlier "
             f"version): resumed as this config's")
    elif out.exists("train.json") and out.exists(CHECKPOINTS):
        try:
            changed = differences(json.loads(out.read_text("train.json")), identity)
        except ValueError:
            changed = ["(train.json is not JSON)"]
        if changed:
            raise TrainOutputExists(f"output.path {cfg.output.path} holds a training of another config (changed: "
                                    f"{', '.join(changed[:8])}{', ...' if len(changed) > 8 else ''}); a re-run may "
                                    f"change only {', '.join(sorted(RESUMABLE))}. Set output.overwrite=true to start "
                                    f"over, or choose another path")
    out.fs.makedirs(out.root, exist_ok=True)
    out.write_json("train.json", identity)


def check_resources(cfg: TrainConfig, cluster_grows: bool, echo: Callable[[str], None]) -> None:
    """Ray Data needs a whole CPU beside the training workers (listing the files claims one): without it the
    workers would wait for pairs forever. With use_gpu each worker claims a GPU: on a Ray instance started here
    (a laptop, `--address local`) that has fewer, Ray Train would wait for them forever; a cluster that was joined
    may add them (an autoscaler), so the wait is said."""
    import ray

    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    claimed = cfg.num_workers * cfg.cpus_per_worker
    if cpus - claimed < 1:
        raise NotEnoughResources(f"the training workers claim {claimed:g} of the cluster's {cpus:g} CPUs; Ray Data "
                                 f"needs at least 1 more to read and prepare the pairs: lower cpus_per_worker or "
                                 f"num_workers")
    if cfg.use_gpu and gpus < cfg.num_workers:
        if not cluster_grows:
            raise NotEnoughResources(f"use_gpu: the {cfg.num_workers} training worker(s) claim a GPU each and this Ray "
                                     f"instance has {gpus:g}: set use_gpu: false, lower num_workers, or join a cluster "
                                     f"with GPUs (--address)")
        echo(f"waiting for {cfg.num_workers} GPU(s), one per training worker: the cluster has {gpus:g} now")


def ray_storage(cfg: TrainConfig) -> dict[str, Any]:
    """Ray Train's storage at the output path: a local directory, or any fsspec URL with its options."""
    if "://" not in cfg.output.path:
        return {"storage_path": os.path.abspath(cfg.output.path)}
    import pyarrow.fs as pafs

    out = RunOutput(cfg.output.path, cfg.output.storage_options)
    return {"storage_path": out.root, "storage_filesystem": pafs.PyFileSystem(pafs.FSSpecHandler(out.fs))}


def save_controlnet(cfg: TrainConfig, base: ResolvedModel, checkpoint: str, sources: list[Source], metrics: dict,
                    out: RunOutput) -> None:
    """The ControlNet the last checkpoint holds in save_pretrained's layout (safetensors; rank 0 wrote it
    there) and its model card, in OUTPUT/controlnet/. The driver needs neither diffusers nor the base
    model for it (importing diffusers and loading the base UNet for it were ~8 of the driver's 14.6 CPU-s in a
    small run on two cores, at its end, with the cores otherwise idle)."""
    target = out.path("controlnet")
    if out.fs.exists(target):
        out.fs.rm(target, recursive=True)
    out.fs.put(os.path.join(checkpoint, "controlnet") + "/", target, recursive=True)
    out.write_text("controlnet/README.md", model_card(cfg, base, sources, metrics))


def model_card(cfg: TrainConfig, base: ResolvedModel, sources: list[Source], metrics: dict) -> str:
    data = "\n".join(f"- `{s.path}` ({s.provenance['kind']}, {s.rows} pairs: `{s.image}` from `{s.control}`, text "
                     f"`{s.text}`" + "".join(f", {k} `{s.provenance[k]}`" for k in ("run_id", "job_fingerprint",
                                                                                    "source_run_id") if k in
                                         s.provenance) + ")" for s in sources)
    return f"""---
library_name: diffusers
base_model: {base.model}
tags: [controlnet, diffusers]
---

# ControlNet trained with the ControlNet dataset pipeline

A ControlNet for `{base.model}` (revision `{base.commit}`), trained for
{metrics['step']} steps (last loss {metrics['loss']:.4f}) on {sum(s.rows for s in sources)} pairs:

{data}

Training: resolution {cfg.resolution}, learning rate {cfg.learning_rate}, batch size {cfg.batch_size} per worker x
{cfg.num_workers} worker(s), gradient accumulation {cfg.gradient_accumulation}, mixed precision {cfg.mixed_precision},
seed {cfg.seed}, UNet decoder {"trained" if cfg.unlock_unet_decoder else "locked"}; started from
{f"`{cfg.controlnet}`" if cfg.controlnet else "the UNet's encoder (ControlNetModel.from_unet)"}.

```python
from diffusers import ControlNetModel
controlnet = ControlNetModel.from_pretrained("THIS_DIRECTORY")
```
"""


def write_validation_page(cfg: TrainConfig, out: RunOutput) -> None:
    """OUTPUT/validation/index.html: the validation images of every checkpoint, newest first."""
    from html import escape

    if not out.fs.exists(out.path("validation")):
        return
    steps = sorted((posixpath.basename(p) for p in out.fs.ls(out.path("validation"), detail=False)
                    if posixpath.basename(p).startswith("step-")), reverse=True)
    sections = []
    for step in steps:
        images = sorted(posixpath.basename(p) for p in out.fs.ls(out.path(f"validation/{step}"), detail=False))
        figures = "".join(f'<figure><img src="{escape(step)}/{escape(name)}" width="256"><figcaption>{escape(name)}'
                          f"</figcaption></figure>" for name in images if name.endswith(".png"))
        sections.append(f"<h2>{escape(step)}</h2><div style=\"display:flex;gap:8px\">{figures}</div>")
    prompts = "".join(f"<li>{i}: {escape(p)}</li>" for i, p in enumerate(cfg.validation.prompts))
    out.write_text("validation/index.html", f"<!doctype html><meta charset=utf-8><title>Validation</title>"
                                            f"<h1>Validation images</h1><ol start=0>{prompts}</ol>{''.join(sections)}\n")
