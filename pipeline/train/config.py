"""The training job's config: a YAML file validated like job configs (unknown keys and wrong types
are rejected with the key path; `--set` overrides any key)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from pipeline.config import ConfigError, Strict, apply_override, format_errors, load_yaml


class DataConfig(Strict):
    paths: list[str] = Field(min_length=1, description="Run outputs (their samples/) or `export` folders (their "
                                                       "train/), local or s3://.")
    image_column: str | None = Field(None, description="Target image column (default: `image` in an export, "
                                                       "`generated` or else `image` in a run output).")
    control_column: str | None = Field(None, description="Conditioning image column (default: `conditioning_image` "
                                                         "in an export; a run output's only control_<id>).")
    text_column: str | None = Field(None, description="Caption column (default: `text` in an export, `prompt` or "
                                                      "else `caption` in a run output).")
    precompute: bool = Field(False, description="VAE-encode the images and text-encode the captions in a Ray Data "
                                                "stage (on a GPU of its own with use_gpu), so the training workers "
                                                "run only the UNet and the ControlNet.")
    storage_options: dict[str, Any] = {}


class ValidationConfig(Strict):
    prompts: list[str] = Field([], description="One prompt per control image.")
    control_images: list[str] = Field([], description="Control images (local paths) to generate from at each checkpoint.")
    steps: int = Field(20, ge=1, description="Denoising steps of the validation images.")

    @model_validator(mode="after")
    def _pairs(self) -> ValidationConfig:
        if len(self.prompts) != len(self.control_images):
            raise ValueError("validation.prompts and validation.control_images must have the same length")
        return self


class TrainOutputConfig(Strict):
    path: str = Field(description="Where checkpoints, validation images and the trained ControlNet go (local or s3://).")
    overwrite: bool = Field(False, description="Start over: remove what an earlier training wrote under path. "
                                               "Without it a re-run resumes, and a changed config is refused.")
    storage_options: dict[str, Any] = {}


class TrainConfig(Strict):
    seed: int = Field(0, ge=0)
    base_model: str = Field(description="Hub repo id or local directory of a Stable Diffusion 1.x diffusers pipeline.")
    revision: str | None = None
    controlnet: str | None = Field(None, description="Fine-tune this ControlNet (hub id or directory); default: a new "
                                                     "one copied from the UNet's encoder (ControlNetModel.from_unet).")
    data: DataConfig
    resolution: int = Field(512, ge=64, le=2048, description="Images are resized (short side) and center-cropped.")
    learning_rate: float = Field(1e-5, gt=0)
    batch_size: int = Field(4, ge=1, description="Per worker.")
    gradient_accumulation: int = Field(1, ge=1)
    steps: int = Field(1000, ge=1, description="Optimizer steps.")
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    checkpoint_every: int = Field(500, ge=1, description="Optimizer steps between checkpoints (and validation images).")
    unlock_unet_decoder: bool = Field(False, description="Also train the UNet's decoder (the original sd_locked=False).")
    validation: ValidationConfig = ValidationConfig()
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each training worker claims (leave some to the "
                                                          "Ray Data readers that prepare the pairs).")
    output: TrainOutputConfig

    @model_validator(mode="after")
    def _precision(self) -> TrainConfig:
        if self.mixed_precision == "fp16" and not self.use_gpu:
            raise ValueError("mixed_precision: fp16 needs use_gpu: true (on CPU use bf16 or no)")
        return self


def load_train_config(path: str | Path | None = None, overrides: list[str] = (), data: dict | None = None) -> TrainConfig:
    if data is None:
        try:
            data = load_yaml(Path(path).read_text()) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    for assignment in overrides:
        apply_override(data, assignment, TrainConfig)
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError("invalid training config: " + format_errors(e)) from None
