"""The generator stage against diffusers itself: same maths, batch invariance, every scheduler."""

import io

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
from PIL import Image

from pipeline.annotators import ANNOTATORS
from pipeline.config import load_config
from pipeline.generators.sd15 import StableDiffusionControlNet, make_scheduler
from pipeline.io.images import array_to_png, png_to_array
from pipeline.job import resolve_models
from pipeline.ids import sample_identity
from pipeline.rows import table_of
from tests.helpers import job_dict, photo


def make_rows(size=(96, 64)) -> list[dict]:
    canny = ANNOTATORS["canny"]({})
    rows = []
    for i, name in enumerate(("astronaut", "coffee", "chelsea", "rocket")):
        image = photo(name, size)
        hed_like = 255 - canny.annotate([image])[0]  # a second, different control map
        _, seed = sample_identity(0, name, i)
        rows.append({"width": size[0], "height": size[1], "image": array_to_png(image), "seed": seed,
                     "prompt": f"a photo of {name}", "negative_prompt": "blurry",
                     "control_canny": array_to_png(canny.annotate([image])[0]), "control_hed": array_to_png(hed_like)})
    return rows


def generator(tiny, **gen) -> StableDiffusionControlNet:
    cfg = load_config(data=job_dict("/unused", "/unused", tiny, **gen))
    models = resolve_models(cfg)
    return StableDiffusionControlNet(cfg.generation, models.generation)


@pytest.fixture(scope="module")
def multi(tiny_models):
    return generator(tiny_models, batch_size=4)  # the four test rows go through in one pipeline call


def diffusers_pipe(tiny_models):
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        tiny_models["base_model"],
        controlnet=[ControlNetModel.from_pretrained(tiny_models[f"controlnet/{c}"]) for c in ("canny", "hed")],
        safety_checker=None,
    )
    pipe.scheduler = make_scheduler("unipc", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_equals_diffusers_own_pipeline(tiny_models, multi):
    """Our stage must not change the maths: same models, prompts, control images and seeds, called
    the way a diffusers user would (a batch with one generator per image)."""
    rows = make_rows()
    ours = [png_to_array(r["generated"]) for r in multi.generate(rows)]
    pil = lambda png: Image.open(io.BytesIO(png))  # noqa: E731
    theirs = diffusers_pipe(tiny_models)(
        [r["prompt"] for r in rows], negative_prompt=["blurry"] * len(rows),
        image=[[pil(r["control_canny"]), pil(r["control_hed"])] for r in rows],
        width=96, height=64, num_inference_steps=3, guidance_scale=7.5,
        controlnet_conditioning_scale=[1.0, 0.5], control_guidance_start=[0.0, 0.0], control_guidance_end=[1.0, 0.8],
        generator=[torch.Generator().manual_seed(r["seed"]) for r in rows], output_type="pil",
    ).images
    for got, want in zip(ours, theirs):
        np.testing.assert_array_equal(got, np.asarray(want))


def test_a_controlnet_outside_its_guidance_window_is_not_run(tiny_models):
    """hed's window ends at 0.6 of 5 steps: diffusers would run it 5 times and scale 2 of them by 0."""
    gen = generator(tiny_models, batch_size=4, steps=5, controlnets=[
        {"condition": "canny", "model": tiny_models["controlnet/canny"]},
        {"condition": "hed", "model": tiny_models["controlnet/hed"], "conditioning_scale": 0.5, "guidance_end": 0.6}])
    rows = make_rows()
    calls = {}
    for condition, net in zip(("canny", "hed"), gen.pipe.controlnet.nets):
        net.conv_in.register_forward_hook(lambda *_, c=condition: calls.__setitem__(c, calls.get(c, 0) + 1))
    ours = [png_to_array(r["generated"]) for r in gen.generate(rows)]
    assert calls == {"canny": 5, "hed": 3}
    pil = lambda png: Image.open(io.BytesIO(png))  # noqa: E731
    theirs = diffusers_pipe(tiny_models)(
        [r["prompt"] for r in rows], negative_prompt=["blurry"] * len(rows),
        image=[[pil(r["control_canny"]), pil(r["control_hed"])] for r in rows],
        width=96, height=64, num_inference_steps=5, guidance_scale=7.5,
        controlnet_conditioning_scale=[1.0, 0.5], control_guidance_start=[0.0, 0.0], control_guidance_end=[1.0, 0.6],
        generator=[torch.Generator().manual_seed(r["seed"]) for r in rows], output_type="pil",
    ).images
    for got, want in zip(ours, theirs):
        np.testing.assert_array_equal(got, np.asarray(want))


def test_batch_invariance(multi):
    """A sample's noise comes from its own generator, so it does not depend on its batch. The pixels
    agree up to float reduction order inside batched matmuls (at most one level, rarely)."""
    rows = make_rows()
    batched = [png_to_array(r["generated"]).astype(int) for r in multi.generate(rows)]
    for row, together in zip(rows, batched):
        alone = png_to_array(multi.generate([row])[0]["generated"]).astype(int)
        diff = np.abs(alone - together)
        assert diff.max() <= 1 and (diff > 0).mean() < 0.001
    assert np.abs(batched[0][:, :64] - batched[1][:, :64]).mean() > 5  # different seeds, different images


def test_initial_noise_is_per_row(multi):
    """The exact part of batch invariance: each row's starting latents depend on its seed alone."""
    rows = make_rows()
    gens = [torch.Generator().manual_seed(r["seed"]) for r in rows]
    batch = multi.pipe.prepare_latents(4, 4, 64, 96, torch.float32, "cpu", gens)
    for i, row in enumerate(rows):
        alone = multi.pipe.prepare_latents(1, 4, 64, 96, torch.float32, "cpu", [torch.Generator().manual_seed(row["seed"])])
        assert torch.equal(batch[i : i + 1], alone)


def test_mixed_sizes_in_one_batch(multi):
    rows = make_rows((96, 64))[:2] + make_rows((64, 64))[2:]
    out = multi.generate(rows)
    assert [png_to_array(r["generated"]).shape for r in out] == [(64, 96, 3)] * 2 + [(64, 64, 3)] * 2
    assert out[0]["controlnet_conditioning_scale"] == [1.0, 0.5]
    assert out[0]["base_model_revision"].startswith("sha256:")


@pytest.mark.parametrize("scheduler", ["unipc", "dpmpp_2m", "ddim", "euler_a"])
def test_every_scheduler_is_deterministic_per_seed(tiny_models, scheduler):
    gen = generator(tiny_models, scheduler=scheduler, controlnets=[{"condition": "canny", "model": tiny_models["controlnet/canny"]}])
    assert gen.pipe.scheduler.__class__.__name__ == {
        "unipc": "UniPCMultistepScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler",
        "ddim": "DDIMScheduler", "euler_a": "EulerAncestralDiscreteScheduler"}[scheduler]
    rows = make_rows()[:2]
    first = [r["generated"] for r in gen.generate(rows)]
    second = [r["generated"] for r in gen.generate(list(reversed(rows)))]
    assert first == list(reversed(second))
    assert gen.generate(rows)[0]["scheduler"] == scheduler


def test_out_of_memory_halves_the_batch_and_retries(tiny_models):
    gen = generator(tiny_models)
    calls, real_run = [], gen.run

    def run_with_small_memory(rows, width, height):
        calls.append(len(rows))
        if len(rows) > 1:  # injected: this "GPU" fits one image at a time
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_run(rows, width, height)

    gen.run = run_with_small_memory
    rows = make_rows()
    out = gen.generate(rows)
    assert calls[:3] == [3, 1, 1]  # batch_size 3 fails, halves to 1 and stays there
    assert gen.max_batch == 1 and len(out) == 4
    gen.run = real_run
    for row, got in zip(rows, out):
        assert got["generated"] == gen.generate([row])[0]["generated"]


def test_one_failing_row_does_not_take_its_batch_down(multi):
    rows = make_rows()
    rows[2]["control_hed"] = b"not a png"
    out = multi(table_of(rows)).to_pylist()
    assert [r.get("error_stage") for r in out] == [None, None, "generate", None]
    assert "UnidentifiedImageError" == out[2]["error_type"]
    assert all(r["generated"] for i, r in enumerate(out) if i != 2)
