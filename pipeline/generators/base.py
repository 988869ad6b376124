"""The generator interface: what a family of diffusion pipelines tells the rest of the pipeline.

A `Generator` is a Ray Data actor class: the pipeline loads once per actor (`__init__`) and
`__call__` turns a batch of sample rows into rows with a `generated` image and the family's own
provenance columns. Everything outside `pipeline/generators/` asks the class, never a family by
name: which models it loads and which of their files to fetch (`model_refs`), the Parquet columns
it adds (`columns`), what its samples are called in documents (`label`).
"""

from __future__ import annotations

import copy
import logging
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from pipeline.cpus import OthersBusy, lanes, loading, node_cpus
from pipeline.config import GenerationConfig
from pipeline.io.images import array_to_png
from pipeline.rows import Row, map_batch_isolated

log = logging.getLogger(__name__)

Column = tuple[str, pa.DataType, str]  # (name, type, description)

# diffusers snapshots: configs, tokenizer files and safetensors weights (no .ckpt/.bin/flax/onnx copies)
DIFFUSERS_FILES = ("*.json", "*.txt", "*.model", "*.safetensors")


@dataclass(frozen=True)
class ModelRef:
    """One model a generator loads, as configured."""

    role: str  # "base model", "controlnet canny": names it in messages
    model: str  # hub repo id or local directory
    revision: str | None
    probe: str  # the file that marks the expected layout (resolution checks it, fetch requires it)
    patterns: tuple[str, ...] = DIFFUSERS_FILES  # what `models fetch` downloads of a hub repo


# Models of one job's generator, by key: one model, or a list (one per condition). The keys are the
# manifest's `models` entries ("base_model", "controlnets").
Models = dict[str, Any]


class Generator:
    """Base class of a generator family. Subclasses set `family`, `label`, `columns` and implement
    `model_refs`, `load` and `run`; the base class batches rows by image size, halves the batch on
    out-of-memory, isolates failing rows and encodes the images."""

    family: ClassVar[str]
    label: ClassVar[str]  # what the samples are, for documents: "Stable Diffusion 1.5 + ControlNet generations"
    columns: ClassVar[list[Column]]  # provenance columns the family adds to every sample, in order
    schedulers: ClassVar[tuple[str, ...]] = ("unipc", "dpmpp_2m", "ddim", "euler_a")  # the first is the default
    global_random_state: ClassVar[bool] = False  # its pipeline seeds torch's global RNG: no calls side by side
    size_multiple: ClassVar[int] = 8  # its pipelines make images whose sides are multiples of this (the VAE's scale)

    @classmethod
    def check(cls, cfg: Any) -> GenerationConfig:
        """Family checks of a whole job config (`JobConfig`) at validation time: raise ValueError with one line
        naming the key; return `cfg.generation`, possibly with derived values filled in."""
        if cfg.generation.scheduler not in cls.schedulers:
            raise ValueError(f"generation.scheduler: {cfg.generation.scheduler!r} is not a {cls.family} scheduler "
                             f"{list(cls.schedulers)}")
        if cfg.image.multiple_of % cls.size_multiple:  # else its images come out smaller than their control maps
            raise ValueError(f"image.multiple_of: {cls.family} generates images whose sides are multiples of "
                             f"{cls.size_multiple}; {cfg.image.multiple_of} is not one")
        return cfg.generation

    def __init__(self, gen: GenerationConfig, models: Models, progress=None):
        """`progress`: the run's console.Progress actor, told the seconds `generation.compile` spends compiling
        (stage `generate:compile`, part of the stage `generate`)."""
        with loading():  # imports and model loads with the garbage collector paused (pipeline.cpus.loading)
            self.device = torch_device()
            self.progress = progress
            self.compiled = compile_seconds() if gen.compile else 0.0  # what this process compiled before
            # on CPU: up to two pipeline calls at once on half the threads each (see pipeline.cpus.lanes), unless
            # the family's calls draw from torch's global random state, or channels_last is asked for (oneDNN's
            # channels_last convolutions on weights shared by two calls at once gave a few samples in a run other
            # numbers): then one call at a time, on every thread
            one = self.global_random_state or gen.channels_last is True
            self.lanes = lanes(gen.num_cpus, most=1 if one else 2) if self.device == "cpu" else 1
            # a call starts on a second lane only while the rest of the machine leaves that lane's cores free (the
            # threads `lanes` gave torch)
            import torch

            self.cores, self.threads = node_cpus(), torch.get_num_threads()
            self.others_busy = OthersBusy() if self.lanes > 1 else None
            self._calls = threading.Condition()
            self._running = 0
            self.gen = gen
            self.max_batch = gen.calls_of(self.device)  # lowered for good after an out-of-memory error
            self._lane = threading.local()
            self._compile_lock = threading.Lock()
            self.load(models)
            self.provenance: Row = self.provenance_fields(models) | worker_fields(self.device)
            # pipeline calls run on one thread per lane, each with a pipeline of its own (sharing the models). Ray
            # Data hands the actor two batches at once (see job.build_dataset): their calls queue here, so a lane that
            # is done with one batch takes the next batch's first call instead of waiting for the other lane
            copies = [self.lane_copy() for _ in range(self.lanes - 1)]  # one lane calls `self._pipe` itself
            self.pool = ThreadPoolExecutor(self.lanes, initializer=lambda: setattr(self._lane, "pipe",
                                                                                 copies.pop() if copies else None))

    @property
    def pipe(self):
        """The diffusers pipeline of the calling lane."""
        lane = getattr(self._lane, "pipe", None)
        return self._pipe if lane is None else lane

    @pipe.setter
    def pipe(self, pipe) -> None:
        self._pipe = pipe

    def lane_copy(self):
        """A pipeline for one more lane: the same weights; its own scheduler (a call changes its state), text
        encoder modules and tokenizers. transformers' text encoders and tokenizers are not safe to call from two
        threads at once (a text encoder's forward changes its config for the length of a call; a fast
        tokenizer's call sets its padding and truncation): a shared CLIP text encoder gave one or two samples in
        80 another prompt embedding, images off by up to 118 levels in a run, and shared SDXL tokenizers a
        call 18 tokens long beside one of 77."""
        from transformers import PreTrainedModel, PreTrainedTokenizerBase

        lane = copy.copy(self._pipe)
        lane.scheduler = copy.deepcopy(self._pipe.scheduler)
        for name, component in self._pipe.components.items():
            if isinstance(component, PreTrainedModel):
                setattr(lane, name, same_weights(component))
            elif isinstance(component, PreTrainedTokenizerBase):
                setattr(lane, name, copy.deepcopy(component))
        return lane

    @classmethod
    def model_refs(cls, gen: GenerationConfig) -> dict[str, ModelRef | list[ModelRef]]:
        """The models this family loads for `gen`, by manifest key."""
        raise NotImplementedError

    @classmethod
    def check_models(cls, gen: GenerationConfig, models: Models) -> None:
        """Checks of the resolved models against the family, in the driver before any data moves: raise
        ModelUnavailable naming the key."""

    def load(self, models: Models) -> None:
        raise NotImplementedError

    def provenance_fields(self, models: Models) -> Row:
        """The values of `columns`, the same for every row this actor writes."""
        raise NotImplementedError

    def run(self, rows: list[Row], width: int, height: int) -> list[np.ndarray]:
        """Generate one uint8 image per row (all rows have this size)."""
        raise NotImplementedError

    def row_fields(self, row: Row) -> Row:
        """Provenance values that differ between rows (e.g. SDXL's micro-conditioning sizes)."""
        return {}

    def __call__(self, batch: pa.Table) -> pa.Table:
        return map_batch_isolated("generate", batch, self.generate)

    def generate(self, rows: list[Row]) -> list[Row]:
        by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, row in enumerate(rows):
            by_size[(row["width"], row["height"])].append(i)
        # a call per size; with lanes, calls small enough that every lane has one
        per_call = max(1, min(self.max_batch, -(-len(rows) // self.lanes)))
        calls = [(size, idx[k : k + per_call]) for size, idx in by_size.items() for k in range(0, len(idx), per_call)]
        calls.sort(key=lambda call: -call[0][0] * call[0][1] * len(call[1]))  # the longest first: a short tail
        run = lambda call: self.admitted(self.run_fitting, [rows[i] for i in call[1]], *call[0])  # noqa: E731
        out: list[Row | None] = [None] * len(rows)
        for (_, idx), images in zip(calls, self.pool.map(run, calls)):
            for i, image in zip(idx, images):
                out[i] = {**rows[i], **self.provenance, **self.row_fields(rows[i]), "generated": array_to_png(image)}
        if self.gen.compile:
            self.report_compile()
        return out

    def admitted(self, fn, *args):
        """Run `fn(*args)` once the call may start: at once with no other call running, or beside one only while
        the rest of the machine leaves a quarter of a lane's cores free (see `may_start_another`). Either way each
        call runs on its lane's own thread count, so a row's numbers do not depend on how many ran at once."""
        with self._calls:
            while self._running and not self.may_start_another():
                self._calls.wait(timeout=0.25)
            self._running += 1
        try:
            return fn(*args)
        finally:
            with self._calls:
                self._running -= 1
                self._calls.notify()

    def may_start_another(self) -> bool:
        """Another stage's thread (HED's, on a core of its own) keeps a whole core busy; the run's own processes
        (the driver, the writer, Ray's) keep up to ~0.7 of one busy at the end of a job of small images, in bursts:
        those left the second lane closed for a second after HED was done (the free share asked was half a lane's).
        """
        busy = self.others_busy() if self.others_busy is not None else None
        return busy is None or self.cores - busy - self._running * self.threads >= self.threads / 4

    def report_compile(self) -> None:
        """Tell the run how long torch.compile took since the last report (a new image or batch size compiles
        anew). Two batches may end at once: each second is reported once."""
        with self._compile_lock:
            seconds, before = compile_seconds(), self.compiled
            self.compiled = max(seconds, before)
        if seconds > before:
            log.info("torch.compile: %.1f s compiling", seconds - before)
            if self.progress is not None:
                self.progress.stage.remote("generate:compile", 0, 0, seconds - before)  # within generate's time

    def run_fitting(self, rows: list[Row], width: int, height: int) -> list[np.ndarray]:
        """Run in chunks of at most `max_batch`; on out-of-memory halve it and retry the chunk."""
        import torch

        images: list[np.ndarray] = []
        start = 0
        while start < len(rows):
            chunk = rows[start : start + self.max_batch]
            try:
                images += self.run(chunk, width, height)
            except torch.OutOfMemoryError:
                if len(chunk) == 1:
                    raise
                self.max_batch = len(chunk) // 2
                log.warning("out of memory with %d images of %dx%d: batch size now %d", len(chunk), width, height, self.max_batch)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            start += len(chunk)
        return images


def compile_seconds() -> float:
    """Seconds torch.compile has spent compiling in this process (dynamo's own timer of each compilation)."""
    from torch._dynamo.utils import compilation_time_metrics

    return sum(compilation_time_metrics.get("_compile.compile_inner", ()))


# Columns every family adds last: the worker that made the row.
WORKER_COLUMNS: list[Column] = [
    ("generator_device", pa.string(), "Device of the worker that generated the row (cuda, cpu, ...)."),
    ("torch_version", pa.string(), "torch version of the worker."),
    ("diffusers_version", pa.string(), "diffusers version of the worker."),
    ("transformers_version", pa.string(), "transformers version of the worker."),
]


def worker_fields(device: str) -> Row:
    import diffusers
    import torch
    import transformers

    return {"generator_device": device, "torch_version": torch.__version__,
            "diffusers_version": diffusers.__version__, "transformers_version": transformers.__version__}


def torch_device() -> str:
    """cuda where a GPU is; Apple's mps on a Mac that has it (Ray sees no GPU there: the actor claims CPUs);
    else cpu."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def same_weights(module):
    """A copy of a torch module with module objects and config of its own and the very same parameter tensors
    (no memory for weights)."""
    return copy.deepcopy(module, {id(p): p for p in module.parameters()})


def cpu_generators(rows: list[Row]) -> list:
    """One CPU `torch.Generator` per row, seeded with the row's seed: diffusers draws the starting noise on
    the generator's device and moves it, so a GPU and a CPU worker start from the same noise."""
    import torch

    return [torch.Generator("cpu").manual_seed(r["seed"]) for r in rows]


class NonFiniteImage(ValueError):
    """A generated image with NaN or infinite values: its numbers overflowed (e.g. float16 somewhere it does not
    fit) or a compiled kernel went wrong. Cast to uint8 it would be a silent black or noisy image."""


def to_uint8(image: np.ndarray) -> np.ndarray:
    """diffusers' own float [0, 1] to uint8 conversion (as in `numpy_to_pil`); NaN or infinite values raise
    `NonFiniteImage` (the sample becomes an error row) instead of casting to garbage."""
    if not np.isfinite(image).all():
        raise NonFiniteImage(f"the generated image has {int((~np.isfinite(image)).sum())} NaN or infinite values "
                             f"of {image.size} (numeric overflow, e.g. float16 without a safe VAE dtype)")
    return (image * 255).round().astype(np.uint8)


def torch_dtype(name: str, device: str, gpu_default: str = "float16"):
    """The torch dtype for `generation.dtype`; "auto": `gpu_default` on a GPU, float32 on CPU."""
    import torch

    if name == "auto":
        return getattr(torch, gpu_default) if device == "cuda" else torch.float32
    return getattr(torch, name)
