"""Stable Diffusion XL + ControlNet Union (xinsir's controlnet-union-sdxl-1.0 and ProMax): one
`ControlNetUnionModel` for every condition, diffusers' `StableDiffusionXLControlNetUnionPipeline` (img2img:
`...UnionImg2ImgPipeline`, inpaint: `...UnionInpaintPipeline`).

Each condition's `control_mode` comes from its annotator (xinsir's table: 0 openpose, 1 depth,
2 hed/pidi/scribble/teed, 3 canny/lineart/mlsd, 4 normal, 5 segmentation; ProMax adds 6 tile, 7 repaint) or
from `controlnets[i].control_mode`, and is recorded per row with SDXL's micro-conditioning.
"""

from __future__ import annotations

from pipeline.generators._controlnet import CONTROL_MODES_COLUMN, GUESS_MODE_COLUMN, XINSIR_UNION_MODES
from pipeline.generators.sdxl import MICRO_COLUMNS, SDXLMicroConditioning


class StableDiffusionXLControlNetUnion(SDXLMicroConditioning):
    family = "sdxl_union"
    label = "Stable Diffusion XL + ControlNet Union generations"
    pipelines = {
        "text2img": "StableDiffusionXLControlNetUnionPipeline",
        "img2img": "StableDiffusionXLControlNetUnionImg2ImgPipeline",
        "inpaint": "StableDiffusionXLControlNetUnionInpaintPipeline",
    }
    controlnet_class = "ControlNetUnionModel"
    multi_class = None
    union_modes = XINSIR_UNION_MODES
    one_union_model = True
    multi_per_row = False
    knobs = frozenset({"guess_mode"})
    pipeline_kwargs = {"add_watermarker": False}
    family_columns = [GUESS_MODE_COLUMN, CONTROL_MODES_COLUMN, *MICRO_COLUMNS]


GENERATOR = StableDiffusionXLControlNetUnion
