"""The annotator registry: every control condition behind one batch interface.

An annotator takes a batch of RGB uint8 arrays and returns one RGB uint8 control map per image,
each exactly the size of its input (no silent change of aspect ratio, no rounding to multiples of
64). Weight-free annotators run as Ray tasks; annotators with weights (`default_model` set) run in
an actor pool so the network loads once per actor, and run same-shape images of a batch through
the network in one forward pass.

Neural annotators wrap controlnet-aux's own networks and loaders (or transformers' for the models
controlnet-aux lacks) and reproduce controlnet-aux's pre- and post-processing at the image's own
size. Where a network needs sides that are multiples of some number, the network input is padded
(reflected) or resized to it and the output cropped or resized back; `size` in the provenance says
which. Pose annotators also return the keypoints of every image in OpenPose JSON format
(`extras = "keypoints"`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import warnings
from collections import defaultdict
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable, ClassVar

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
    weights_file: ClassVar[str | None] = None  # the file that must exist in the weights repo or directory
    weights_files: ClassVar[tuple[str, ...]] = ()  # every file loaded; empty: just weights_file
    extras: ClassVar[str | None] = None  # "keypoints": annotate_with_extras returns one JSON string per image
    size: ClassVar[str] = "computed at the image's own size"
    description: ClassVar[str] = ""

    def __init__(self, params: dict[str, Any], model: ResolvedModel | None = None, device: str = "cpu"):
        self.params = self.Params(**params)
        self.model = model
        self.device = device

    @classmethod
    def files(cls) -> tuple[str, ...]:
        return cls.weights_files or ((cls.weights_file,) if cls.weights_file else ())

    def annotate(self, images: list[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def annotate_with_extras(self, images: list[np.ndarray]) -> tuple[list[np.ndarray], list[str | None]]:
        """Control maps and, for annotators with `extras`, one JSON document per image."""
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


def scribble(detected_map: np.ndarray) -> np.ndarray:
    """controlnet-aux's scribble post-processing of a soft-edge map (HED, PiDiNet)."""
    from controlnet_aux.util import nms

    detected_map = nms(detected_map, 127, 3.0)
    detected_map = cv2.GaussianBlur(detected_map, (0, 0), 3.0)
    detected_map[detected_map > 4] = 255
    detected_map[detected_map < 255] = 0
    return detected_map


def image_seed(seed: int, image: np.ndarray) -> int:
    """A per-image seed from the annotator's seed and the image content: the same in any batch."""
    digest = hashlib.sha256(f"{seed}:{image.shape}".encode() + np.ascontiguousarray(image).tobytes()).digest()
    return int.from_bytes(digest[:4], "big")


# ---------------------------------------------------------------------------------------------
# Weight-free annotators
# ---------------------------------------------------------------------------------------------


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


class OpenCVAnnotator(Annotator):
    def provenance(self) -> dict[str, Any]:
        return super().provenance() | {"package": f"opencv=={cv2.__version__}"}


@register
class ScribbleXDoG(OpenCVAnnotator):
    name = "scribble_xdog"
    description = "Scribble from a difference of Gaussians (ControlNet 1.1's scribble_xdog)."

    class Params(Params):
        threshold: int = Field(32, ge=1, le=255, description="Lower: more lines.")

    def annotate(self, images: list[np.ndarray]) -> list[np.ndarray]:
        out = []
        for img in images:
            x = img.astype(np.float32)
            g1 = cv2.GaussianBlur(x, (0, 0), 0.5)
            g2 = cv2.GaussianBlur(x, (0, 0), 5.0)
            dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
            result = np.zeros_like(img)
            result[2 * (255 - dog) > self.params.threshold] = 255
            out.append(result)
        return out


@register
class LineartStandard(OpenCVAnnotator):
    name = "lineart_standard"
    description = "Line art from a Gaussian difference of intensity (controlnet-aux LineartStandardDetector)."

    class Params(Params):
        gaussian_sigma: float = Field(6.0, gt=0)
        intensity_threshold: int = Field(8, ge=0, le=255)

    def annotate(self, images: list[np.ndarray]) -> list[np.ndarray]:
        out = []
        for img in images:
            x = img.astype(np.float32)
            g = cv2.GaussianBlur(x, (0, 0), self.params.gaussian_sigma)
            intensity = np.min(g - x, axis=2).clip(0, 255)
            strong = intensity[intensity > self.params.intensity_threshold]
            intensity /= max(16, np.median(strong)) if strong.size else 16  # controlnet-aux: median of none is nan
            intensity *= 127
            out.append(hwc3(intensity.clip(0, 255).astype(np.uint8)))
        return out


@register
class Shuffle(OpenCVAnnotator):
    name = "shuffle"
    description = "Content shuffle: the image warped by a random smooth flow (controlnet-aux ContentShuffleDetector)."

    class Params(Params):
        f: int = Field(256, ge=1, description="Flow smoothness: noise cell size in pixels.")
        seed: int = Field(0, ge=0, description="With the image content, fixes the flow (same image, same map).")

    def annotate(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return [self.shuffle(img, np.random.RandomState(image_seed(self.params.seed, img))) for img in images]

    def shuffle(self, img: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
        h, w = img.shape[:2]
        x = noise_disk(rng, h, w, self.params.f) * float(w - 1)
        y = noise_disk(rng, h, w, self.params.f) * float(h - 1)
        flow = np.concatenate([x, y], axis=2).astype(np.float32)
        return cv2.remap(img, flow, None, cv2.INTER_LINEAR)


def noise_disk(rng: np.random.RandomState, h: int, w: int, f: int) -> np.ndarray:
    """controlnet-aux's make_noise_disk (one channel) drawing from `rng` instead of the global state."""
    noise = rng.uniform(low=0, high=1, size=((h // f) + 2, (w // f) + 2, 1))
    noise = cv2.resize(noise, (w + 2 * f, h + 2 * f), interpolation=cv2.INTER_CUBIC)
    noise = noise[f : f + h, f : f + w]
    noise -= np.min(noise)
    noise /= np.max(noise)
    return noise[:, :, None]


@register
class Tile(OpenCVAnnotator):
    name = "tile"
    description = "Tile/blur condition: the image downsampled (and optionally blurred), then resized back."

    class Params(Params):
        downsample: float = Field(2.0, ge=1.0, le=64.0, description="Downsampling factor (INTER_AREA), then back up (cubic).")
        blur_sigma: float = Field(0.0, ge=0.0, description="Gaussian blur sigma in pixels after resizing back; 0: none.")

    def annotate(self, images: list[np.ndarray]) -> list[np.ndarray]:
        out = []
        for img in images:
            h, w = img.shape[:2]
            small = cv2.resize(img, (max(1, round(w / self.params.downsample)), max(1, round(h / self.params.downsample))),
                               interpolation=cv2.INTER_AREA)
            tile = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
            if self.params.blur_sigma:
                tile = cv2.GaussianBlur(tile, (0, 0), self.params.blur_sigma)
            out.append(tile)
        return out


@register
class Color(OpenCVAnnotator):
    name = "color"
    description = "Colour palette grid (T2I-Adapter color): cubic downsample to cells, nearest upsample."

    class Params(Params):
        cell: int = Field(64, ge=1, description="Grid cell size in pixels.")

    def annotate(self, images: list[np.ndarray]) -> list[np.ndarray]:
        out = []
        for img in images:
            h, w = img.shape[:2]
            small = cv2.resize(img, (max(1, w // self.params.cell), max(1, h // self.params.cell)), interpolation=cv2.INTER_CUBIC)
            out.append(cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST))
        return out


@register
class Binary(OpenCVAnnotator):
    name = "binary"
    description = "Binary threshold, inverted (white on black); threshold 0 uses Otsu's method."

    class Params(Params):
        threshold: int = Field(0, ge=0, le=255, description="0: Otsu's threshold per image.")

    def annotate(self, images: list[np.ndarray]) -> list[np.ndarray]:
        out = []
        for img in images:
            gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
            t = self.params.threshold
            flags = cv2.THRESH_BINARY_INV | (cv2.THRESH_OTSU if t == 0 else 0)
            out.append(hwc3(cv2.threshold(gray, t, 255, flags)[1]))
        return out


# ---------------------------------------------------------------------------------------------
# Neural annotators
# ---------------------------------------------------------------------------------------------


class NeuralAnnotator(Annotator):
    """An annotator with weights: a hub repo or a local directory with the same layout (one code path:
    hub files are fetched into the local cache at the resolved commit and loaded from there)."""

    package: ClassVar[str] = "controlnet-aux"

    def __init__(self, params: dict[str, Any], model: ResolvedModel | None = None, device: str = "cpu"):
        super().__init__(params, model, device)
        if model is None:
            raise ValueError(f"annotator {self.name} needs weights (default: {self.default_model})")
        import torch

        self._torch = torch
        self.weights_dir = model.local_dir or _hub_dir(model, self.files())
        self.weights_sha256 = {f: file_sha256(Path(self.weights_dir) / f) for f in self.files()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.load(self.weights_dir)

    def load(self, weights_dir: str) -> None:
        raise NotImplementedError

    def tensor(self, stack: np.ndarray):
        """(N, H, W, C) array -> float (N, C, H, W) tensor on the annotator's device."""
        return self._torch.from_numpy(np.ascontiguousarray(stack)).float().permute(0, 3, 1, 2).to(self.device)

    def provenance(self) -> dict[str, Any]:
        files = self.files()
        return super().provenance() | {
            "package": f"{self.package}=={version(self.package)}",
            "model": self.model.model,
            "revision": self.model.commit,
            "weights_file": ",".join(files),
            "weights_sha256": ",".join(self.weights_sha256[f] for f in files),
        }


def _hub_dir(model: ResolvedModel, files: tuple[str, ...] | str) -> str:
    """Fetch the files of a hub model at its resolved commit into the local cache; return the snapshot directory."""
    from huggingface_hub import hf_hub_download

    files = (files,) if isinstance(files, str) else files
    paths = [hf_hub_download(model.model, f, revision=model.commit) for f in files]
    return str(Path(paths[0]).parents[len(Path(files[0]).parts) - 1])


@register
class Hed(NeuralAnnotator):
    name = "hed"
    description = "HED soft edges (controlnet-aux ControlNetHED_Apache2)."
    default_model = "lllyasviel/Annotators"
    weights_file = "ControlNetHED.pth"
    SAFE: ClassVar[bool | None] = None  # fixed by the hed_safe variant
    SCRIBBLE: ClassVar[bool] = False

    class Params(Params):
        safe: bool = Field(False, description="Quantise edges as controlnet-aux's safe mode does.")

    def load(self, weights_dir: str) -> None:
        from controlnet_aux import HEDdetector

        detector = HEDdetector.from_pretrained(weights_dir, filename=self.weights_file)
        self.network = detector.netNetwork.to(self.device).eval()

    @property
    def safe(self) -> bool:
        return self.SAFE if self.SAFE is not None else self.params.safe

    def annotate(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return batched(images, self.run)

    def run(self, same_shape: list[np.ndarray]) -> list[np.ndarray]:
        """The maths of controlnet-aux's HEDdetector at the input's own size."""
        from controlnet_aux.util import safe_step

        torch = self._torch
        h, w = same_shape[0].shape[:2]
        with torch.inference_mode():
            side_outputs = [e.float().cpu().numpy() for e in self.network(self.tensor(np.stack(same_shape)))]
        out = []
        for j in range(len(same_shape)):
            edges = np.stack([cv2.resize(e[j, 0], (w, h), interpolation=cv2.INTER_LINEAR) for e in side_outputs], 2)
            edge = 1 / (1 + np.exp(-np.mean(edges, axis=2).astype(np.float64)))
            if self.safe:
                edge = safe_step(edge)
            detected = hwc3((edge * 255.0).clip(0, 255).astype(np.uint8))
            out.append(scribble(detected) if self.SCRIBBLE else detected)
        return out


@register
class HedSafe(Hed):
    name = "hed_safe"
    description = "HED soft edges, quantised (controlnet-aux safe=True)."
    SAFE = True

    class Params(Params):
        pass


@register
class ScribbleHed(Hed):
    name = "scribble_hed"
    description = "Scribble from HED edges (controlnet-aux HEDdetector scribble=True)."
    SCRIBBLE = True


@register
class PidiNet(NeuralAnnotator):
    name = "pidinet"
    description = "PiDiNet soft edges (controlnet-aux PidiNetDetector)."
    default_model = "lllyasviel/Annotators"
    weights_file = "table5_pidinet.pth"
    SAFE: ClassVar[bool | None] = None
    SCRIBBLE: ClassVar[bool] = False

    class Params(Params):
        safe: bool = Field(False, description="Quantise edges as controlnet-aux's safe mode does.")
        apply_filter: bool = Field(False, description="Binarise edges at 0.5 (controlnet-aux apply_filter).")

    def load(self, weights_dir: str) -> None:
        from controlnet_aux import PidiNetDetector

        detector = PidiNetDetector.from_pretrained(weights_dir, filename=self.weights_file)
        self.network = detector.netNetwork.to(self.device).eval()

    def annotate(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return batched(images, self.run)

    def run(self, same_shape: list[np.ndarray]) -> list[np.ndarray]:
        from controlnet_aux.util import safe_step

        torch = self._torch
        bgr = np.stack(same_shape)[..., ::-1]  # PiDiNet takes BGR in [0, 1]
        with torch.inference_mode():
            edges = self.network(self.tensor(bgr) / 255.0)[-1].float().cpu().numpy()
        safe = self.SAFE if self.SAFE is not None else self.params.safe
        out = []
        for edge in edges[:, 0]:
            if self.params.apply_filter:
                edge = edge > 0.5
            if safe:
                edge = safe_step(edge)
            detected = hwc3((edge * 255.0).clip(0, 255).astype(np.uint8))
            out.append(scribble(detected) if self.SCRIBBLE else detected)
        return out


@register
class PidiNetSafe(PidiNet):
    name = "pidinet_safe"
    description = "PiDiNet soft edges, quantised (controlnet-aux safe=True)."
    SAFE = True

    class Params(Params):
        apply_filter: bool = Field(False, description="Binarise edges at 0.5 (controlnet-aux apply_filter).")


@register
class ScribblePidiNet(PidiNet):
    name = "scribble_pidinet"
    description = "Scribble from PiDiNet edges (controlnet-aux PidiNetDetector scribble=True)."
    SCRIBBLE = True


@register
class Teed(NeuralAnnotator):
    name = "teed"
    description = "TEED soft edges (controlnet-aux TEEDdetector)."
    default_model = "fal-ai/teed"
    weights_file = "5_model.pth"
    MULTIPLE: ClassVar[int] = 4
    size = "network input reflect-padded at bottom/right to multiples of 4, output cropped back"

    class Params(Params):
        safe_steps: int = Field(2, ge=0, le=10, description="Quantisation steps (controlnet-aux safe_steps); 0: none.")

    def load(self, weights_dir: str) -> None:
        from controlnet_aux.teed import TEEDdetector

        self.network = TEEDdetector.from_pretrained(weights_dir, filename=self.weights_file).model.to(self.device).eval()

    def annotate(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return batched(images, self.run)

    def run(self, same_shape: list[np.ndarray]) -> list[np.ndarray]:
        from controlnet_aux.util import safe_step

        torch = self._torch
        h, w = same_shape[0].shape[:2]
        padded = pad_to_multiple(np.stack(same_shape), self.MULTIPLE)
        ph, pw = padded.shape[1:3]
        with torch.inference_mode():
            side_outputs = [e.float().cpu().numpy() for e in self.network(self.tensor(padded))]
        out = []
        for j in range(len(same_shape)):
            edges = np.stack([cv2.resize(e[j, 0], (pw, ph), interpolation=cv2.INTER_LINEAR) for e in side_outputs], 2)
            edge = 1 / (1 + np.exp(-np.mean(edges, axis=2).astype(np.float64)))
            if self.params.safe_steps != 0:
                edge = safe_step(edge, self.params.safe_steps)
            out.append(hwc3((edge * 255.0).clip(0, 255).astype(np.uint8))[:h, :w].copy())
        return out


@register
class Mlsd(NeuralAnnotator):
    name = "mlsd"
    description = "M-LSD straight line segments (controlnet-aux MLSDdetector)."
    default_model = "lllyasviel/Annotators"
    weights_file = "mlsd_large_512_fp32.pth"
    MULTIPLE: ClassVar[int] = 16
    size = "network input reflect-padded at bottom/right to multiples of 16; lines drawn on a canvas of the image's size"

    class Params(Params):
        thr_v: float = Field(0.1, ge=0, le=1, description="Line score threshold.")
        thr_d: float = Field(0.1, ge=0, description="Minimum line length (network pixels).")

    def load(self, weights_dir: str) -> None:
        from controlnet_aux import MLSDdetector

        self.network = MLSDdetector.from_pretrained(weights_dir, filename=self.weights_file).model.to(self.device).eval()

    def annotate(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return batched(images, self.run)

    def run(self, same_shape: list[np.ndarray]) -> list[np.ndarray]:
        """controlnet-aux's pred_lines (input_shape = the padded size, so no resize), batched."""
        from controlnet_aux.mlsd.utils import deccode_output_score_and_ptss

        torch = self._torch
        h, w = same_shape[0].shape[:2]
        padded = pad_to_multiple(np.stack(same_shape), self.MULTIPLE).astype(np.float32)
        padded = np.concatenate([padded, np.ones(padded.shape[:3] + (1,), np.float32)], axis=3) / 127.5 - 1.0
        with torch.inference_mode():
            outputs = self.network(self.tensor(padded))
        out = []
        for j in range(len(same_shape)):
            pts, pts_score, vmap = deccode_output_score_and_ptss(outputs[j : j + 1], 200, 3)
            dist_map = np.sqrt(np.sum((vmap[:, :, :2] - vmap[:, :, 2:]) ** 2, axis=-1))
            canvas = np.zeros((h, w, 3), np.uint8)
            for (y, x), score in zip(pts, pts_score):
                if score > self.params.thr_v and dist_map[y, x] > self.params.thr_d:
                    dxs, dys, dxe, dye = vmap[y, x, :]
                    x0, y0, x1, y1 = (int(v) for v in 2 * np.array([x + dxs, y + dys, x + dxe, y + dye]))
                    cv2.line(canvas, (x0, y0), (x1, y1), [255, 255, 255], 1)
            out.append(hwc3(canvas[:, :, 0]))
        return out


@register
class Lineart(NeuralAnnotator):
    name = "lineart"
    description = "Line art, realistic (controlnet-aux LineartDetector)."
    default_model = "lllyasviel/Annotators"
    weights_file = "sk_model.pth"
    weights_files = ("sk_model.pth", "sk_model2.pth")  # controlnet-aux's loader reads both
    COARSE: ClassVar[bool] = False
    MULTIPLE: ClassVar[int] = 4
    size = "network input reflect-padded at bottom/right to multiples of 4, output cropped back"

    def load(self, weights_dir: str) -> None:
        from controlnet_aux import LineartDetector

        detector = LineartDetector.from_pretrained(weights_dir, filename="sk_model.pth", coarse_filename="sk_model2.pth")
        self.network = (detector.model_coarse if self.COARSE else detector.model).to(self.device).eval()

    def annotate(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return batched(images, self.run)

    def run(self, same_shape: list[np.ndarray]) -> list[np.ndarray]:
        torch = self._torch
        h, w = same_shape[0].shape[:2]
        padded = pad_to_multiple(np.stack(same_shape), self.MULTIPLE)
        with torch.inference_mode():
            lines = self.network(self.tensor(padded) / 255.0)[:, 0].float().cpu().numpy()
        return [255 - hwc3((line * 255.0).clip(0, 255).astype(np.uint8))[:h, :w] for line in lines]


@register
class LineartCoarse(Lineart):
    name = "lineart_coarse"
    description = "Line art, coarse (controlnet-aux LineartDetector coarse=True)."
    weights_file = "sk_model2.pth"
    COARSE = True


@register
class LineartAnime(NeuralAnnotator):
    name = "lineart_anime"
    description = "Anime line art (controlnet-aux LineartAnimeDetector)."
    default_model = "lllyasviel/Annotators"
    weights_file = "netG.pth"
    size = "network input resized (cubic) to multiples of 256, output resized (cubic) back, as controlnet-aux does"

    def load(self, weights_dir: str) -> None:
        from controlnet_aux import LineartAnimeDetector

        self.network = LineartAnimeDetector.from_pretrained(weights_dir, filename=self.weights_file).model.to(self.device).eval()

    def annotate(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return batched(images, self.run)

    def run(self, same_shape: list[np.ndarray]) -> list[np.ndarray]:
        torch = self._torch
        h, w = same_shape[0].shape[:2]
        hn, wn = 256 * int(np.ceil(h / 256.0)), 256 * int(np.ceil(w / 256.0))
        feed = np.stack([cv2.resize(img, (wn, hn), interpolation=cv2.INTER_CUBIC) for img in same_shape])
        with torch.inference_mode():
            lines = (self.network(self.tensor(feed) / 127.5 - 1.0)[:, 0] * 127.5 + 127.5).float().cpu().numpy()
        out = []
        for line in lines:
            line = cv2.resize(line, (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 255).astype(np.uint8)
            out.append(255 - hwc3(line))
        return out


class TransformersAnnotator(NeuralAnnotator):
    """A transformers model saved with save_pretrained: config, safetensors weights, image processor."""

    package = "transformers"
    weights_file = "config.json"
    weights_files = ("config.json", "model.safetensors", "preprocessor_config.json")
    model_class: ClassVar[str]

    def load(self, weights_dir: str) -> None:
        import transformers

        transformers.utils.logging.disable_progress_bar()  # no per-actor "Loading weights" bars in job logs
        self.processor = transformers.AutoImageProcessor.from_pretrained(weights_dir)
        self.network = getattr(transformers, self.model_class).from_pretrained(weights_dir).to(self.device).eval()

    def annotate(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return batched(images, self.run)

    def pixel_values(self, same_shape: list[np.ndarray]):
        return self.processor(images=list(same_shape), return_tensors="pt")["pixel_values"].to(self.device)


@register
class DepthAnything(TransformersAnnotator):
    name = "depth_anything"
    description = "Depth Anything relative depth (transformers DepthAnythingForDepthEstimation), near = bright."
    default_model = "LiheYoung/depth-anything-small-hf"
    model_class = "DepthAnythingForDepthEstimation"
    size = ("network input resized by the model's image processor (short side 518, aspect kept, multiples of 14), "
            "depth resized (bilinear) back to the image's size")

    def run(self, same_shape: list[np.ndarray]) -> list[np.ndarray]:
        torch = self._torch
        h, w = same_shape[0].shape[:2]
        with torch.inference_mode():
            depth = self.network(pixel_values=self.pixel_values(same_shape)).predicted_depth
            depth = torch.nn.functional.interpolate(depth[:, None].float(), (h, w), mode="bilinear", align_corners=False)[:, 0]
        out = []
        for d in depth.cpu().numpy().astype(np.float64):  # min-max per image, as ControlNet's depth_anything does
            d = (d - d.min()) / max(d.max() - d.min(), 1e-12) * 255.0
            out.append(hwc3(d.clip(0, 255).astype(np.uint8)))
        return out


@register
class DepthZoe(TransformersAnnotator):
    name = "depth_zoe"
    description = ("ZoeDepth metric depth (transformers ZoeDepthForDepthEstimation), drawn as controlnet-aux's "
                   "ZoeDetector does: near = bright.")
    default_model = "Intel/zoedepth-nyu-kitti"
    model_class = "ZoeDepthForDepthEstimation"
    size = ("network input reflect-padded and resized by the model's image processor (aspect kept, multiples of 32), "
            "depth resized (bicubic) back and the padding cropped by its post-processing, at the image's size; "
            "then normalised between its 2nd and 85th percentiles per image")

    class Params(Params):
        gamma_corrected: bool = Field(False, description="Raise the normalised depth to the power 2.2 (controlnet-aux).")

    def run(self, same_shape: list[np.ndarray]) -> list[np.ndarray]:
        return [self.draw(d) for d in self.depth(same_shape)]

    def depth(self, same_shape: list[np.ndarray]) -> list[np.ndarray]:
        """Metric depth at the image's size. A model with several metric heads (nyu-kitti) picks one head per
        forward pass by a vote over the whole batch, so images whose own choice differs from the vote are run
        again on their own group: every image gets the head it would get alone."""
        torch = self._torch
        h, w = same_shape[0].shape[:2]
        with torch.inference_mode():
            outputs = self.network(pixel_values=self.pixel_values(same_shape))
            depths = self.processor.post_process_depth_estimation(outputs, source_sizes=[(h, w)] * len(same_shape))
        depths = [d["predicted_depth"].float().cpu().numpy().astype(np.float64) for d in depths]
        logits = outputs.domain_logits
        if logits is not None and len(same_shape) > 1:
            chosen = int(torch.argmax(logits.sum(dim=0)))
            own = torch.argmax(logits, dim=-1).tolist()
            other = [i for i, c in enumerate(own) if c != chosen]
            if other:
                for i, d in zip(other, self.depth([same_shape[i] for i in other])):
                    depths[i] = d
        return depths

    def draw(self, depth: np.ndarray) -> np.ndarray:
        """controlnet-aux's ZoeDetector post-processing: 2nd/85th percentiles to 1/0 (near = bright)."""
        vmin, vmax = np.percentile(depth, 2), np.percentile(depth, 85)
        depth = 1.0 - (depth - vmin) / max(vmax - vmin, 1e-12)
        if self.params.gamma_corrected:  # clipped first: controlnet-aux's power of a negative is nan, cast to 0
            depth = np.power(depth.clip(0, 1), 2.2)
        return hwc3((depth * 255.0).clip(0, 255).astype(np.uint8))


@register
class SegAde20k(TransformersAnnotator):
    name = "seg_ade20k"
    description = "Semantic segmentation (transformers UperNetForSemanticSegmentation) in the ADE20K palette."
    default_model = "openmmlab/upernet-convnext-small"
    model_class = "UperNetForSemanticSegmentation"
    size = "network input resized by the model's image processor, logits resized (bilinear) back, then argmax"

    def run(self, same_shape: list[np.ndarray]) -> list[np.ndarray]:
        from controlnet_aux.util import ade_palette

        torch = self._torch
        h, w = same_shape[0].shape[:2]
        with torch.inference_mode():
            outputs = self.network(pixel_values=self.pixel_values(same_shape))
            labels = self.processor.post_process_semantic_segmentation(outputs, target_sizes=[(h, w)] * len(same_shape))
        palette = np.array(ade_palette(), dtype=np.uint8)
        return [palette[np.asarray(lab.cpu(), dtype=np.int64) % len(palette)] for lab in labels]


# ---------------------------------------------------------------------------------------------
# Pose: skeleton drawn on black, keypoints kept as OpenPose JSON
# ---------------------------------------------------------------------------------------------


def openpose_json(people: list[dict[str, list[float]]], width: int, height: int) -> str:
    """The OpenPose JSON document of one image: pixel coordinates, [x, y, confidence] per point,
    [0, 0, 0] for a point not found; a part list is empty when that part was not looked for."""
    return json.dumps({"people": people, "canvas_width": width, "canvas_height": height})


def flat_keypoints(points, width: int, height: int, count: int) -> list[float]:
    """[(x, y, score) normalised to [0, 1], or None] -> OpenPose's flat [x, y, c, ...] in pixels."""
    if points is None:
        return []
    flat: list[float] = []
    for p in list(points)[:count]:
        if p is None or p[0] < 0 or p[1] < 0:
            flat += [0.0, 0.0, 0.0]
        else:
            flat += [round(float(p[0]) * width, 3), round(float(p[1]) * height, 3), round(float(p[2]), 4)]
    return flat


class OpenPose(NeuralAnnotator):
    """controlnet-aux's OpenPose (body, hands, face networks) at the image's own size.

    Not batched: the body network runs on one image at its own rescaled size and the hand and face
    networks on per-person crops, as controlnet-aux's post-processing is written for one image."""

    name = "openpose"
    description = "OpenPose body skeleton (controlnet-aux OpenposeDetector); keypoints as OpenPose JSON."
    default_model = "lllyasviel/Annotators"
    weights_file = "body_pose_model.pth"
    weights_files = ("body_pose_model.pth",)
    extras = "keypoints"
    size = "detected and drawn at the image's own size (the body network pads to multiples of 8 itself)"
    HAND: ClassVar[bool] = False
    FACE: ClassVar[bool] = False

    def load(self, weights_dir: str) -> None:
        from controlnet_aux.open_pose import Body, Face, Hand, OpenposeDetector

        d = Path(weights_dir)
        self.detector = OpenposeDetector(
            Body(str(d / "body_pose_model.pth")).to(self.device),
            Hand(str(d / "hand_pose_model.pth")).to(self.device) if self.HAND else None,
            Face(str(d / "facenet.pth")).to(self.device) if self.FACE else None,
        )

    def annotate(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return self.annotate_with_extras(images)[0]

    def annotate_with_extras(self, images: list[np.ndarray]) -> tuple[list[np.ndarray], list[str | None]]:
        rendered = [self.render(self.detect(img), *img.shape[:2]) for img in images]
        return [m for m, _ in rendered], [k for _, k in rendered]

    def render(self, poses, h: int, w: int) -> tuple[np.ndarray, str]:
        """controlnet-aux PoseResults (coordinates normalised to [0, 1]) -> (skeleton map, OpenPose JSON)."""
        from controlnet_aux.open_pose import draw_poses

        canvas = draw_poses(poses, h, w, draw_body=True, draw_hand=self.HAND, draw_face=self.FACE)
        people = [
            {
                "pose_keypoints_2d": flat_keypoints(pose.body.keypoints, w, h, 18),
                "hand_left_keypoints_2d": flat_keypoints(pose.left_hand, w, h, 21),
                "hand_right_keypoints_2d": flat_keypoints(pose.right_hand, w, h, 21),
                "face_keypoints_2d": flat_keypoints(pose.face, w, h, 70),
            }
            for pose in poses
        ]
        return canvas, openpose_json(people, w, h)

    def detect(self, rgb: np.ndarray):
        """controlnet-aux's OpenposeDetector.detect_poses, keeping the body keypoints' scores."""
        from controlnet_aux.open_pose import BodyResult, Keypoint, PoseResult

        torch = self._torch
        detector = self.detector
        bgr = rgb[:, :, ::-1].copy()
        h, w = bgr.shape[:2]
        with torch.inference_mode():
            candidate, subset = detector.body_estimation(bgr)
            results = []
            for body in detector.body_estimation.format_body_result(candidate, subset):
                left, right = detector.detect_hands(body, bgr) if self.HAND else (None, None)
                face = detector.detect_face(body, bgr) if self.FACE else None
                keypoints = [Keypoint(k.x / float(w), k.y / float(h), k.score, k.id) if k is not None else None
                             for k in body.keypoints]
                results.append(PoseResult(BodyResult(keypoints, body.total_score, body.total_parts), left, right, face))
        return results


register(OpenPose)


@register
class OpenPoseHand(OpenPose):
    name = "openpose_hand"
    description = "OpenPose body and hands (controlnet-aux OpenposeDetector include_hand)."
    weights_files = ("body_pose_model.pth", "hand_pose_model.pth")
    HAND = True


@register
class OpenPoseFace(OpenPose):
    name = "openpose_face"
    description = "OpenPose body and face (controlnet-aux OpenposeDetector include_face)."
    weights_files = ("body_pose_model.pth", "facenet.pth")
    FACE = True


@register
class OpenPoseFull(OpenPose):
    name = "openpose_full"
    description = "OpenPose body, hands and face (controlnet-aux OpenposeDetector hand_and_face)."
    weights_files = ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")
    HAND = True
    FACE = True


@register
class DWPose(NeuralAnnotator):
    name = "dwpose"
    description = ("DWPose whole body (YOLOX + RTMPose ONNX graphs on onnxruntime), drawn as controlnet-aux's "
                   "DWposeDetector does; keypoints as OpenPose JSON.")
    default_model = "yzd-v/DWPose"
    weights_file = "dw-ll_ucoco_384.onnx"
    weights_files = ("yolox_l.onnx", "dw-ll_ucoco_384.onnx")
    package = "onnxruntime"
    extras = "keypoints"
    size = ("detector input letterboxed to 640x640 and person crops warped to the pose model's input, "
            "keypoints mapped back to the image's pixels and drawn at the image's own size")

    def load(self, weights_dir: str) -> None:
        from pipeline.annotators.dwpose import Wholebody

        self.estimator = Wholebody(str(Path(weights_dir) / "yolox_l.onnx"), str(Path(weights_dir) / "dw-ll_ucoco_384.onnx"),
                                   self.device)

    def annotate(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return self.annotate_with_extras(images)[0]

    def annotate_with_extras(self, images: list[np.ndarray]) -> tuple[list[np.ndarray], list[str | None]]:
        estimates = self.estimator.estimate([np.ascontiguousarray(img[:, :, ::-1]) for img in images])  # DWPose takes BGR
        rendered = [self.render(k, s, *img.shape[:2]) for img, (k, s) in zip(images, estimates)]
        return [m for m, _ in rendered], [j for _, j in rendered]

    @staticmethod
    def render(candidate: np.ndarray, subset: np.ndarray, h: int, w: int) -> tuple[np.ndarray, str]:
        """controlnet-aux's DWposeDetector.__call__ after its estimator, at (h, w); and the OpenPose JSON."""
        from controlnet_aux.dwpose import draw_pose

        candidate, subset = candidate.copy(), subset.copy()
        nums, _, locs = candidate.shape
        candidate[..., 0] /= float(w)
        candidate[..., 1] /= float(h)
        body = candidate[:, :18].copy().reshape(nums * 18, locs)
        score = subset[:, :18].copy()
        for i in range(len(score)):
            for j in range(len(score[i])):
                score[i][j] = int(18 * i + j) if score[i][j] > 0.3 else -1
        candidate[subset < 0.3] = -1
        hands = np.vstack([candidate[:, 92:113], candidate[:, 113:]])
        pose = {"bodies": {"candidate": body, "subset": score}, "hands": hands, "faces": candidate[:, 24:92]}
        canvas = draw_pose(pose, h, w)

        def part(person: int, start: int, stop: int) -> list[float]:
            points = [(x, y, c) if c >= 0.3 else None
                      for (x, y), c in zip(candidate[person, start:stop], subset[person, start:stop])]
            return flat_keypoints(points, w, h, stop - start)

        people = [{"pose_keypoints_2d": part(p, 0, 18), "hand_left_keypoints_2d": part(p, 92, 113),
                   "hand_right_keypoints_2d": part(p, 113, 134), "face_keypoints_2d": part(p, 24, 92)}
                  for p in range(nums)]
        return canvas, openpose_json(people, w, h)


# ---------------------------------------------------------------------------------------------
# Depth and normals (controlnet-aux networks)
#
# depth_zoe is above with the transformers models (transformers' ZoeDepth, not controlnet-aux's, whose
# loader accepts only the BEiT-L MiDaS configuration, about 1.3 GB of weights).
# ---------------------------------------------------------------------------------------------


@register
class DepthMidas(NeuralAnnotator):
    name = "depth_midas"
    description = "MiDaS DPT-Hybrid relative depth (controlnet-aux MidasDetector), near = bright."
    default_model = "lllyasviel/Annotators"
    weights_file = "dpt_hybrid-midas-501f0c75.pt"
    MULTIPLE: ClassVar[int] = 32
    size = ("network input reflect-padded at bottom/right to multiples of 32, depth cropped back, "
            "then min-max normalised over the image")

    def load(self, weights_dir: str) -> None:
        from controlnet_aux import MidasDetector

        self.network = MidasDetector.from_pretrained(weights_dir, filename=self.weights_file).model.to(self.device).eval()

    def annotate(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return batched(images, self.run)

    def run(self, same_shape: list[np.ndarray]) -> list[np.ndarray]:
        torch = self._torch
        h, w = same_shape[0].shape[:2]
        padded = pad_to_multiple(np.stack(same_shape), self.MULTIPLE)
        with torch.inference_mode():
            depth = self.network(self.tensor(padded) / 127.5 - 1.0)[:, :h, :w].float()
        out = []
        for d in depth:  # controlnet-aux's normalisation, per image, in torch
            d = d - torch.min(d)
            d = d / torch.max(d)
            out.append(hwc3((d.cpu().numpy() * 255.0).clip(0, 255).astype(np.uint8)))
        return out


@register
class NormalBae(NeuralAnnotator):
    name = "normal_bae"
    description = "Surface normals, Bae et al. (controlnet-aux NormalBaeDetector)."
    default_model = "lllyasviel/Annotators"
    weights_file = "scannet.pt"
    MULTIPLE: ClassVar[int] = 32
    size = "network input reflect-padded at bottom/right to multiples of 32, normals cropped back"

    def load(self, weights_dir: str) -> None:
        import contextlib
        import io

        from controlnet_aux import NormalBaeDetector

        with contextlib.redirect_stdout(io.StringIO()):  # its encoder prints while it builds
            detector = NormalBaeDetector.from_pretrained(weights_dir, filename=self.weights_file)
        self.network = detector.model.to(self.device).eval()
        self.norm = detector.norm

    def annotate(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return batched(images, self.run)

    def run(self, same_shape: list[np.ndarray]) -> list[np.ndarray]:
        torch = self._torch
        h, w = same_shape[0].shape[:2]
        padded = pad_to_multiple(np.stack(same_shape), self.MULTIPLE)
        with torch.inference_mode():
            normal = self.network(self.norm(self.tensor(padded) / 255.0))[0][-1][:, :3, :h, :w]
            normal = ((normal + 1) * 0.5).clip(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
        return [(n * 255.0).clip(0, 255).astype(np.uint8) for n in normal]


@register
class DepthLeres(NeuralAnnotator):
    """controlnet-aux's LeReS depth network (RelDepthModel, ResNeXt-101) without boost.

    controlnet-aux's LeresDetector.from_pretrained also builds the pix2pix merge network used only by
    boost, parsing its options from the process's command line (argparse on sys.argv, in a Ray
    worker or under pytest whatever that holds) and setting torch.backends.cudnn.benchmark globally.
    boost is not offered here, so the depth network is loaded on its own, as controlnet-aux loads it
    (weights_only), and neither latest_net_G.pth nor the pix2pix options are touched.

    controlnet-aux (like sd-webui-controlnet) never puts the depth network in eval mode, so its
    BatchNorm layers normalise with the statistics of the one image they are given (and update their
    running statistics, which are then never used). The maps ControlNet users know come from that;
    here each BatchNorm normalises every image of a batch with that image's own statistics (instance
    normalisation with the BatchNorm's affine weights), which equals controlnet-aux image by image,
    batches, and leaves the running statistics alone."""

    name = "depth_leres"
    description = "LeReS relative depth (controlnet-aux LeresDetector, boost off), near = bright."
    default_model = "lllyasviel/Annotators"
    weights_file = "res101.pth"
    MULTIPLE: ClassVar[int] = 32
    MEAN: ClassVar[tuple[float, ...]] = (0.485, 0.456, 0.406)
    STD: ClassVar[tuple[float, ...]] = (0.229, 0.224, 0.225)
    size = ("network input reflect-padded at bottom/right to multiples of 32 (controlnet-aux runs it at its "
            "detect resolution, multiples of 64), depth cropped back, then min-max normalised over the image; "
            "BatchNorm with each image's own statistics, as controlnet-aux runs it")

    class Params(Params):
        thr_a: float = Field(0.0, ge=0, le=100, description="Remove near: zero the depth below this percent of 255 "
                                                          "(before inverting); 0: off.")
        thr_b: float = Field(0.0, ge=0, le=100, description="Remove background: zero the inverted depth below this "
                                                          "percent of 255; 0: off.")
        boost: bool = Field(False, description="Only false: controlnet-aux's boost (pix2pix merge of several "
                                               "resolutions) is not offered.")

        @model_validator(mode="after")
        def _no_boost(self):
            if self.boost:
                raise ValueError("boost is not offered (controlnet-aux's pix2pix merge network is not loaded)")
            return self

    def load(self, weights_dir: str) -> None:
        from controlnet_aux.leres.leres.multi_depth_model_woauxi import RelDepthModel
        from controlnet_aux.leres.leres.net_tools import strip_prefix_if_present

        torch = self._torch
        checkpoint = torch.load(Path(weights_dir) / self.weights_file, map_location="cpu", weights_only=True)
        model = RelDepthModel(backbone="resnext101")
        model.load_state_dict(strip_prefix_if_present(checkpoint["depth_model"], "module."), strict=True)
        self.network = model.depth_model.to(self.device).eval()
        for module in self.network.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.forward = functools.partial(_batch_norm_per_image, module)

    def annotate(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return batched(images, self.run)

    def run(self, same_shape: list[np.ndarray]) -> list[np.ndarray]:
        """controlnet-aux's estimateleres (BGR, ImageNet mean/std on 0-255 values, as its float ToTensor
        does not rescale) and LeresDetector's drawing, batched."""
        torch = self._torch
        h, w = same_shape[0].shape[:2]
        padded = pad_to_multiple(np.stack(same_shape)[..., ::-1], self.MULTIPLE)
        mean = torch.tensor(self.MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.STD, device=self.device).view(1, 3, 1, 1)
        with torch.inference_mode():
            depth = self.network((self.tensor(padded) - mean) / std)[:, 0, :h, :w].float().cpu().numpy()
        return [self.draw(d) for d in depth]

    def draw(self, depth: np.ndarray) -> np.ndarray:
        """LeresDetector.__call__ after its estimate: 16-bit min-max, 8 bit, thresholds, inverted (near = bright)."""
        depth_min, depth_max = depth.min(), depth.max()
        max_val = (2 ** 16) - 1
        if depth_max - depth_min > np.finfo("float").eps:
            out = max_val * (depth - depth_min) / (depth_max - depth_min)
        else:
            out = np.zeros(depth.shape)
        image = cv2.convertScaleAbs(out.astype("uint16"), alpha=(255.0 / 65535.0))
        if self.params.thr_a != 0:
            image = cv2.threshold(image, (self.params.thr_a / 100) * 255, 255, cv2.THRESH_TOZERO)[1]
        image = cv2.bitwise_not(image)
        if self.params.thr_b != 0:
            image = cv2.threshold(image, (self.params.thr_b / 100) * 255, 255, cv2.THRESH_TOZERO)[1]
        return hwc3(image)


def _batch_norm_per_image(bn, x):
    """A BatchNorm2d in training mode given one image at a time, for a whole batch: each image normalised
    with its own per-channel statistics, then the BatchNorm's affine transform; running statistics untouched."""
    import torch

    return torch.nn.functional.instance_norm(x, weight=bn.weight, bias=bn.bias, use_input_stats=True, eps=bn.eps)
