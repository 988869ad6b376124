"""Stable Diffusion 1.x + ControlNet: diffusers' `StableDiffusionControlNetPipeline`, one
`ControlNetModel` per condition (a `MultiControlNetModel` for several).

Every row gets its own `torch.Generator` seeded from the row's seed, so a sample's output does not
depend on which rows share its batch. The maths is diffusers' own: this module only feeds it.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.config import GenerationConfig
from pipeline.generators.base import Generator, ModelRef, Models, to_uint8, torch_dtype
from pipeline.models import ResolvedModel
from pipeline.rows import Row


def make_scheduler(name: str, config: Any):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, UniPCMultistepScheduler

    if name == "unipc":
        return UniPCMultistepScheduler.from_config(config)
    if name == "dpmpp_2m":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "euler_a":
        return EulerAncestralDiscreteScheduler.from_config(config)
    raise ValueError(f"unknown scheduler {name!r}")


def load_pipeline(gen: GenerationConfig, base: ResolvedModel, controlnets: list[ResolvedModel], device: str):
    """Load the ControlNet pipeline exactly as a diffusers user would, from hub ids or directories."""
    from diffusers import ControlNetModel, MultiControlNetModel, StableDiffusionControlNetPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    dtype = torch_dtype(gen.dtype, device)
    # safetensors only unless the config allows pickle checkpoints (None: diffusers' own preference)
    common = {"dtype": dtype, "local_files_only": gen.local_files_only, "use_safetensors": None if gen.allow_pickle else True}
    nets = [ControlNetModel.from_pretrained(m.load_path, revision=m.load_revision, **common) for m in controlnets]
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        base.load_path,
        revision=base.load_revision,
        controlnet=nets[0] if len(nets) == 1 else MultiControlNetModel(nets),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        **common,
    )
    pipe.scheduler = make_scheduler(gen.scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


class StableDiffusionControlNet(Generator):
    family = "sd15"
    label = "Stable Diffusion + ControlNet generations"
    columns = [
        ("base_model", pa.string(), "Stable Diffusion model: hub id or local directory."),
        ("base_model_revision", pa.string(), "Resolved commit hash (hub) or sha256 fingerprint (directory)."),
        ("controlnet_models", pa.list_(pa.string()), "ControlNet models, one per condition."),
        ("controlnet_revisions", pa.list_(pa.string()), "Resolved revisions of the ControlNets."),
        ("controlnet_conditions", pa.list_(pa.string()), "Annotator id feeding each ControlNet."),
        ("controlnet_conditioning_scale", pa.list_(pa.float64()), "Per-ControlNet conditioning scale."),
        ("control_guidance_start", pa.list_(pa.float64()), "Per-ControlNet guidance start (fraction of steps)."),
        ("control_guidance_end", pa.list_(pa.float64()), "Per-ControlNet guidance end (fraction of steps)."),
        ("scheduler", pa.string(), "Scheduler name (unipc, dpmpp_2m, ddim, euler_a)."),
        ("num_inference_steps", pa.int32(), "Denoising steps."),
        ("guidance_scale", pa.float64(), "Classifier-free guidance scale."),
        ("dtype", pa.string(), "Torch dtype of the diffusion models."),
    ]

    @classmethod
    def model_refs(cls, gen: GenerationConfig) -> dict[str, ModelRef | list[ModelRef]]:
        return {
            "base_model": ModelRef("base_model", gen.base_model, gen.revision, "model_index.json"),
            "controlnets": [ModelRef(f"controlnet {cn.condition}", cn.model, cn.revision, "config.json")
                            for cn in gen.controlnets],
        }

    def load(self, models: Models) -> None:
        self.pipe = load_pipeline(self.gen, models["base_model"], models["controlnets"], self.device)
        self.conditions = [cn.condition for cn in self.gen.controlnets]
        self.multi = len(self.gen.controlnets) > 1

    def provenance_fields(self, models: Models) -> Row:
        gen, base, controlnets = self.gen, models["base_model"], models["controlnets"]
        return {
            "base_model": base.model,
            "base_model_revision": base.commit,
            "controlnet_models": [m.model for m in controlnets],
            "controlnet_revisions": [m.commit for m in controlnets],
            "controlnet_conditions": self.conditions,
            "controlnet_conditioning_scale": [cn.conditioning_scale for cn in gen.controlnets],
            "control_guidance_start": [cn.guidance_start for cn in gen.controlnets],
            "control_guidance_end": [cn.guidance_end for cn in gen.controlnets],
            "scheduler": gen.scheduler,
            "num_inference_steps": gen.steps,
            "guidance_scale": gen.guidance_scale,
            "dtype": str(self.pipe.unet.dtype).removeprefix("torch."),
        }

    def run(self, rows: list[Row], width: int, height: int) -> list[np.ndarray]:
        import torch

        # multi-ControlNet: per sample, one control image per net (diffusers' nested-list layout)
        controls = [[_pil(r[f"control_{c}"]) for c in self.conditions] for r in rows]
        result = self.pipe(
            prompt=[r["prompt"] for r in rows],
            negative_prompt=[r["negative_prompt"] for r in rows],
            image=controls if self.multi else [c[0] for c in controls],
            width=width,
            height=height,
            num_inference_steps=self.gen.steps,
            guidance_scale=self.gen.guidance_scale,
            controlnet_conditioning_scale=self._per_net("conditioning_scale"),
            control_guidance_start=self._per_net("guidance_start"),
            control_guidance_end=self._per_net("guidance_end"),
            generator=[torch.Generator(self.device).manual_seed(r["seed"]) for r in rows],
            output_type="np",
        )
        return [to_uint8(img) for img in result.images]

    def _per_net(self, field: str):
        values = [getattr(cn, field) for cn in self.gen.controlnets]
        return values if self.multi else values[0]


def _pil(png: bytes) -> Image.Image:
    return Image.open(io.BytesIO(png)).convert("RGB")


GENERATOR = StableDiffusionControlNet
