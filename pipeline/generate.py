"""The generator actor: diffusers' StableDiffusionControlNetPipeline over batches of sample rows.

The pipeline loads once per actor (`__init__`); `__call__` handles a batch. Every row gets its own
`torch.Generator` seeded from the row's seed, so a sample's output does not depend on which rows
share its batch. The maths is diffusers' own: this stage only feeds it and encodes the result.
"""

from __future__ import annotations

import io
import logging
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from pipeline.config import GenerationConfig
from pipeline.io.images import array_to_png
from pipeline.models import ResolvedModel
from pipeline.rows import Row, map_batch_isolated

log = logging.getLogger(__name__)


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


def torch_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device == "cuda" else torch.float32
    return getattr(torch, name)


def load_pipeline(gen: GenerationConfig, base: ResolvedModel, controlnets: list[ResolvedModel], device: str):
    """Load the ControlNet pipeline exactly as a diffusers user would, from hub ids or directories."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from diffusers import MultiControlNetModel

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


class Generate:
    def __init__(self, gen: GenerationConfig, base: ResolvedModel, controlnets: list[ResolvedModel]):
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.gen = gen
        self.pipe = load_pipeline(gen, base, controlnets, self.device)
        self.conditions = [cn.condition for cn in gen.controlnets]
        self.multi = len(gen.controlnets) > 1
        self.max_batch = gen.batch_size  # lowered for good after an out-of-memory error
        self.provenance: Row = {
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

    def __call__(self, batch: pa.Table) -> pa.Table:
        return map_batch_isolated("generate", batch, self.generate)

    def generate(self, rows: list[Row]) -> list[Row]:
        by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, row in enumerate(rows):
            by_size[(row["width"], row["height"])].append(i)
        out: list[Row | None] = [None] * len(rows)
        for (width, height), idx in by_size.items():
            images = self.run_fitting([rows[i] for i in idx], width, height)
            for i, image in zip(idx, images):
                out[i] = {**rows[i], **self.provenance, "generated": array_to_png(image)}
        return out

    def run_fitting(self, rows: list[Row], width: int, height: int) -> list[np.ndarray]:
        """Run in chunks of at most `max_batch`; on out-of-memory halve it and retry the chunk."""
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

    def run(self, rows: list[Row], width: int, height: int) -> list[np.ndarray]:
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


def to_uint8(image: np.ndarray) -> np.ndarray:
    """diffusers' own float [0, 1] to uint8 conversion (as in `numpy_to_pil`)."""
    return (image * 255).round().astype(np.uint8)


def _pil(png: bytes) -> Image.Image:
    return Image.open(io.BytesIO(png)).convert("RGB")
