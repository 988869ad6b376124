"""Torch threads follow a stage's configured CPUs, not the fractional claim Ray places its actor with."""

import ray

from pipeline.config import load_config
from pipeline.cpus import node_cpus
from pipeline.job import actor_cpus, resolve_models
from tests.helpers import job_dict


@ray.remote(num_cpus=0.5)
class Probe:
    def threads(self, num_cpus) -> tuple[int, str]:
        import os

        import torch

        from pipeline.cpus import use_cpus

        before = torch.get_num_threads()
        return before, use_cpus(num_cpus), torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")


def test_an_actor_with_half_a_cpu_runs_torch_on_the_threads_its_config_gives(ray_session):
    probe = Probe.remote()
    before, threads, now, omp = ray.get(probe.threads.remote(2))
    assert (before, omp) == (1, "1")  # what Ray gives an actor claiming 0.5 CPU
    assert threads == now == 2
    assert ray.get(probe.threads.remote("auto"))[1:3] == (node_cpus(), node_cpus())
    ray.kill(probe)


def test_generation_claims_a_whole_node_by_default_scaled_to_leave_room_for_tasks(tiny_models):
    cfg = load_config(data=job_dict("/unused", "/unused", tiny_models))
    assert cfg.generation.num_cpus == "auto"
    models = resolve_models(cfg)
    shares = actor_cpus(cfg, models, gpus=0, cpus=8, node=8)
    wanted = {"hed": 1.0, "generate": 8.0}
    scale = 7 / sum(wanted.values())  # one CPU stays free for read and decode tasks
    assert shares == {k: int(v * scale * 1000) / 1000 for k, v in wanted.items()}
    pinned = load_config(data=job_dict("/unused", "/unused", tiny_models, num_cpus=2))
    assert actor_cpus(pinned, models, gpus=0, cpus=8, node=8)["generate"] == 2.0


def test_cpu_generation_runs_two_calls_at_most_each_on_a_share_of_the_cpus():
    import torch

    from pipeline.cpus import lanes

    before = torch.get_num_threads()
    try:
        assert (lanes(8), torch.get_num_threads()) == (2, 4)  # two calls of four threads: two calls' memory, not eight
        assert (lanes(3), torch.get_num_threads()) == (2, 1)
        assert (lanes(1), torch.get_num_threads()) == (1, 1)
    finally:
        torch.set_num_threads(before)


def test_a_torch_actor_on_cpu_keeps_the_memory_it_frees_for_the_next_forward_pass():
    """glibc maps a 64 MiB block anew for each allocation by default (its pages then fault in zeroed, one by one);
    after `use_cpus` such blocks come from the heap and stay there once freed."""
    import subprocess
    import sys

    code = """
import ctypes, sys
import numpy as np

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                              "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
if sys.argv[1] == "kept":
    from pipeline.cpus import use_cpus
    use_cpus(1)
mapped = libc.mallinfo2().hblkhd
block = np.ones(64 << 20, np.uint8)
print(libc.mallinfo2().hblkhd - mapped)
"""
    mapped = {how: int(subprocess.run([sys.executable, "-c", code, how], capture_output=True, text=True,
                                      check=True).stdout) for how in ("default", "kept")}
    assert mapped["default"] >= 64 << 20 and mapped["kept"] == 0


def test_an_actor_loads_with_the_garbage_collector_paused_and_what_it_loaded_frozen():
    """What an actor's start creates (modules, models) lives as long as the process: no full collection walks
    it while it is created, nor later."""
    import subprocess
    import sys

    code = """
import gc
from pipeline.cpus import loading

collections = []
gc.callbacks.append(lambda phase, info: phase == "start" and collections.append(info["generation"]))
frozen = gc.get_freeze_count()
with loading():
    loaded = [[i, [i]] for i in range(300_000)]  # a model's worth of tracked objects
print(len(collections), gc.isenabled(), gc.get_freeze_count() - frozen >= 600_000)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0", "True", "True"]  # no collection while loading; the collector is back on; all frozen


def test_others_busy_counts_the_rest_of_the_machine_not_this_process():
    """A process spinning beside this one keeps a core busy; this process's own work is not counted."""
    import subprocess
    import sys

    from pipeline.cpus import OthersBusy

    probe = OthersBusy(window=0.3)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        start = probe.last
        while probe.last is start:  # a window of 0.3 s or more has passed, this process spinning too
            probe()
        # the spinner: at least half a core (three busy threads on two cores: two thirds of one each); with this
        # process's own spinning counted it would be about two cores
        assert 0.5 <= probe() <= 1.5
    finally:
        spinner.kill()


def test_others_busy_does_not_count_time_the_host_gave_another_guest(tmp_path):
    """Steal time (a virtual CPU's time spent on another guest) is not work another stage does, and guest time is
    in user time already: what counts is user, nice, system, irq and softirq of this process's CPUs."""
    import os

    from pipeline.cpus import OthersBusy

    cpu = min(os.sched_getaffinity(0))
    #      user nice system idle iowait irq softirq steal guest guest_nice
    stat = tmp_path / "stat"
    stat.write_text(f"cpu  1 1 1 1 1 1 1 1 1 1\ncpu{cpu} 100 20 50 1000 7 3 2 400 60 5\ncpu{cpu + 4096} 9 9 9 9 9 9 9 9 9 9\n"
                    "intr 12345\n")
    _, busy, _ = OthersBusy.sample(str(stat))
    # neither steal nor guest time, nor the CPU outside this process's set
    assert busy == (100 + 20 + 50 + 3 + 2) / os.sysconf("SC_CLK_TCK")
    assert OthersBusy.sample(str(tmp_path / "missing")) is None
