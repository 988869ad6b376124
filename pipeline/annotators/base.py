"""The annotator base classes, the registry and the helpers every family shares.

An annotator takes a batch of RGB uint8 arrays and returns one RGB uint8 control map per image,
each exactly the size of its input. A weight-free annotator writes `annotate` (or, as an
OpenCVAnnotator, `annotate_one`). An annotator with weights is a NeuralAnnotator: it names its
hub repo (`default_model`) and the files its loader reads (`files`), and writes

- `load(weights_dir)`: build the network from those files;
- `forward(stack)`: one forward pass over a (N, H, W, 3) uint8 RGB stack of same-shape images,
  returning one output per image (an array or tensor whose last two axes are height and width
  where the input was padded);
- `draw(output)`: one image's control map from its output.

The base groups a batch's images by shape, reflect-pads each group's stack at the bottom and right
to multiples of `pad_multiple` (when above 1), runs `forward` under torch.inference_mode, crops the
output back to the image's size, draws each image and returns the maps in input order. An annotator
that resizes instead (as controlnet-aux does, or as a transformers image processor does) resizes in
`forward` and keeps `pad_multiple` at 1. One whose output cannot be cropped back (M-LSD draws its
segments on a canvas of the image's size) writes its own per-group `run`; pose annotators take the
whole batch at once (pose.py).
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import warnings
from collections import defaultdict
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from pipeline.models import ResolvedModel, file_sha256


def import_submodules_alone(package: str = "controlnet_aux") -> None:
    """Let `import controlnet_aux.hed` import that module alone. The package's `__init__` imports every
    detector it has (timm, segment-anything, ...: 2.3 s of CPU in every annotator process) to offer their
    names at its top; those names still work, importing the whole package on first use."""
    if package in sys.modules or (spec := importlib.util.find_spec(package)) is None:
        return
    module = importlib.util.module_from_spec(spec)  # the package with its __path__, its __init__ not run

    def __getattr__(name: str):
        if name.startswith("__") and name != "__version__":
            raise AttributeError(name)
        del module.__getattr__
        spec.loader.exec_module(module)
        return getattr(module, name)

    module.__getattr__ = __getattr__
    sys.modules[package] = module


import_submodules_alone()


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Annotator:
    """Base class: subclasses set `name`, `Params`, and implement `annotate`."""

    name: ClassVar[str]
    Params: ClassVar[type[Params]] = Params
    default_model: ClassVar[str | None] = None  # hub repo holding the weights; None: weight-free
    files: ClassVar[tuple[str, ...]] = ()  # every file the loader reads; model resolution probes for files[0]
    keypoints: ClassVar[bool] = False  # True: annotate_with_extras returns one OpenPose JSON document per image
    size: ClassVar[str] = "computed at the image's own size"
    description: ClassVar[str] = ""

    def __init__(self, params: dict[str, Any], model: ResolvedModel | None = None, device: str = "cpu"):
        self.params = self.Params(**params)
        self.model = model
        self.device = device

    def annotate(self, images: list[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def annotate_with_extras(self, images: list[np.ndarray]) -> tuple[list[np.ndarray], list[str | None]]:
        """Control maps and, for annotators with `keypoints`, one JSON document per image."""
        return self.annotate(images), [None] * len(images)

    def provenance(self) -> dict[str, Any]:
        return {"name": self.name, "params": self.params.model_dump(), "package": "controlnet-dataset-pipeline",
                "size_policy": self.size}


ANNOTATORS: dict[str, type[Annotator]] = {}


def register(cls: type[Annotator]) -> type[Annotator]:
    ANNOTATORS[cls.name] = cls
    return cls


def hwc3(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2) if gray.ndim == 2 else gray


def by_shape(images: list[np.ndarray]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, img in enumerate(images):
        groups[img.shape].append(i)
    return groups


def batched(images: list[np.ndarray], run: Callable[[list[np.ndarray]], list[Any]]) -> list[Any]:
    """Apply `run` to each group of same-shape images (one forward pass per group), in input order."""
    out: list[Any] = [None] * len(images)
    for idx in by_shape(images).values():
        for i, result in zip(idx, run([images[i] for i in idx])):
            out[i] = result
    return out


def pad_to_multiple(images: np.ndarray, multiple: int) -> np.ndarray:
    """Reflect-pad a (N, H, W, C) stack at the bottom and right so both sides are multiples of `multiple`."""
    h, w = images.shape[1:3]
    ph, pw = -h % multiple, -w % multiple
    return np.pad(images, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="reflect") if ph or pw else images


def image_seed(seed: int, image: np.ndarray) -> int:
    """A per-image seed from the annotator's seed and the image content: the same in any batch."""
    digest = hashlib.sha256(f"{seed}:{image.shape}".encode() + np.ascontiguousarray(image).tobytes()).digest()
    return int.from_bytes(digest[:4], "big")


class NeuralAnnotator(Annotator):
    """An annotator with weights: a hub repo or a local directory with the same layout (one code path:
    hub files are fetched into the local cache at the resolved commit and loaded from there)."""

    package: ClassVar[str] = "controlnet-aux"
    pad_multiple: ClassVar[int] = 1  # above 1: input reflect-padded to multiples of it, output cropped back
    # True: on CPU, `self.network`'s convolutions get their weights in oneDNN's layout once, at load
    # (pipeline.annotators.onednn). Set where it was measured faster and the maps stay within one level of
    # controlnet-aux's (LeReS, which stretches its depth to the full range, amplified the rounding to 52 levels)
    prepack: ClassVar[bool] = False

    def __init__(self, params: dict[str, Any], model: ResolvedModel | None = None, device: str = "cpu"):
        super().__init__(params, model, device)
        if model is None:
            raise ValueError(f"annotator {self.name} needs weights (default: {self.default_model})")
        import torch

        from pipeline.annotators.onednn import prepack_convolutions

        self._torch = torch
        self.weights_dir = model.local_dir or _hub_dir(model, self.files)
        self.weights_sha256 = {f: file_sha256(Path(self.weights_dir) / f) for f in self.files}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.load(self.weights_dir)
        self.prepacked = self.prepack and self.device == "cpu" and prepack_convolutions(self.network)

    def load(self, weights_dir: str) -> None:
        raise NotImplementedError

    def annotate(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return batched(images, self.run)

    def run(self, same_shape: list[np.ndarray]) -> list[np.ndarray]:
        """One group of same-shape images: pad, one forward pass, crop back, one map per image."""
        h, w = same_shape[0].shape[:2]
        stack = np.stack(same_shape)
        if self.pad_multiple > 1:
            stack = pad_to_multiple(stack, self.pad_multiple)
        with self._torch.inference_mode():
            output = self.forward(stack)
            if self.pad_multiple > 1:
                output = output[..., :h, :w]
        return [self.draw(o) for o in output]

    def forward(self, stack: np.ndarray) -> Any:
        raise NotImplementedError

    def draw(self, output: Any) -> np.ndarray:
        raise NotImplementedError

    def tensor(self, stack: np.ndarray):
        """(N, H, W, C) array -> float (N, C, H, W) tensor on the annotator's device."""
        return self._torch.from_numpy(np.ascontiguousarray(stack)).float().permute(0, 3, 1, 2).to(self.device)

    def provenance(self) -> dict[str, Any]:
        return super().provenance() | {
            "package": f"{self.package}=={version(self.package)}",
            "model": self.model.model,
            "revision": self.model.commit,
            "weights_file": ",".join(self.files),
            "weights_sha256": ",".join(self.weights_sha256[f] for f in self.files),
        }


def _hub_dir(model: ResolvedModel, files: tuple[str, ...]) -> str:
    """Fetch the files of a hub model at its resolved commit into the local cache; return the snapshot directory."""
    from huggingface_hub import hf_hub_download

    paths = [hf_hub_download(model.model, f, revision=model.commit) for f in files]
    return str(Path(paths[0]).parents[len(Path(files[0]).parts) - 1])


class TransformersAnnotator(NeuralAnnotator):
    """A transformers model saved with save_pretrained: config, safetensors weights, image processor.
    The image processor resizes, so groups are not padded here."""

    package = "transformers"
    files = ("config.json", "model.safetensors", "preprocessor_config.json")
    model_class: ClassVar[str]

    def load(self, weights_dir: str) -> None:
        import transformers

        transformers.utils.logging.disable_progress_bar()  # no per-actor "Loading weights" bars in job logs
        self.processor = transformers.AutoImageProcessor.from_pretrained(weights_dir)
        self.network = getattr(transformers, self.model_class).from_pretrained(weights_dir).to(self.device).eval()

    def pixel_values(self, same_shape: list[np.ndarray] | np.ndarray):
        return self.processor(images=list(same_shape), return_tensors="pt")["pixel_values"].to(self.device)
