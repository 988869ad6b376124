"""Stable Diffusion 3 / 3.5 + ControlNet: diffusers' `StableDiffusion3ControlNetPipeline` with
`SD3ControlNetModel`s (an `SD3MultiControlNetModel` for several), text2img.

diffusers has no SD3 ControlNet img2img pipeline, and its `StableDiffusion3ControlNetInpaintingPipeline` drives
an inpainting ControlNet (the masked photo is its control image) rather than a condition's ControlNet: both modes
are refused at config time. Noise is drawn on the CPU from each row's seed, as in every family.

diffusers' SD3 ControlNet pipeline samples the control image's VAE latent from torch's global random state (it
passes no generator there), which would make a row depend on its batch and on what ran before. So rows go one
per call and the global state is seeded with the row's seed first (`torch.manual_seed`): on CPU the output is
then a function of the row alone; on a GPU that one posterior sample comes from the CUDA generator.
"""

from __future__ import annotations

from pipeline.generators._controlnet import ControlNetGenerator
from pipeline.rows import Row


class StableDiffusion3ControlNet(ControlNetGenerator):
    family = "sd3"
    label = "Stable Diffusion 3 + ControlNet generations"
    pipelines = {"text2img": "StableDiffusion3ControlNetPipeline"}
    missing = {
        "img2img": "no SD3 ControlNet img2img pipeline",
        "inpaint": "StableDiffusion3ControlNetInpaintingPipeline takes an inpainting ControlNet, not a condition's",
    }
    schedulers = ("flow_match_euler",)
    auto_gpu_dtype = "bfloat16"  # trained in bf16; float16 overflows in their transformers
    controlnet_class = "SD3ControlNetModel"
    multi_class = "SD3MultiControlNetModel"
    multi_per_row = False
    family_columns = []
    global_random_state = True

    def call_groups(self, rows: list[Row]) -> list[list[int]]:
        return [[i] for i in range(len(rows))]

    def before_call(self, rows: list[Row]) -> None:
        import torch

        torch.manual_seed(rows[0]["seed"])


GENERATOR = StableDiffusion3ControlNet
