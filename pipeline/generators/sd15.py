"""Stable Diffusion 1.x + ControlNet: diffusers' `StableDiffusionControlNetPipeline` (img2img:
`StableDiffusionControlNetImg2ImgPipeline`, inpaint: `StableDiffusionControlNetInpaintPipeline`), one
`ControlNetModel` per condition (a `MultiControlNetModel` for several), ControlNet's guess mode.

Every row gets its own CPU `torch.Generator` seeded from the row's seed, so a sample's output does not
depend on which rows share its batch nor on the device. The maths is diffusers' own: this module only feeds it.
"""

from __future__ import annotations

from pipeline.config import GenerationConfig
from pipeline.generators._controlnet import GUESS_MODE_COLUMN, ControlNetGenerator, make_scheduler
from pipeline.generators._controlnet import load_pipeline as _load_pipeline
from pipeline.models import ResolvedModel

__all__ = ["GENERATOR", "StableDiffusionControlNet", "load_pipeline", "make_scheduler"]


class StableDiffusionControlNet(ControlNetGenerator):
    family = "sd15"
    label = "Stable Diffusion + ControlNet generations"
    pipelines = {
        "text2img": "StableDiffusionControlNetPipeline",
        "img2img": "StableDiffusionControlNetImg2ImgPipeline",
        "inpaint": "StableDiffusionControlNetInpaintPipeline",
    }
    knobs = frozenset({"guess_mode"})
    text2img_control_arg = "image"
    pipeline_kwargs = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    family_columns = [GUESS_MODE_COLUMN]


def load_pipeline(gen: GenerationConfig, base: ResolvedModel, controlnets: list[ResolvedModel], device: str):
    """The family's pipeline for `gen.mode`, loaded exactly as a diffusers user would."""
    return _load_pipeline(StableDiffusionControlNet, gen, base, controlnets, device)


GENERATOR = StableDiffusionControlNet
