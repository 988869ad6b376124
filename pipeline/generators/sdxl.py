"""Stable Diffusion XL + ControlNet: diffusers' `StableDiffusionXLControlNetPipeline` (img2img:
`StableDiffusionXLControlNetImg2ImgPipeline`, inpaint: `StableDiffusionXLControlNetInpaintPipeline`), one
`ControlNetModel` per condition (a `MultiControlNetModel` for several), guess mode.

SDXL's micro-conditioning comes from each row's real sizes: `original_size` is the photo's size before the
size policy resized it (upright, after EXIF rotation), `target_size` the generated size, no crop
(`crops_coords_top_left` (0, 0)); all three are recorded per row. diffusers takes one value of each per
call, so rows with different original sizes go through separate calls.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import pyarrow as pa

from pipeline.generators._controlnet import GUESS_MODE_COLUMN, ControlNetGenerator
from pipeline.rows import Row

MICRO_COLUMNS = [
    ("original_size", pa.list_(pa.int32()), "SDXL micro-conditioning: the photo's size before resizing, [height, width]."),
    ("target_size", pa.list_(pa.int32()), "SDXL micro-conditioning: the generated size, [height, width]."),
    ("crops_coords_top_left", pa.list_(pa.int32()), "SDXL micro-conditioning: crop offset, [top, left]."),
]


def micro_conditioning(row: Row) -> dict[str, tuple[int, int]]:
    """SDXL's size conditioning from the row's transform record: (height, width) pairs as diffusers takes them."""
    transform = json.loads(row["transform"]) if row.get("transform") else {}
    width, height = transform.get("original_size") or (row["width"], row["height"])
    if transform.get("exif_orientation", 1) in (5, 6, 7, 8):  # rotated by 90 degrees: the upright photo is h x w
        width, height = height, width
    return {"original_size": (int(height), int(width)), "target_size": (row["height"], row["width"]),
            "crops_coords_top_left": (0, 0)}


class SDXLMicroConditioning(ControlNetGenerator):
    """SDXL families: per-row micro-conditioning, rows grouped by it."""

    def row_fields(self, row: Row) -> Row:
        return super().row_fields(row) | {k: list(v) for k, v in micro_conditioning(row).items()}

    def call_groups(self, rows: list[Row]) -> list[list[int]]:
        groups: dict[Any, list[int]] = defaultdict(list)
        for i, row in enumerate(rows):
            groups[tuple(micro_conditioning(row).items())].append(i)
        return list(groups.values())

    def call_kwargs(self, rows: list[Row], width: int, height: int) -> dict[str, Any]:
        return super().call_kwargs(rows, width, height) | micro_conditioning(rows[0])


class StableDiffusionXLControlNet(SDXLMicroConditioning):
    family = "sdxl"
    label = "Stable Diffusion XL + ControlNet generations"
    pipelines = {
        "text2img": "StableDiffusionXLControlNetPipeline",
        "img2img": "StableDiffusionXLControlNetImg2ImgPipeline",
        "inpaint": "StableDiffusionXLControlNetInpaintPipeline",
    }
    knobs = frozenset({"guess_mode"})
    text2img_control_arg = "image"
    multi_batched_text2img = False  # diffusers' SDXL pipelines take one control image per net and call
    pipeline_kwargs = {"add_watermarker": False}
    family_columns = [GUESS_MODE_COLUMN, *MICRO_COLUMNS]


GENERATOR = StableDiffusionXLControlNet
