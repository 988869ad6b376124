"""The annotator registry: every control condition behind one batch interface.

An annotator takes a batch of RGB uint8 arrays and returns one RGB uint8 control map per image,
each the same size as its input (no silent change of aspect ratio). Weight-free annotators run as
Ray tasks; annotators with weights (`default_model` set) run in an actor pool so the network
loads once per actor.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from importlib.metadata import version
from typing import Any, ClassVar

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.models import ResolvedModel, file_sha256


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Annotator:
    """Base class: subclasses set `name`, `Params`, and implement `annotate`."""

    name: ClassVar[str]
    Params: ClassVar[type[Params]] = Params
    default_model: ClassVar[str | None] = None  # hub repo holding the weights; None: weight-free
    weights_file: ClassVar[str | None] = None
    description: ClassVar[str] = ""

    def __init__(self, params: dict[str, Any], model: ResolvedModel | None = None, device: str = "cpu"):
        self.params = self.Params(**params)
        self.model = model
        self.device = device

    def annotate(self, images: list[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def provenance(self) -> dict[str, Any]:
        return {"name": self.name, "params": self.params.model_dump(), "package": "controlnet-dataset-pipeline"}


ANNOTATORS: dict[str, type[Annotator]] = {}


def register(cls: type[Annotator]) -> type[Annotator]:
    ANNOTATORS[cls.name] = cls
    return cls


def hwc3(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2) if gray.ndim == 2 else gray


@register
class Canny(Annotator):
    name = "canny"
    description = "Canny edges (OpenCV)."

    class Params(Params):
        low_threshold: int = Field(100, ge=0, le=255)
        high_threshold: int = Field(200, ge=0, le=255)

        @model_validator(mode="after")
        def _ordered(self):
            if self.low_threshold > self.high_threshold:
                raise ValueError("low_threshold must not exceed high_threshold")
            return self

    def annotate(self, images: list[np.ndarray]) -> list[np.ndarray]:
        p = self.params
        return [hwc3(cv2.Canny(img, p.low_threshold, p.high_threshold)) for img in images]

    def provenance(self) -> dict[str, Any]:
        return super().provenance() | {"package": f"opencv=={cv2.__version__}"}


@register
class Hed(Annotator):
    name = "hed"
    description = "HED soft edges (controlnet-aux ControlNetHED_Apache2)."
    default_model = "lllyasviel/Annotators"
    weights_file = "ControlNetHED.pth"

    class Params(Params):
        safe: bool = Field(False, description="Quantise edges as controlnet-aux's safe mode does.")

    def __init__(self, params: dict[str, Any], model: ResolvedModel | None = None, device: str = "cpu"):
        super().__init__(params, model, device)
        import torch

        with warnings.catch_warnings():  # controlnet-aux's import registers timm models and warns about it
            warnings.simplefilter("ignore")
            from controlnet_aux import HEDdetector

        self._torch = torch
        weights_dir = self.model.local_dir or _hub_dir(self.model, self.weights_file)
        detector = HEDdetector.from_pretrained(weights_dir, filename=self.weights_file)
        self.network = detector.netNetwork.to(device).eval()
        self.weights_sha256 = file_sha256(f"{weights_dir}/{self.weights_file}")

    def annotate(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """The maths of controlnet-aux's HEDdetector at the input's own size, batched by shape."""
        from controlnet_aux.hed import safe_step

        torch = self._torch
        out: list[np.ndarray | None] = [None] * len(images)
        by_shape: dict[tuple, list[int]] = defaultdict(list)
        for i, img in enumerate(images):
            by_shape[img.shape].append(i)
        for (h, w, _), idx in by_shape.items():
            batch = torch.from_numpy(np.stack([images[i] for i in idx])).float().permute(0, 3, 1, 2).to(self.device)
            with torch.inference_mode():
                side_outputs = [e.float().cpu().numpy() for e in self.network(batch)]
            for j, i in enumerate(idx):
                edges = np.stack([cv2.resize(e[j, 0], (w, h), interpolation=cv2.INTER_LINEAR) for e in side_outputs], 2)
                edge = 1 / (1 + np.exp(-np.mean(edges, axis=2).astype(np.float64)))
                if self.params.safe:
                    edge = safe_step(edge)
                out[i] = hwc3((edge * 255.0).clip(0, 255).astype(np.uint8))
        return out

    def provenance(self) -> dict[str, Any]:
        return super().provenance() | {
            "package": f"controlnet-aux=={version('controlnet-aux')}",
            "model": self.model.model,
            "revision": self.model.commit,
            "weights_file": self.weights_file,
            "weights_sha256": self.weights_sha256,
        }


def _hub_dir(model: ResolvedModel, filename: str) -> str:
    from pathlib import Path

    from huggingface_hub import hf_hub_download

    return str(Path(hf_hub_download(model.model, filename, revision=model.commit)).parent)
