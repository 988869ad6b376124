"""Flux.1 + ControlNet: diffusers' `FluxControlNetPipeline` (img2img: `FluxControlNetImg2ImgPipeline`, inpaint:
`FluxControlNetInpaintPipeline`) with `FluxControlNetModel`s (a `FluxMultiControlNetModel` for several).

Union checkpoints (InstantX/FLUX.1-dev-Controlnet-Union, Shakker-Labs/FLUX.1-dev-ControlNet-Union-Pro) take a
`control_mode` per condition (0 canny, 1 tile, 2 depth, 3 blur, 4 pose, 5 gray, 6 low quality); conditions naming
the same Union model share one network. `guidance_scale` is Flux-dev's distilled guidance (an embedding, one
pass); `true_cfg_scale` > 1 adds real classifier-free guidance with the negative prompt (text2img only; two
passes). Noise is drawn on the CPU from each row's seed, as in every family.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from pipeline.generators._controlnet import CONTROL_MODES_COLUMN, ControlNetGenerator
from pipeline.generators._fit import check_fit
from pipeline.models import ModelUnavailable

FLUX_UNION_MODES = {"canny": 0, "tile": 1, "depth": 2, "blur": 3, "openpose": 4, "gray": 5, "lq": 6}


class FluxControlNet(ControlNetGenerator):
    family = "flux"
    label = "Flux.1 + ControlNet generations"
    pipelines = {
        "text2img": "FluxControlNetPipeline",
        "img2img": "FluxControlNetImg2ImgPipeline",
        "inpaint": "FluxControlNetInpaintPipeline",
    }
    schedulers = ("flow_match_euler",)
    auto_gpu_dtype = "bfloat16"  # trained in bf16; float16 overflows in their transformers
    size_multiple = 16  # the VAE's 8, times the transformer's 2x2 patches
    controlnet_class = "FluxControlNetModel"
    multi_class = "FluxMultiControlNetModel"
    union_modes = FLUX_UNION_MODES
    union_modes_required = False
    union_may_share = True
    multi_per_row = False
    knobs = frozenset({"true_cfg_scale"})
    negative_prompt_modes = frozenset({"text2img"})  # the img2img and inpaint pipelines take no negative prompt
    family_columns = [("true_cfg_scale", pa.float64(), "Flux: true classifier-free guidance scale (1: off)."),
                      CONTROL_MODES_COLUMN]

    @classmethod
    def wrap_nets(cls, nets: list, gen) -> Any:
        import diffusers

        if len(nets) == 1 and len(gen.controlnets) == 1:
            return nets[0]
        return diffusers.FluxMultiControlNetModel(nets)  # one shared Union net, or one net per condition

    @classmethod
    def check_models(cls, gen, models: dict[str, Any]) -> None:
        """A Flux ControlNet is a Union one when its config has `num_mode`: then every condition needs a mode."""
        configs = check_fit(cls, models)
        configs = configs * len(gen.controlnets) if cls.shared_net(gen) else configs
        union = [None if c is None else c.get("num_mode") is not None for c in configs]  # None: unread
        if True in union and False in union:
            raise ModelUnavailable(f"generation.controlnets: Union ControlNets ({index(union, True)}) and "
                                   f"single-condition ones ({index(union, False)}) cannot be mixed in one flux job")
        for i, cn in enumerate(gen.controlnets):
            if union[i] and cn.control_mode is None:
                raise ModelUnavailable(f"generation.controlnets.{i}.control_mode: {cn.model} is a Union ControlNet; "
                                       f"set one of {', '.join(f'{k} ({v})' for k, v in FLUX_UNION_MODES.items())}")

    def load(self, models: dict[str, Any]) -> None:
        super().load(models)
        controlnet = self.pipe.controlnet
        self.union = all(net.union for net in getattr(controlnet, "nets", [controlnet]))

    def control_modes(self) -> list[int] | None:
        return super().control_modes() if getattr(self, "union", False) else None

    def call_kwargs(self, rows, width: int, height: int) -> dict[str, Any]:
        kw = super().call_kwargs(rows, width, height)
        if not self.union and len(self.conditions) > 1:
            # diffusers' Flux img2img/inpaint read a list of modes for several nets (None: not a Union net)
            kw["control_mode"] = [None] * len(self.conditions)
        return kw

    def one_control_per_call(self) -> bool:
        """diffusers' Flux img2img/inpaint pipelines give a Union net one mode row for the whole batch
        (shape (conditions, 1)), which only fits a batch of one: such rows go one by one."""
        return self.union and self.gen.mode != "text2img"


def index(values: list, value) -> str:
    """`0, 2`: where `value` is in `values`."""
    return ", ".join(str(i) for i, v in enumerate(values) if v is value)


GENERATOR = FluxControlNet
