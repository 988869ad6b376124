"""Do the resolved models fit the family? Judged in the driver before any data moves, from the models' JSON
configs alone (no weights, no diffusers import): a base model of another family, a ControlNet of another class
or made for another base model. Each is one line naming the key; without the check the generator actors fail
to load (a Ray traceback) or every sample becomes an error row. A config that cannot be read (a hub model not
in the cache) is not judged: loading it says what is wrong.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import huggingface_hub

from pipeline.generators import families, generator_class
from pipeline.models import ModelUnavailable, ResolvedModel, offline

# Words of a diffusers pipeline class name that name its task, not its model
TASKS = ("ControlNetUnion", "ControlNet", "Img2Img", "Inpainting", "Inpaint")
# Config entries a ControlNet shares with the denoiser it was trained beside (UNet, or Flux/SD3 transformer);
# null in a ControlNet's config means it does without (SD3.5's ControlNets take no text embedding)
SHARED_KEYS = ("cross_attention_dim", "addition_embed_type", "joint_attention_dim", "pooled_projection_dim")


def model_json(model: ResolvedModel, file: str) -> dict[str, Any] | None:
    """A JSON file of a resolved model (local directory or hub commit), or None where it cannot be had."""
    try:
        if model.local_dir:
            data = json.loads((Path(model.local_dir) / file).read_text())
        else:
            path = huggingface_hub.hf_hub_download(model.model, file, revision=model.commit,
                                                   local_files_only=offline())
            data = json.loads(Path(path).read_text())
    except Exception:  # noqa: BLE001 - unreadable here: loading the model reports it
        return None
    return data if isinstance(data, dict) else None


def model_kind(pipeline_class: str) -> str:
    """The model a diffusers pipeline class runs: `StableDiffusionXLControlNetUnionImg2ImgPipeline` ->
    `StableDiffusionXL`, `FluxPipeline` -> `Flux`."""
    kind = pipeline_class.removesuffix("Pipeline")
    for task in TASKS:
        kind = kind.replace(task, "")
    return kind


def net_class(config: dict[str, Any]) -> str | None:
    """A ControlNet's class. xinsir's SDXL Union checkpoints call theirs a `ControlNetModel`; their
    `num_control_type` says what they are."""
    return "ControlNetUnionModel" if config.get("num_control_type") is not None else str(config.get("_class_name") or "")


def takers(fits: Callable[[Any], bool]) -> str:
    """` (family a takes this one)` or ` (families a / b take this one)` for the families whose generator class
    `fits`, else ''."""
    names = [f for f in families() if hasattr(generator_class(f), "pipelines") and fits(generator_class(f))]
    if not names:
        return ""
    return f" (family {names[0]} takes this one)" if len(names) == 1 else f" (families {' / '.join(names)} take this one)"


def check_fit(family: Any, models: dict[str, Any]) -> list[dict[str, Any]]:
    """Raise ModelUnavailable naming the key where a model does not fit `family` (a ControlNetGenerator class);
    return the ControlNets' configs (None where unreadable)."""
    base = models["base_model"]
    index = model_json(base, "model_index.json") or {}
    ours, theirs = model_kind(family.pipelines["text2img"]), model_kind(str(index.get("_class_name") or ""))
    # a model of a kind no family runs (a community pipeline, say) is left to diffusers
    if theirs != ours and (hint := takers(lambda cls: model_kind(cls.pipelines["text2img"]) == theirs)):
        raise ModelUnavailable(f"generation.base_model: {base.model} is a model of {index['_class_name']}; family "
                               f"{family.family} runs {ours} models{hint}")
    denoiser = next((n for n in ("unet", "transformer") if isinstance(index.get(n), list) and any(index[n])), None)
    shared = (model_json(base, f"{denoiser}/config.json") or {}) if denoiser else {}
    configs = []
    for i, net in enumerate(models["controlnets"]):
        config = model_json(net, "config.json")
        configs.append(config)
        if config is None:
            continue
        key = f"generation.controlnets.{i}.model"
        kind = net_class(config)  # a class no family loads (a community one, say) is left to diffusers
        if kind != family.controlnet_class and (hint := takers(lambda cls, k=kind: cls.controlnet_class == k)):
            raise ModelUnavailable(f"{key}: {net.model} is a ControlNet of class {kind}; family {family.family} loads "
                                   f"class {family.controlnet_class}{hint}")
        for k in SHARED_KEYS:  # numbers and names: a per-block list is not compared
            value, wanted = config.get(k), shared.get(k)
            if isinstance(value, (int, str)) and isinstance(wanted, (int, str)) and value != wanted:
                raise ModelUnavailable(f"{key}: {net.model} was made for another base model than {base.model}: its "
                                       f"{k} is {value!r}, the base model's {denoiser} has {wanted!r}")
    return configs
