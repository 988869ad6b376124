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
