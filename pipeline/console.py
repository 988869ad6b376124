"""What a run tells its user: one progress bar (samples done of the total, samples/s, ETA), then one
summary line and a short table (each stage's time share and rows/s, errors by reason). Ray's own logs
and progress bars are shown only with `-v`.

Each stage measures itself: `timed(name, stage, progress)` wraps a stage so that every batch reports
(rows in, rows out, seconds) to one `Progress` actor, and the sink reports what it wrote. The driver
reads the actor for the bar, and the manifest records the stage figures (`stages`).

A training run shows one line too (`TrainBar`): its first worker reports each step and its loss to a `Steps`
actor, which the driver reads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable, TextIO

import ray


@ray.remote(num_cpus=0)
class Progress:
    """Counts of a run, reported by its stages and its sink. As the one actor of a run, it also keeps the
    first input of each content (`first_copies`, asked by the dedupe stage): a process less than an actor
    stage of its own."""

    def __init__(self):
        self.stages: dict[str, list[float]] = {}  # name -> [batches, rows in, rows out, seconds]
        self.written = {"samples": 0, "errors": 0, "rejected": 0}  # rejected: inputs refused before expansion
        self.first: dict[bytes, str] = {}  # 16 bytes of an input's content hash -> the uri that had it first

    def first_copies(self, inputs: list[tuple[str, str]]) -> list[str]:
        """For each decoded input (content sha256, uri), the uri of the first input with that content."""
        return [self.first.setdefault(bytes.fromhex(sha)[:16], uri) for sha, uri in inputs]

    def stage(self, name: str, rows_in: int, rows_out: int, seconds: float) -> None:
        totals = self.stages.setdefault(name, [0, 0, 0, 0.0])
        for i, v in enumerate((1, rows_in, rows_out, seconds)):
            totals[i] += v

    def wrote(self, samples: int, errors: int, rejected: int) -> None:
        for key, n in (("samples", samples), ("errors", errors), ("rejected", rejected)):
            self.written[key] += n

    def snapshot(self) -> dict[str, Any]:
        return {"written": dict(self.written),
                "stages": {k: {"batches": int(b), "rows_in": int(i), "rows_out": int(o), "seconds": round(s, 6)}
                           for k, (b, i, o, s) in self.stages.items()}}


@ray.remote(num_cpus=0)
class Steps:
    """A training run's last finished step and its loss, as its first worker reports them, and its steps/s since
    the first step this actor saw (model loading and Ray Train's start are not in the rate)."""

    def __init__(self):
        self.first: tuple[int, float] | None = None  # (step, time)
        self.last: tuple[int, float, float] | None = None  # (step, loss, time)

    def done(self, step: int, loss: float) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = (step, now)
        self.last = (step, loss, now)

    def snapshot(self) -> dict[str, Any] | None:
        if self.last is None:
            return None
        (step0, t0), (step, loss, t) = self.first, self.last
        return {"step": step, "loss": loss, "steps_per_s": (step - step0) / (t - t0) if t > t0 else None}


def start_progress(actor=Progress):
    """The run's Progress (or Steps) actor, on the driver's node: a run's counts and dedupe registry live and end
    with its driver, not on a worker node that may be lost."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    try:
        here = ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - a Ray Client driver has no node of its own: anywhere will do
        return actor.remote()
    return actor.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote()


def good_rows(table) -> int:
    """Rows of a batch that are not error rows (error rows pass through every later stage untouched)."""
    return table.column("error_stage").null_count if "error_stage" in table.column_names else table.num_rows


class BusyClock:
    """The seconds a stage is busy in this process, shared out among its batches: batches that overlap (an actor
    taking two at once) split the time they overlap, so that a stage's seconds add up to the time it was busy."""

    def __init__(self):
        self._lock = threading.Lock()
        self._active: dict[object, float] = {}  # batch -> seconds so far
        self._last = 0.0

    def _advance(self) -> None:
        now = time.perf_counter()
        for batch in self._active:
            self._active[batch] += (now - self._last) / len(self._active)
        self._last = now

    def start(self) -> object:
        with self._lock:
            self._advance()
            batch = object()
            self._active[batch] = 0.0
            return batch

    def stop(self, batch: object) -> float:
        with self._lock:
            self._advance()
            return self._active.pop(batch)


_clocks: dict[str, BusyClock] = {}


def _report(progress, name: str, fn: Callable, batch):
    clock = _clocks.setdefault(name, BusyClock())
    started = clock.start()
    try:
        out = fn(batch)
    finally:
        seconds = clock.stop(started)
    if progress is not None:
        progress.stage.remote(name, good_rows(batch), good_rows(out), seconds)
    return out


class _Timed:
    """A stage that is a callable object (run as Ray tasks), timed."""

    def __init__(self, stage: Callable, progress):
        self.stage, self.progress = stage, progress

    def __call__(self, batch):
        return _report(self.progress, type(self).__name__, self.stage, batch)


def timed(name: str, stage: Any, progress, before: Callable | None = None) -> Any:
    """`stage` (an actor class or a callable object) timed per batch and shown by Ray Data as `name`.
    `before` (an actor class's only): a stage of its own run in the actor on each batch first."""
    if isinstance(stage, type):  # an actor class: constructed on the worker, timed there
        init, call = stage.__init__, stage.__call__

        def __init__(self, *args, **kwargs):
            # A constructor that raises (a model that cannot load) kills the actor, and Ray core prints its retries
            # of the actor's calls, each with the whole traceback, on the driver's console whatever the logging
            # settings. Kept, the error fails the first batch instead: the stage fails with it, in one line.
            self._failed = None
            try:
                init(self, *args, **kwargs)
            except Exception as e:  # noqa: BLE001 - raised again by __call__
                self._failed = e

        def __call__(self, batch):
            if self._failed is not None:
                raise self._failed
            if before is not None:
                batch = before(batch)
            return _report(progress, name, lambda b: call(self, b), batch)

        return type(name, (stage,), {"__module__": stage.__module__, "__qualname__": name, "__init__": __init__,
                                     "__call__": __call__})
    return type(name, (_Timed,), {"__module__": __name__, "__qualname__": name})(stage, progress)


def quiet_ray() -> dict[str, Any]:
    """Keep Ray's own logging and progress bars off the console; returns `ray.init` keywords."""
    from ray.data import DataContext

    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # the core worker's own warnings, printed from C++
    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for handler in logging.getLogger("ray.data").handlers:  # a failed stage's error and stack trace (100 lines):
        if handler.get_name() == "console":  # the command's own error line says it; Ray Data's log file keeps them
            handler.setLevel(logging.CRITICAL)
    return {"log_to_driver": False, "logging_level": logging.ERROR}


LOG_LEVEL_LINE = b"Set ray log level from environment variable RAY_BACKEND_LOG_LEVEL"


@contextlib.contextmanager
def without_log_level_line() -> Iterator[None]:
    """While Ray starts, standard error (the file descriptor, which C++ writes to) goes through a pipe whose lines a
    thread passes on as they come, but for the one the driver's core worker prints at INFO level when it reads
    RAY_BACKEND_LOG_LEVEL, whatever that level is ("Set ray log level from environment variable ..."): it began the
    console output of every command. At the end a marker line tells the thread to stop."""
    end = b"\0 end of ray.init\n"
    sys.stderr.flush()
    saved = os.dup(2)
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)

    def relay() -> None:
        with os.fdopen(read, "rb", buffering=0) as pipe:
            for line in iter(pipe.readline, b""):
                done = line.endswith(end)
                line = line.removesuffix(end)
                if line and LOG_LEVEL_LINE not in line:
                    os.write(saved, line)
                if done:
                    return

    thread = threading.Thread(target=relay, name="stderr-relay", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.write(2, end)
        os.dup2(saved, 2)
        thread.join()
        os.close(saved)


def fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


class Bar:
    """One line redrawn on a terminal (a plain line every `every` seconds elsewhere): inputs done of the
    total, samples, samples/s and ETA. An input is done when its `variants` rows (samples or failed
    samples) are written, or its one error row."""

    def __init__(self, progress, total: int | None, variants: int = 1, stream: TextIO = sys.stderr,
                 interval: float = 0.5, every: float = 30.0):
        self.progress, self.total, self.variants, self.stream = progress, total, variants, stream
        self.interval, self.every = interval, every
        self.tty = stream.isatty()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="progress-bar", daemon=True)
        self.started = time.monotonic()

    def line(self, written: dict[str, int]) -> str:
        rows = written["samples"] + written["errors"] - written["rejected"]
        done = written["rejected"] + rows / self.variants
        elapsed = time.monotonic() - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = []
        if self.total:
            filled = int(24 * min(done, self.total) / self.total)
            parts.append(f"[{'#' * filled}{'.' * (24 - filled)}] {done:.0f}/{self.total} inputs")
            if rate > 0 and done < self.total:
                parts.append(f"ETA {fmt_duration((self.total - done) / rate)}")
        else:
            parts.append(f"{done:.0f} inputs")
        parts.append(f"{written['samples']} samples, {written['samples'] / elapsed if elapsed > 0 else 0.0:.2f}/s")
        if written["errors"]:
            parts.append(f"{written['errors']} errors")
        parts.append(f"elapsed {fmt_duration(elapsed)}")
        return " · ".join(parts)

    def read(self) -> Any:
        return ray.get(self.progress.snapshot.remote(), timeout=5)["written"]

    def plain_due(self, state: Any, since: float) -> bool:
        """Whether a plain line (no terminal) is due, `since` seconds after the last one."""
        return since >= self.every

    def _loop(self) -> None:
        last_plain = time.monotonic()
        while not self._stop.wait(self.interval):
            try:
                state = self.read()
            except Exception:  # noqa: BLE001 - the bar is cosmetic; the run goes on
                continue
            if self.tty:
                self.stream.write("\r" + self.line(state).ljust(79))
                self.stream.flush()
            elif self.plain_due(state, time.monotonic() - last_plain):
                last_plain = time.monotonic()
                print(self.line(state), file=self.stream, flush=True)

    def __enter__(self) -> Bar:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.tty:
            self.stream.write("\r" + " " * 79 + "\r")
            self.stream.flush()


class TrainBar(Bar):
    """`Bar` for a training run: steps done of the total, the last loss, steps/s, ETA. Without a terminal, a line
    when a checkpoint step has passed (or every `every` seconds), and the last state once more at the end."""

    def __init__(self, steps, total: int, checkpoint_every: int, **kwargs):
        super().__init__(steps, total, **kwargs)
        self.checkpoint_every = checkpoint_every
        self.printed = -1  # the step of the last plain line

    def read(self) -> dict[str, Any] | None:
        return ray.get(self.progress.snapshot.remote(), timeout=5)

    def line(self, state: dict[str, Any] | None) -> str:
        elapsed = f"elapsed {fmt_duration(time.monotonic() - self.started)}"
        if state is None:
            return f"starting the training workers · {elapsed}"
        step, rate = state["step"], state["steps_per_s"]
        parts = [f"step {step}/{self.total}", f"loss {state['loss']:.4f}"]
        if rate:
            parts.append(f"{rate:.2f} steps/s")
            if step < self.total:
                parts.append(f"ETA {fmt_duration((self.total - step) / rate)}")
        return " · ".join([*parts, elapsed])

    def plain_due(self, state: dict[str, Any] | None, since: float) -> bool:
        step = state["step"] if state else -1
        due = since >= self.every or step // self.checkpoint_every > self.printed // self.checkpoint_every
        if due:
            self.printed = step
        return due

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        if not self.tty and exc[0] is None:  # the last checkpoint's line, if the loop had not printed it
            try:
                state = self.read()
            except Exception:  # noqa: BLE001 - cosmetic
                return
            if state and state["step"] != self.printed:
                print(self.line(state), file=self.stream, flush=True)


def stage_table(manifest: dict[str, Any]) -> list[str]:
    """Each stage's share of the stages' time and its own throughput (rows out per second of its work)."""
    from pipeline.docs.stats import stage_rows

    rows = stage_rows(manifest)
    width = max([len("stage"), *(len(r["name"]) for r in rows)])
    lines = [f"  {'stage':<{width}}  {'time':>8}  {'share':>5}  {'rows':>6}  {'rows/s':>8}"]
    for r in rows:
        lines.append(f"  {r['name']:<{width}}  {r['seconds']:>7.2f}s  {r['share']:>5}  {r['rows']:>6}  "
                     f"{r['rows_per_s'] or 0.0:>8.2f}")
    return lines


def error_lines(groups: list[dict[str, Any]], limit: int = 10) -> list[str]:
    """Error groups (docs.stats.error_groups), most frequent first."""
    ranked = sorted(groups, key=lambda g: -g["count"])
    lines = [f"  {g['count']} x {g['stage']}: {g['type']}: {g['message']}" for g in ranked[:limit]]
    if len(groups) > limit:
        lines.append(f"  ... {len(groups) - limit} more kinds (python -m pipeline inspect OUT)")
    return lines
