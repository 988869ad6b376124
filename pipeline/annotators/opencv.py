"""Weight-free annotators (OpenCV and NumPy): one image at a time, on the CPU."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
from pydantic import Field, model_validator

from pipeline.annotators.base import Annotator, Params, hwc3, image_seed, register


class OpenCVAnnotator(Annotator):
    """A weight-free annotator: subclasses write `annotate_one`, the control map of one image."""

    def annotate(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return [self.annotate_one(img) for img in images]

    def annotate_one(self, img: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def provenance(self) -> dict[str, Any]:
        return super().provenance() | {"package": f"opencv=={cv2.__version__}"}


@register
class Canny(OpenCVAnnotator):
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

    def annotate_one(self, img: np.ndarray) -> np.ndarray:
        return hwc3(cv2.Canny(img, self.params.low_threshold, self.params.high_threshold))


@register
class ScribbleXDoG(OpenCVAnnotator):
    name = "scribble_xdog"
    description = "Scribble from a difference of Gaussians (ControlNet 1.1's scribble_xdog)."

    class Params(Params):
        threshold: int = Field(32, ge=1, le=255, description="Lower: more lines.")

    def annotate_one(self, img: np.ndarray) -> np.ndarray:
        x = img.astype(np.float32)
        g1 = cv2.GaussianBlur(x, (0, 0), 0.5)
        g2 = cv2.GaussianBlur(x, (0, 0), 5.0)
        dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
        result = np.zeros_like(img)
        result[2 * (255 - dog) > self.params.threshold] = 255
        return result


@register
class LineartStandard(OpenCVAnnotator):
    name = "lineart_standard"
    description = "Line art from a Gaussian difference of intensity (controlnet-aux LineartStandardDetector)."

    class Params(Params):
        gaussian_sigma: float = Field(6.0, gt=0)
        intensity_threshold: int = Field(8, ge=0, le=255)

    def annotate_one(self, img: np.ndarray) -> np.ndarray:
        x = img.astype(np.float32)
        g = cv2.GaussianBlur(x, (0, 0), self.params.gaussian_sigma)
        intensity = np.min(g - x, axis=2).clip(0, 255)
        strong = intensity[intensity > self.params.intensity_threshold]
        intensity /= max(16, np.median(strong)) if strong.size else 16  # controlnet-aux: median of none is nan
        intensity *= 127
        return hwc3(intensity.clip(0, 255).astype(np.uint8))


@register
class Shuffle(OpenCVAnnotator):
    name = "shuffle"
    description = "Content shuffle: the image warped by a random smooth flow (controlnet-aux ContentShuffleDetector)."

    class Params(Params):
        f: int = Field(256, ge=1, description="Flow smoothness: noise cell size in pixels.")
        seed: int = Field(0, ge=0, description="With the image content, fixes the flow (same image, same map).")

    def annotate_one(self, img: np.ndarray) -> np.ndarray:
        return self.shuffle(img, np.random.RandomState(image_seed(self.params.seed, img)))

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
        downsample: float = Field(2.0, ge=1.0, le=64.0,
                                  description="Downsampling factor (INTER_AREA), then back up (cubic).")
        blur_sigma: float = Field(0.0, ge=0.0,
                                  description="Gaussian blur sigma in pixels after resizing back; 0: none.")

    def annotate_one(self, img: np.ndarray) -> np.ndarray:
        h, w = img.shape[:2]
        small = cv2.resize(img, (max(1, round(w / self.params.downsample)), max(1, round(h / self.params.downsample))),
                           interpolation=cv2.INTER_AREA)
        tile = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
        if self.params.blur_sigma:
            tile = cv2.GaussianBlur(tile, (0, 0), self.params.blur_sigma)
        return tile


@register
class Color(OpenCVAnnotator):
    name = "color"
    description = "Colour palette grid (T2I-Adapter color): cubic downsample to cells, nearest upsample."

    class Params(Params):
        cell: int = Field(64, ge=1, description="Grid cell size in pixels.")

    def annotate_one(self, img: np.ndarray) -> np.ndarray:
        h, w = img.shape[:2]
        cells = (max(1, w // self.params.cell), max(1, h // self.params.cell))
        small = cv2.resize(img, cells, interpolation=cv2.INTER_CUBIC)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)


@register
class Binary(OpenCVAnnotator):
    name = "binary"
    description = "Binary threshold, inverted (white on black); threshold 0 uses Otsu's method."

    class Params(Params):
        threshold: int = Field(0, ge=0, le=255, description="0: Otsu's threshold per image.")

    def annotate_one(self, img: np.ndarray) -> np.ndarray:
        gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
        t = self.params.threshold
        flags = cv2.THRESH_BINARY_INV | (cv2.THRESH_OTSU if t == 0 else 0)
        return hwc3(cv2.threshold(gray, t, 255, flags)[1])
