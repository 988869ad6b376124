"""How many CPUs a stage's actor really has, and torch threads to match.

Ray sets `OMP_NUM_THREADS` in an actor from the CPUs it claims, rounded down to at least 1, so an
actor whose claim was scaled down to leave room for decode tasks (0.5 CPU on a laptop) would run
torch on one thread whatever its config said. The claims only place actors; the threads follow the
config: `num_cpus` as given, `auto` every CPU this process may run on.

Such an actor also keeps the memory torch frees for its next forward pass (`keep_freed_memory`), and
loads its models with Python's cyclic garbage collector paused (`loading`).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import sys
import time


def node_cpus() -> int:
    """The CPUs this process may run on (a container's or cgroup's CPU set, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpus_of(num_cpus: float | str, node: float) -> float:
    """A stage's configured CPUs on a node with `node` CPUs (`auto`: all of them)."""
    return float(node) if num_cpus == "auto" else float(num_cpus)


def use_cpus(num_cpus: float | str) -> int:
    """In an actor on CPU: torch's intra-op threads for the configured CPUs, and freed memory kept for reuse;
    returns the thread count."""
    import torch

    keep_freed_memory()
    threads = max(1, int(cpus_of(num_cpus, node_cpus())))
    torch.set_num_threads(threads)
    return threads


def actor_device(num_cpus: float | str) -> str:
    """The device of a torch actor (annotator, captioner, scorer): cuda where this process sees a GPU, else cpu,
    where torch then runs on the configured CPUs (`use_cpus`)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        use_cpus(num_cpus)
    return device


def lanes(num_cpus: float | str, most: int = 2) -> int:
    """In a generator actor on CPU: how many pipeline calls run at once for the configured CPUs (up to
    `most`), each on an equal share of them as torch threads; returns the number of lanes. Two calls side
    by side use two cores better than one call split across them (1.16x the speed with mid-size SD
    1.5-structured models, 1.35x with tiny ones), and with one core each a call's numbers do not depend
    on the thread count. More lanes would each hold a call's activations in memory at once."""
    cpus = max(1, int(cpus_of(num_cpus, node_cpus())))
    count = min(most, cpus)
    use_cpus(cpus // count)
    return count


class OthersBusy:
    """How many cores the rest of the machine keeps busy: its CPU time (Linux's /proc/stat) less this
    process's own, per second over the last `window` seconds or more. Lets a generator start a second lane only
    while another stage (HED on its own core, say) leaves one free: on two cores, two lanes of one thread beside
    a one-thread HED actor made a 200-photo tiny job 13% slower than one lane, while the mid-size job, all
    generation once HED is done, needs both (benchmarks/RESULTS.md). `None` where there is no /proc/stat."""

    def __init__(self, window: float = 0.5):
        self.window = window
        self.last = self.sample()
        self.busy = 0.0

    @staticmethod
    def sample(stat: str = "/proc/stat") -> tuple[float, float, float] | None:
        """(monotonic time, CPU seconds that the CPUs this process may run on spent running something, CPU
        seconds of this process). Only those CPUs: in a container given a few CPUs of a busy host, the others'
        work is not ours to wait for. Running: user, nice, system, irq and softirq time; not idle or iowait, nor
        steal (a virtual machine's CPU given to another guest by the host, not work of another stage: a second
        lane still gets what the host leaves it), nor guest time (Linux counts it in user and nice already)."""
        mine = {f"cpu{n}" for n in os.sched_getaffinity(0)} if hasattr(os, "sched_getaffinity") else None
        busy = 0
        try:
            with open(stat) as f:
                for line in f:
                    name, *ticks = line.split()
                    if not name.startswith("cpu"):
                        break
                    if name != "cpu" and (mine is None or name in mine):
                        user, nice, system, _idle, _iowait, irq, softirq = (int(t) for t in ticks[:7])
                        busy += user + nice + system + irq + softirq
        except (OSError, ValueError):
            return None
        return time.monotonic(), busy / os.sysconf("SC_CLK_TCK"), time.process_time()

    def __call__(self) -> float | None:
        now = self.sample()
        if now is None or self.last is None:
            return None
        seconds = now[0] - self.last[0]
        if seconds >= self.window:
            self.busy = max(0.0, (now[1] - self.last[1]) - (now[2] - self.last[2])) / seconds
            self.last = now
        return self.busy


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the big blocks a torch forward pass on CPU frees, for the next one to reuse.

    By default glibc serves a block above its mmap threshold (128 KiB, raised on the fly up to 32 MiB) with a
    fresh mapping and unmaps it when freed, and gives the top of its heap back to the kernel: every layer's
    activations then come back as new pages that the kernel zeroes one page fault at a time. Kept in the heap,
    the same work ran 23% faster for HED at 256 px on one thread and 14% for two lanes of calls of four mid-size
    SD 1.5-structured images (the numbers are the same). The cost: a process holds on to its peak heap. Linux with glibc
    only; elsewhere nothing changes. Returns whether both settings took."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30)) & bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


@contextlib.contextmanager
def loading():
    """An actor's start (importing torch and diffusers, loading models) with Python's cyclic garbage collector
    paused, and what it created then frozen out of later collections (`gc.freeze`). Those hundreds of
    thousands of objects live as long as the process, yet each full collection walks them all: a generator
    actor's start ran eight of them, 1.2 s of CPU at the moment every actor starts at once, and one more
    takes 0.3 s once its models are loaded. Garbage cycles made while loading are never collected (a few,
    once)."""
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()
