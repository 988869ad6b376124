"""What the ControlNet families share: one diffusers pipeline class per mode, loaded with `from_pretrained`,
fed each row's prompt, control maps, source image (img2img, inpaint) and mask (inpaint), with one CPU
`torch.Generator` per row. A family module (`sd15.py`, `sdxl.py`, ...) only declares its classes and knobs;
the maths is diffusers' own.
"""

from __future__ import annotations

import io
import json
import logging
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.config import GenerationConfig
from pipeline.generators._fit import check_fit
from pipeline.generators.base import (
    WORKER_COLUMNS,
    Column,
    Generator,
    ModelRef,
    Models,
    cpu_generators,
    to_uint8,
    torch_dtype,
)
from pipeline.models import no_random_weights
from pipeline.rows import Row

log = logging.getLogger(__name__)
# generation.compile: where it compiles, and with what (inductor's CPU code is not trusted: see load_pipeline)
COMPILES_ON = ("cuda",)
COMPILE_BACKEND = "inductor"

# Union ControlNets' condition types, by annotator name. xinsir's controlnet-union-sdxl-1.0 (and ProMax):
XINSIR_UNION_MODES = {
    "openpose": 0, "depth": 1, "hed": 2, "pidi": 2, "scribble": 2, "teed": 2, "canny": 3, "lineart": 3, "mlsd": 3,
    "normal": 4, "segmentation": 5, "tile": 6, "repaint": 7,
}
# Annotator name -> the table's condition name (the annotators' families)
ANNOTATOR_CONDITION = {
    "openpose": "openpose", "openpose_hand": "openpose", "openpose_face": "openpose", "openpose_full": "openpose",
    "dwpose": "openpose", "depth_midas": "depth", "depth_leres": "depth", "depth_anything": "depth",
    "depth_zoe": "depth", "hed": "hed", "hed_safe": "hed", "pidinet": "pidi", "pidinet_safe": "pidi",
    "scribble_hed": "scribble", "scribble_pidinet": "scribble", "scribble_xdog": "scribble", "teed": "teed",
    "canny": "canny", "lineart": "lineart", "lineart_coarse": "lineart", "lineart_anime": "lineart",
    "lineart_standard": "lineart", "mlsd": "mlsd", "normal_bae": "normal", "seg_ade20k": "segmentation",
    "tile": "tile",
}

# What `models fetch` downloads of a hub repo: exactly the files `from_pretrained` loads without a variant, so
# neither the single-file checkpoints some repos carry at their top level (sd_xl_base_1.0.safetensors,
# flux1-dev.safetensors, v1-5-pruned.safetensors) nor fp16/other variants nor pickle copies.
_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model-*-of-*.safetensors",
            "diffusion_pytorch_model.safetensors.index.json", "model.safetensors", "model-*-of-*.safetensors",
            "model.safetensors.index.json")
PIPELINE_FILES = ("model_index.json", "*/config.json", "*/*config*.json", "*/*.txt", "*/tokenizer*.json",
                  "*/special_tokens_map.json", "*/vocab.json", "*/*.model", *(f"*/{w}" for w in _WEIGHTS))
CONTROLNET_FILES = ("config.json", *_WEIGHTS[:3])

COMMON_COLUMNS: list[Column] = [
    ("base_model", pa.string(), "Base diffusion model: hub id or local directory."),
    ("base_model_revision", pa.string(), "Resolved commit hash (hub) or sha256 fingerprint (directory)."),
    ("controlnet_models", pa.list_(pa.string()), "ControlNet models, one per condition."),
    ("controlnet_revisions", pa.list_(pa.string()), "Resolved revisions of the ControlNets."),
    ("controlnet_conditions", pa.list_(pa.string()), "Annotator id feeding each ControlNet."),
    ("controlnet_conditioning_scale", pa.list_(pa.float64()), "Per-ControlNet conditioning scale."),
    ("control_guidance_start", pa.list_(pa.float64()), "Per-ControlNet guidance start (fraction of steps)."),
    ("control_guidance_end", pa.list_(pa.float64()), "Per-ControlNet guidance end (fraction of steps)."),
    ("scheduler", pa.string(), "Scheduler name (unipc, dpmpp_2m, ddim, euler_a, flow_match_euler)."),
    ("num_inference_steps", pa.int32(), "Denoising steps."),
    ("guidance_scale", pa.float64(), "Guidance scale (classifier-free; Flux: the distilled guidance embedding)."),
    ("dtype", pa.string(), "Torch dtype of the diffusion models."),
]
MODE_COLUMNS: list[Column] = [
    ("generator_family", pa.string(), "Generator family (generation.family)."),
    ("generation_mode", pa.string(), "text2img, img2img or inpaint."),
    ("pipeline_class", pa.string(), "The diffusers pipeline class that generated the row."),
    ("scheduler_class", pa.string(), "The diffusers scheduler class."),
    ("scheduler_config", pa.string(), "The scheduler's full config (JSON)."),
    ("strength", pa.float64(), "img2img/inpaint: how far the source image was noised; null for text2img."),
    ("inpaint_mask", pa.binary(), "inpaint: the mask (PNG, white = repainted); null otherwise."),
    ("inpaint_mask_source", pa.string(), "inpaint: generation.mask as JSON (annotator, classes, repaint, margin)."),
]
GUESS_MODE_COLUMN: Column = ("guess_mode", pa.bool_(), "ControlNet guess mode (no prompt needed to follow the control).")
CONTROL_MODES_COLUMN: Column = ("control_modes", pa.list_(pa.int32()),
                                "Union ControlNet: condition type (control_mode) of each condition; null otherwise.")


class ControlNetGenerator(Generator):
    """A family of diffusers ControlNet pipelines; subclasses set the class attributes."""

    pipelines: ClassVar[dict[str, str]]  # mode -> diffusers pipeline class
    missing: ClassVar[dict[str, str]] = {}  # mode -> why diffusers has no pipeline for it (refused at config time)
    controlnet_class: ClassVar[str] = "ControlNetModel"
    multi_class: ClassVar[str | None] = "MultiControlNetModel"
    knobs: ClassVar[frozenset[str]] = frozenset()  # optional knobs: guess_mode, true_cfg_scale
    union_modes: ClassVar[dict[str, int] | None] = None  # condition name -> control_mode (Union ControlNets)
    one_union_model: ClassVar[bool] = False  # all conditions go through one Union network
    union_may_share: ClassVar[bool] = False  # conditions naming the same model share one (Union) network
    union_modes_required: ClassVar[bool] = True  # False: the checkpoint may or may not be a Union one
    text2img_control_arg: ClassVar[str] = "control_image"  # the control argument's name in text2img
    multi_per_row: ClassVar[bool] = True  # several ControlNets: control images per row (else per net)
    multi_batched_text2img: ClassVar[bool] = True  # several ControlNets: text2img takes per-row control images
    negative_prompt_modes: ClassVar[frozenset[str]] = frozenset({"text2img", "img2img", "inpaint"})
    pipeline_kwargs: ClassVar[dict[str, Any]] = {}  # extra from_pretrained arguments
    family_columns: ClassVar[list[Column]] = []
    auto_gpu_dtype: ClassVar[str] = "float16"  # what dtype "auto" means on a GPU

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.columns = COMMON_COLUMNS + MODE_COLUMNS + cls.family_columns + WORKER_COLUMNS

    # ---- config time ----------------------------------------------------------------------------
    @classmethod
    def check(cls, cfg: Any) -> GenerationConfig:
        gen = super().check(cfg)
        if gen.mode not in cls.pipelines:
            why = cls.missing.get(gen.mode, "")
            raise ValueError(f"generation.mode: {cls.family} has no {gen.mode} mode (diffusers has no such pipeline"
                             f"{': ' + why if why else ''}); modes: {list(cls.pipelines)}")
        if gen.guess_mode and "guess_mode" not in cls.knobs:
            raise ValueError(f"generation.guess_mode: {cls.family} pipelines have no guess mode")
        if gen.true_cfg_scale != 1.0 and not ("true_cfg_scale" in cls.knobs and gen.mode == "text2img"):
            raise ValueError(f"generation.true_cfg_scale: only flux text2img takes it (diffusers' "
                             f"{cls.pipelines[gen.mode]} has none)")
        if gen.strength != type(gen).model_fields["strength"].default and gen.mode == "text2img":
            raise ValueError("generation.strength: only img2img and inpaint use it (generation.mode is text2img)")
        if gen.mode == "inpaint" and gen.mask is None:
            raise ValueError("generation.mask: inpaint needs a mask (an annotator id, with classes for seg_ade20k)")
        if gen.mask is not None:
            check_mask(cfg, gen)
        if cls.one_union_model and len({(cn.model, cn.revision) for cn in gen.controlnets}) > 1:
            raise ValueError(f"generation.controlnets: {cls.family} runs every condition through one Union ControlNet; "
                             f"give all of them the same model")
        with_mode = [i for i, cn in enumerate(gen.controlnets) if cn.control_mode is not None]
        if cls.union_modes is None and with_mode:
            raise ValueError(f"generation.controlnets.{with_mode[0]}.control_mode: {cls.family} ControlNets have no "
                             f"control modes (Union ControlNets do: sdxl_union, flux)")
        if cls.union_modes is not None:
            gen = gen.model_copy(update={"controlnets": [
                cn.model_copy(update={"control_mode": cls.control_mode(cfg, i)}) for i, cn in enumerate(gen.controlnets)]})
        return gen

    @classmethod
    def shared_net(cls, gen: GenerationConfig) -> bool:
        """Every condition goes through one (Union) network."""
        same = len({(cn.model, cn.revision) for cn in gen.controlnets}) == 1
        return cls.one_union_model or (cls.union_may_share and same and len(gen.controlnets) > 1)

    @classmethod
    def control_mode(cls, cfg: Any, i: int) -> int | None:
        cn = cfg.generation.controlnets[i]
        names = {a.key: a.name for a in cfg.annotators}
        table = cls.union_modes
        mode = cn.control_mode
        if mode is None:
            mode = ANNOTATOR_CONDITION.get(names[cn.condition], names[cn.condition])
            if mode not in table and not cls.union_modes_required:
                return None  # only a Union checkpoint needs a mode: checked when the models resolve
            if mode not in table:
                raise ValueError(f"generation.controlnets.{i}.control_mode: annotator {names[cn.condition]!r} has no "
                                 f"{cls.family} control mode; set one of {table}")
        if isinstance(mode, str):
            if mode not in table:
                raise ValueError(f"generation.controlnets.{i}.control_mode: {mode!r} is not one of {table}")
            mode = table[mode]
        if not 0 <= mode <= max(table.values()):
            raise ValueError(f"generation.controlnets.{i}.control_mode: {mode} is out of range 0..{max(table.values())}")
        return mode

    @classmethod
    def model_refs(cls, gen: GenerationConfig) -> dict[str, ModelRef | list[ModelRef]]:
        cns = gen.controlnets[:1] if cls.shared_net(gen) else gen.controlnets
        return {
            "base_model": ModelRef("base_model", gen.base_model, gen.revision, "model_index.json", PIPELINE_FILES),
            "controlnets": [ModelRef(f"controlnet {cn.condition}", cn.model, cn.revision, "config.json",
                                     CONTROLNET_FILES) for cn in cns],
        }

    @classmethod
    def check_models(cls, gen: GenerationConfig, models: Models) -> None:
        check_fit(cls, models)

    # ---- the actor --------------------------------------------------------------------------------
    def load(self, models: Models) -> None:
        self.dtype = torch_dtype(self.gen.dtype, self.device, self.auto_gpu_dtype)
        self.conditions = [cn.condition for cn in self.gen.controlnets]
        self.multi = len(models["controlnets"]) > 1
        self.pipe = load_pipeline(type(self), self.gen, models["base_model"], models["controlnets"], self.device)

    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def control_modes(self) -> list[int] | None:
        return [cn.control_mode for cn in self.gen.controlnets] if self.union_modes is not None else None

    def provenance_fields(self, models: Models) -> Row:
        gen, base = self.gen, models["base_model"]
        nets = models["controlnets"] * len(gen.controlnets) if self.shared_net(gen) else models["controlnets"]
        row = {
            "base_model": base.model,
            "base_model_revision": base.commit,
            "controlnet_models": [m.model for m in nets],
            "controlnet_revisions": [m.commit for m in nets],
            "controlnet_conditions": self.conditions,
            "controlnet_conditioning_scale": [cn.conditioning_scale for cn in gen.controlnets],
            "control_guidance_start": [cn.guidance_start for cn in gen.controlnets],
            "control_guidance_end": [cn.guidance_end for cn in gen.controlnets],
            "scheduler": gen.scheduler,
            "num_inference_steps": gen.steps,
            "guidance_scale": gen.guidance_scale,
            "dtype": self.dtype_name(),
            "generator_family": self.family,
            "generation_mode": gen.mode,
            "pipeline_class": type(self.pipe).__name__,
            "scheduler_class": type(self.pipe.scheduler).__name__,
            "scheduler_config": json.dumps(dict(self.pipe.scheduler.config), sort_keys=True, default=str),
            "strength": gen.strength if gen.mode != "text2img" else None,
            "inpaint_mask_source": gen.mask.model_dump_json() if gen.mask and gen.mode == "inpaint" else None,
        }
        if "guess_mode" in self.knobs:
            row["guess_mode"] = gen.guess_mode
        if "true_cfg_scale" in self.knobs:
            row["true_cfg_scale"] = gen.true_cfg_scale
        if any(c[0] == "control_modes" for c in self.family_columns):
            row["control_modes"] = self.control_modes()
        return row

    def row_fields(self, row: Row) -> Row:
        return {"inpaint_mask": inpaint_mask(row, self.gen.mask) if self.gen.mode == "inpaint" else None}

    def call_groups(self, rows: list[Row]) -> list[list[int]]:
        """Rows that can share one pipeline call (all, unless per-call inputs differ, e.g. SDXL sizes)."""
        if self.one_control_per_call():
            return [[i] for i in range(len(rows))]
        return [list(range(len(rows)))]

    def one_control_per_call(self) -> bool:
        """diffusers' img2img and inpaint pipelines take one control image per net for a whole call with
        several ControlNets ("a single batch of multiple conditionings"): such rows go one by one."""
        return self.multi and self.multi_per_row and (self.gen.mode != "text2img" or not self.multi_batched_text2img)

    def run(self, rows: list[Row], width: int, height: int) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * len(rows)
        for idx in self.call_groups(rows):
            group = [rows[i] for i in idx]
            self.before_call(group)
            result = self.pipe(**self.call_kwargs(group, width, height), output_type="np")
            for i, image in zip(idx, result.images):
                out[i] = to_uint8(image)
        return out

    def before_call(self, rows: list[Row]) -> None:
        """Anything to set before one pipeline call on these rows."""

    def call_kwargs(self, rows: list[Row], width: int, height: int) -> dict[str, Any]:
        """The pipeline's arguments for rows of one size: what a diffusers user would pass."""
        gen = self.gen
        per_condition = [[pil(r[f"control_{c}"]) for r in rows] for c in self.conditions]
        kw: dict[str, Any] = {
            "prompt": [r["prompt"] for r in rows],
            "width": width,
            "height": height,
            "num_inference_steps": gen.steps,
            "guidance_scale": gen.guidance_scale,
            "controlnet_conditioning_scale": self.per_net("conditioning_scale"),
            "control_guidance_start": self.per_net("guidance_start"),
            "control_guidance_end": self.per_net("guidance_end"),
            "generator": cpu_generators(rows),
        }
        if gen.mode in self.negative_prompt_modes:
            kw["negative_prompt"] = [r["negative_prompt"] for r in rows]
        control_arg = self.text2img_control_arg if gen.mode == "text2img" else "control_image"
        kw[control_arg] = self.control_images(per_condition)
        if self.control_modes() is not None:
            modes = self.control_modes()
            kw["control_mode"] = modes if len(modes) > 1 else modes[0]
        if gen.mode != "text2img":
            kw["image"] = [pil(r["image"]) for r in rows]
            kw["strength"] = gen.strength
        if gen.mode == "inpaint":
            kw["mask_image"] = [pil(inpaint_mask(r, gen.mask)) for r in rows]
        if "guess_mode" in self.knobs:
            kw["guess_mode"] = gen.guess_mode
        if "true_cfg_scale" in self.knobs and gen.mode == "text2img":
            kw["true_cfg_scale"] = gen.true_cfg_scale
        return kw

    @classmethod
    def wrap_nets(cls, nets: list, gen: GenerationConfig) -> Any:
        """One network as is; several in the family's multi-ControlNet wrapper."""
        import diffusers

        return nets[0] if len(nets) == 1 else getattr(diffusers, cls.multi_class)(nets)

    def control_images(self, per_condition: list[list[Image.Image]]) -> Any:
        if len(self.conditions) == 1:
            return per_condition[0]
        if self.one_control_per_call():
            return [images[0] for images in per_condition]
        if self.multi_per_row:  # per sample, one control image per net (diffusers' nested-list layout)
            return [list(images) for images in zip(*per_condition)]
        return per_condition  # one list of per-row images per ControlNet (or per Union condition)

    def per_net(self, field: str):
        values = [getattr(cn, field) for cn in self.gen.controlnets]
        return values if len(self.conditions) > 1 else values[0]


def load_pipeline(family: type[ControlNetGenerator], gen: GenerationConfig, base, controlnets: list, device: str):
    """Load the family's pipeline for `gen.mode` exactly as a diffusers user would, from hub ids or directories."""
    import diffusers
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    # safetensors only unless the config allows pickle checkpoints (None: diffusers' own preference)
    common = {"dtype": torch_dtype(gen.dtype, device, family.auto_gpu_dtype), "local_files_only": gen.local_files_only,
              "use_safetensors": None if gen.allow_pickle else True}
    net_class = getattr(diffusers, family.controlnet_class)
    with no_random_weights():
        nets = [net_class.from_pretrained(m.load_path, revision=m.load_revision, **common) for m in controlnets]
    if family.controlnet_class == "ControlNetModel":
        for net in nets:
            skip_outside_window(net)
            embed_once_per_call(net)
            if device == "cpu":
                guidance_halves_once(net)
    controlnet = family.wrap_nets(nets, gen)
    pipe_class = getattr(diffusers, family.pipelines[gen.mode])
    with no_random_weights():
        pipe = pipe_class.from_pretrained(base.load_path, revision=base.load_revision, controlnet=controlnet,
                                          **family.pipeline_kwargs, **common)
    if gen.scheduler != "flow_match_euler":
        pipe.scheduler = make_scheduler(gen.scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if device == "cpu" and isinstance(getattr(pipe, "unet", None), diffusers.UNet2DConditionModel):
        guidance_halves_once(pipe.unet)
    if gen.channels_last is True or (gen.channels_last == "auto" and device == "cuda"):
        import torch

        for name in ("unet", "transformer", "controlnet", "vae"):  # 4-D weights only: convolutions
            if (module := getattr(pipe, name, None)) is not None:
                module.to(memory_format=torch.channels_last)
    if gen.compile and device in COMPILES_ON:  # in place, so the lanes' pipeline copies share the compiled denoiser
        for name in ("unet", "transformer"):
            if (module := getattr(pipe, name, None)) is not None:
                module.compile(backend=COMPILE_BACKEND)
    elif gen.compile:
        log.warning("generation.compile applies on a GPU: this %s worker runs the denoiser eagerly (torch "
                    "inductor's CPU code turned the test UNet's images into NaN on AVX2 CPUs)", device)
    return pipe


def skip_outside_window(net) -> None:
    """Outside a ControlNet's guidance window (`guidance_start`/`guidance_end`) diffusers still runs it and
    scales its residuals by 0. Answer those calls with zeros of the shapes the network returned for the same
    input shape: the sums the UNet sees are the same, without the network's FLOPs. The first call for an
    input shape always runs."""
    import torch
    from diffusers.models.controlnets.controlnet import ControlNetOutput

    forward, shapes = net.forward, {}

    def windowed(sample, *args, conditioning_scale: float = 1.0, return_dict: bool = True, **kwargs):
        key = (tuple(sample.shape), sample.dtype, sample.device)
        if conditioning_scale == 0 and key in shapes:
            down_shapes, mid_shape, dtype = shapes[key]
            down = tuple(torch.zeros(s, dtype=dtype, device=sample.device) for s in down_shapes)
            mid = torch.zeros(mid_shape, dtype=dtype, device=sample.device)
            return ControlNetOutput(down_block_res_samples=down, mid_block_res_sample=mid) if return_dict else (down, mid)
        out = forward(sample, *args, conditioning_scale=conditioning_scale, return_dict=return_dict, **kwargs)
        down, mid = (out.down_block_res_samples, out.mid_block_res_sample) if return_dict else out
        shapes[key] = ([d.shape for d in down], mid.shape, mid.dtype)
        return out

    net.forward = windowed


def embed_once_per_call(net) -> None:
    """A ControlNet embeds its control image (convolutions at full resolution) at every step, though the
    image is the same tensor for the whole pipeline call. Keep the last embedding and answer a call with
    that very tensor (same object, not modified since) from it: the same numbers, computed once per call
    instead of once per step (a fifth of the generation time of small models on CPU). Each distinct control
    image of the batch is embedded once: with classifier-free guidance the batch holds each control image
    twice (conditional and unconditional halves), and a call's variants of one photo share theirs."""
    import threading

    import torch

    embedding = net.controlnet_cond_embedding
    forward, lane = embedding.forward, threading.local()  # per lane (calls running side by side)

    def embed(cond):
        distinct: list[int] = []  # the first row of each distinct control image
        which = []  # each row's place in `distinct`
        for i in range(cond.shape[0]):
            k = next((k for k, d in enumerate(distinct) if torch.equal(cond[d], cond[i])), None)
            if k is None:
                k = len(distinct)
                distinct.append(i)
            which.append(k)
        if len(distinct) == cond.shape[0]:
            return forward(cond)
        return forward(cond[distinct])[which]

    def once(cond):
        last = getattr(lane, "last", None)  # the control tensor (kept alive), its version, its embedding
        if last is None or last[0] is not cond or last[1] != cond._version:
            last = lane.last = (cond, cond._version, embed(cond))
        return last[2]

    embedding.forward = once


# A module's input with fewer values a row than this is left whole: on such small tensors the equality check
# and the copy cost about what the half saves (the test models); SD 1.5's first block has 1.3 M a row at 512 px
HALVES_MIN_VALUES = 16384


def guidance_halves_once(model) -> None:
    """With classifier-free guidance a UNet or ControlNet gets each latent twice (the batch's conditional and
    unconditional halves are the same tensor), and the two halves only part at the first cross-attention,
    where the prompt embeddings come in. Up to there, the convolutions and self-attention compute the same
    numbers twice. Each of those modules now checks whether the two halves of its input are equal, computes
    one half and repeats it; the norms and activations between them keep the halves equal, and the modules'
    maths is per row (the same numbers as diffusers' to the bit, tested). A batch whose halves differ (no
    guidance; SDXL, whose time embedding carries the prompt) runs as before. On CPU only: on a GPU each check
    would wait for the device."""
    import torch

    def halves_once(module) -> None:
        forward = module.forward

        def once(*args, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            n, half = tensors[0].shape[0], tensors[0].shape[0] // 2
            if (n < 2 or n % 2 or tensors[0][0].numel() < HALVES_MIN_VALUES
                    or not all(t.shape[0] == n and torch.equal(t[:half], t[half:]) for t in tensors)):
                return forward(*args, **kwargs)
            cut = lambda a: a[:half] if isinstance(a, torch.Tensor) else a  # noqa: E731
            out = forward(*map(cut, args), **{k: cut(v) for k, v in kwargs.items()})
            return torch.cat([out, out])

        module.forward = once

    for module in before_cross_attention(model):
        halves_once(module)


def before_cross_attention(model):
    """The convolutions and self-attention modules of a diffusers UNet or ControlNet that a batch passes
    through before its first cross-attention, in the order of the forward pass."""
    import torch

    convs = lambda m: [c for c in m.modules() if isinstance(c, torch.nn.Conv2d)]  # noqa: E731
    yield model.conv_in
    for block in model.down_blocks:
        attentions = getattr(block, "attentions", None) or []
        for i, resnet in enumerate(getattr(block, "resnets", None) or []):
            yield from convs(resnet)
            if i < len(attentions):  # a transformer: its input projection and first self-attention, then text
                transformer = attentions[i]
                yield from convs(getattr(transformer, "proj_in", torch.nn.Identity()))
                if blocks := getattr(transformer, "transformer_blocks", None):
                    yield blocks[0].attn1  # a cross-attention in `only_cross_attention` models: its check fails
                return
        for downsampler in getattr(block, "downsamplers", None) or []:
            yield from convs(downsampler)


def make_scheduler(name: str, config: Any):
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    if name == "unipc":
        return UniPCMultistepScheduler.from_config(config)
    if name == "dpmpp_2m":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "euler_a":
        return EulerAncestralDiscreteScheduler.from_config(config)
    raise ValueError(f"unknown scheduler {name!r}")


def pil(png: bytes) -> Image.Image:
    return Image.open(io.BytesIO(png)).convert("RGB")


# ---- inpaint masks ---------------------------------------------------------------------------------


def check_mask(cfg: Any, gen: GenerationConfig) -> None:
    from pipeline.annotators import ANNOTATORS

    if gen.mode != "inpaint":
        raise ValueError(f"generation.mask: only inpaint uses a mask (generation.mode is {gen.mode})")
    names = {a.key: a.name for a in cfg.annotators}
    mask = gen.mask
    if mask.source == (mask.annotator is not None):
        raise ValueError("generation.mask: give either annotator (an annotator id) or source: true (source.mask_column)")
    if mask.source:
        if not cfg.source.mask_column:
            raise ValueError("generation.mask.source: set source.mask_column (a parquet source's column of masks)")
        if mask.classes:
            raise ValueError("generation.mask.classes: only a seg_ade20k annotator has classes")
        return
    if mask.annotator not in names:
        raise ValueError(f"generation.mask.annotator: {mask.annotator!r} is not an annotator id {list(names)}")
    name = names[mask.annotator]
    if mask.classes and name != "seg_ade20k":
        raise ValueError(f"generation.mask.classes: only a seg_ade20k annotator has classes ({mask.annotator!r} is {name})")
    if not mask.classes and name == "seg_ade20k":
        raise ValueError("generation.mask.classes: name the ADE20K class indices that form the region (12: person)")
    if not mask.classes and not getattr(ANNOTATORS[name], "keypoints", False):
        raise ValueError(f"generation.mask.annotator: {name} gives neither classes (seg_ade20k) nor keypoints (pose)")


def inpaint_mask(row: Row, mask) -> bytes:
    """The row's inpaint mask as PNG (L mode, 255 = repainted) from its segmentation map or pose keypoints."""
    from pipeline.io.images import png_to_array

    height, width = row["height"], row["width"]
    if mask.source:  # decoded and resized with the image (pipeline.io.images.mask_to_size)
        if row.get("source_mask") is None:
            raise ValueError("this input has no mask in source.mask_column")
        region = png_to_array(row["source_mask"]) > 127
        region = region[..., 0] if region.ndim == 3 else region
    elif mask.classes:
        from controlnet_aux.util import ade_palette

        seg = png_to_array(row[f"control_{mask.annotator}"])[..., :3]
        palette = np.array(ade_palette(), dtype=np.uint8)
        region = np.zeros((height, width), bool)
        for c in mask.classes:
            region |= np.all(seg == palette[c % len(palette)], axis=-1)
    else:
        region = np.zeros((height, width), bool)
        doc = json.loads(row[f"keypoints_{mask.annotator}"] or "{}")
        for person in doc.get("people", []):
            pts = [p for key in ("pose_keypoints_2d", "hand_left_keypoints_2d", "hand_right_keypoints_2d",
                                 "face_keypoints_2d") for p in _points(person.get(key) or [])]
            if pts:
                xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                x0, x1 = int(np.floor(min(xs))), int(np.ceil(max(xs))) + 1
                y0, y1 = int(np.floor(min(ys))), int(np.ceil(max(ys))) + 1
                region[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = True
    if mask.margin:
        from scipy.ndimage import binary_dilation

        region = binary_dilation(region, iterations=mask.margin)
    outside = (mask.repaint or ("inside" if mask.source else "outside")) == "outside"
    repaint = ~region if outside else region
    buf = io.BytesIO()
    Image.fromarray(repaint.astype(np.uint8) * 255, "L").save(buf, format="PNG")
    return buf.getvalue()


def _points(flat: list[float]) -> list[tuple[float, float]]:
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat) - 2, 3) if flat[i + 2] > 0]
