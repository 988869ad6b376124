"""How many CPUs a stage's actor really has, and torch threads to match.

Ray sets `OMP_NUM_THREADS` in an actor from the CPUs it claims, rounded down to at least 1, so an
actor whose claim was scaled down to leave room for decode tasks (0.5 CPU on a laptop) would run
torch on one thread whatever its config said. The claims only place actors; the threads follow the
config: `num_cpus` as given, `auto` every CPU this process may run on.
"""

from __future__ import annotations

import os


def node_cpus() -> int:
    """The CPUs this process may run on (a container's or cgroup's CPU set, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpus_of(num_cpus: float | str, node: float) -> float:
    """A stage's configured CPUs on a node with `node` CPUs (`auto`: all of them)."""
    return float(node) if num_cpus == "auto" else float(num_cpus)


def use_cpus(num_cpus: float | str) -> int:
    """In an actor on CPU: torch's intra-op threads for the configured CPUs; returns the thread count."""
    import torch

    threads = max(1, int(cpus_of(num_cpus, node_cpus())))
    torch.set_num_threads(threads)
    return threads


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
