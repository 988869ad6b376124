"""Tests for pipeline.testing: tiny random-weight models load through the real loaders, offline."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported: nothing may be downloaded

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from controlnet_aux import HEDdetector
from diffusers import ControlNetModel, MultiControlNetModel, StableDiffusionControlNetPipeline
from PIL import Image

from pipeline.annotators import ANNOTATORS
from pipeline.testing import HEAVY, MARKER, make_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return make_tiny(tmp_path_factory.mktemp("tiny"), conditions=("canny", "hed"), seed=0)


@pytest.fixture(scope="module")
def pipe(tiny: dict[str, str]) -> StableDiffusionControlNetPipeline:
    controlnet = ControlNetModel.from_pretrained(tiny["controlnet/canny"])
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        tiny["base_model"], controlnet=controlnet, safety_checker=None
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _control_image(seed: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _generate(pipe: StableDiffusionControlNetPipeline, image, **kwargs) -> np.ndarray:
    return pipe(
        "a photo of a cat",
        image=image,
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).images


def test_layout(tiny: dict[str, str]) -> None:
    out = Path(tiny["base_model"]).parent
    assert set(tiny) >= {"base_model", "controlnet/canny", "controlnet/hed", "annotators"}
    assert {k for k in tiny if k.startswith("annotator/")} == {"annotator/depth_anything", "annotator/seg_ade20k",
                                                                    "annotator/depth_zoe"}
    assert tiny["controlnet/canny"] == str(out / "controlnet-canny")
    assert tiny["annotators"] == str(out / "annotators")
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (out / "stable-diffusion" / sub).is_dir(), sub
    assert (out / "stable-diffusion" / "model_index.json").is_file()
    assert (out / "stable-diffusion" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "controlnet-hed" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "annotators" / "ControlNetHED.pth").is_file()
    assert "random" in (out / "README.md").read_text().lower()
    marker = json.loads((out / MARKER).read_text())
    # the default set: every neural annotator (one with a default_model) but the heavy ones, in registry order
    default = [name for name, cls in ANNOTATORS.items() if cls.default_model and name not in HEAVY]
    assert {"hed", "dwpose", "depth_anything"} <= set(default) and "canny" not in default
    assert marker == {"seed": 0, "conditions": ["canny", "hed"], "annotators": default,
                      "captioners": ["blip", "florence2"]}
    for kind in ("blip", "florence2"):  # loaded through from_pretrained in tests/test_captions.py
        assert tiny[f"captioner/{kind}"] == str(out / f"captioner-{kind}")
        assert (out / f"captioner-{kind}" / "model.safetensors").is_file()
        assert (out / f"captioner-{kind}" / "processor_config.json").is_file()
    assert "hed" in marker["annotators"] and "lineart_anime" not in marker["annotators"]  # heavy: only on request
    for name in marker["annotators"]:
        for f in ANNOTATORS[name].files:
            assert (Path(tiny.get(f"annotator/{name}", tiny["annotators"])) / f).exists(), (name, f)


def test_pipeline_loads_with_sd15_geometry(pipe: StableDiffusionControlNetPipeline) -> None:
    assert pipe.vae_scale_factor == 8
    assert pipe.safety_checker is None
    assert pipe.tokenizer.model_max_length == 77
    cn, unet = pipe.controlnet.config, pipe.unet.config
    for key in ("block_out_channels", "layers_per_block", "down_block_types", "cross_attention_dim",
                "attention_head_dim", "norm_num_groups"):
        assert cn[key] == unet[key], key
    assert len(cn.conditioning_embedding_out_channels) == 4  # 8x conditioning downsampling
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.scheduler.config.steps_offset == 1


def test_controlnet_pipeline_runs(pipe: StableDiffusionControlNetPipeline) -> None:
    images = _generate(pipe, _control_image(0))
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all()
    assert images.min() >= 0.0 and images.max() <= 1.0
    # Same inputs, same output; and the control image actually conditions the result.
    np.testing.assert_array_equal(images, _generate(pipe, _control_image(0)))
    assert not np.array_equal(images, _generate(pipe, _control_image(1)))


def test_multi_controlnet_pipeline_runs(tiny: dict[str, str], pipe: StableDiffusionControlNetPipeline) -> None:
    controlnets = [ControlNetModel.from_pretrained(tiny[f"controlnet/{c}"]) for c in ("canny", "hed")]
    multi = StableDiffusionControlNetPipeline.from_pretrained(
        tiny["base_model"], controlnet=controlnets, safety_checker=None
    )
    multi.set_progress_bar_config(disable=True)
    assert isinstance(multi.controlnet, MultiControlNetModel)
    images = _generate(multi, [_control_image(0), _control_image(1)], controlnet_conditioning_scale=[1.0, 0.5])
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all()
    assert images.min() >= 0.0 and images.max() <= 1.0
    # Each ControlNet counts: with the hed one at scale 0 the result is the canny-only pipeline's,
    # and at 0.5 it moves the result away from it.
    canny_only = _generate(pipe, _control_image(0))
    hed_off = _generate(multi, [_control_image(0), _control_image(1)], controlnet_conditioning_scale=[1.0, 0.0])
    np.testing.assert_allclose(hed_off, canny_only, atol=1e-5)
    assert np.abs(images - canny_only).max() > 0.01


def test_conditions_have_different_weights(tiny: dict[str, str]) -> None:
    canny = ControlNetModel.from_pretrained(tiny["controlnet/canny"]).state_dict()
    hed = ControlNetModel.from_pretrained(tiny["controlnet/hed"]).state_dict()
    assert canny.keys() == hed.keys()
    assert any(not torch.equal(canny[k], hed[k]) for k in canny)


def test_tokenizer_round_trip(pipe: StableDiffusionControlNetPipeline) -> None:
    tok = pipe.tokenizer
    ids = tok("a photo of a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[0] == tok.bos_token_id
    assert ids[-1] == tok.pad_token_id
    assert max(ids) < pipe.text_encoder.config.vocab_size
    assert pipe.text_encoder.config.bos_token_id == tok.bos_token_id
    assert pipe.text_encoder.config.eos_token_id == tok.eos_token_id
    assert pipe.text_encoder.config.pad_token_id == tok.pad_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "a photo of a cat"
    other = tok("a photo of a dog", padding="max_length", max_length=77, truncation=True).input_ids
    assert ids != other
    long = tok("word " * 200, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(long) == 77


def test_hed_annotator_loads_and_runs(tiny: dict[str, str]) -> None:
    # controlnet-aux loads with torch.load's default; require a plain state_dict explicitly too.
    state = torch.load(Path(tiny["annotators"]) / "ControlNetHED.pth", map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())

    hed = HEDdetector.from_pretrained(tiny["annotators"])
    detect = lambda image: hed(image, detect_resolution=64, image_resolution=64, output_type="np")
    edges = detect(_control_image(0))
    assert edges.shape == (64, 64, 3)
    assert edges.dtype == np.uint8
    # a map that depends on its input, the same each time: not a constant the loader fell back to
    assert edges.std() > 1
    np.testing.assert_array_equal(detect(_control_image(0)), edges)
    assert not np.array_equal(detect(_control_image(1)), edges)


def test_idempotent(tiny: dict[str, str]) -> None:
    out = Path(tiny["base_model"]).parent
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert make_tiny(out, conditions=("canny", "hed"), seed=0) == tiny
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert after == before


def test_rewrites_when_seed_changes(tmp_path: Path) -> None:
    unet = tmp_path / "stable-diffusion" / "unet" / "diffusion_pytorch_model.safetensors"
    make_tiny(tmp_path, conditions=("canny",), seed=0)
    first = unet.read_bytes()
    make_tiny(tmp_path, conditions=("canny",), seed=1)
    assert unet.read_bytes() != first
    assert json.loads((tmp_path / MARKER).read_text())["seed"] == 1


def test_deterministic(tiny: dict[str, str], tmp_path: Path) -> None:
    again = make_tiny(tmp_path, conditions=("canny", "hed"), seed=0)
    for rel in ("stable-diffusion/unet/diffusion_pytorch_model.safetensors",
                "stable-diffusion/text_encoder/model.safetensors",
                "stable-diffusion/vae/diffusion_pytorch_model.safetensors",
                "controlnet-hed/diffusion_pytorch_model.safetensors",
                "captioner-blip/model.safetensors", "captioner-florence2/model.safetensors"):
        a = Path(tiny["base_model"]).parent / rel
        b = Path(again["base_model"]).parent / rel
        assert a.read_bytes() == b.read_bytes(), rel


@pytest.mark.parametrize("args, message", [
    (["--captioners", "nope"], "no tiny models for captioners ['nope']; known: ['blip', 'florence2']"),
    (["--families", "nope"], "no tiny models for families ['nope']"),
    (["--annotators", "nope"], "unknown annotators ['nope']"),
])
def test_make_tiny_names_an_unknown_model_before_writing_anything(tmp_path, capsys, args, message) -> None:
    from pipeline.cli import main

    assert main(["models", "make-tiny", str(tmp_path / "models"), *args]) == 2
    assert f"error: {message}" in capsys.readouterr().err
    assert not (tmp_path / "models").exists()  # the captioners were checked once every other model was written


def test_make_tiny_into_a_file_is_refused(tmp_path, capsys) -> None:
    from pipeline.cli import main

    (tmp_path / "a-file").write_text("")
    assert main(["models", "make-tiny", str(tmp_path / "a-file")]) == 2
    assert f"error: {tmp_path / 'a-file'} is a file, not a directory" in capsys.readouterr().err
