"""Soft edges (controlnet-aux networks): HED, PiDiNet, TEED, and the scribbles drawn from them."""

from __future__ import annotations

from typing import ClassVar

import cv2
import numpy as np
from pydantic import Field

from pipeline.annotators.base import NeuralAnnotator, Params, hwc3, register


def scribble(detected_map: np.ndarray) -> np.ndarray:
    """controlnet-aux's scribble post-processing of a soft-edge map (HED, PiDiNet)."""
    from controlnet_aux.util import nms

    detected_map = nms(detected_map, 127, 3.0)
    detected_map = cv2.GaussianBlur(detected_map, (0, 0), 3.0)
    detected_map[detected_map > 4] = 255
    detected_map[detected_map < 255] = 0
    return detected_map


def mean_of_sides(side_outputs: list, h: int, w: int) -> np.ndarray:
    """HED's and TEED's fusion: each image's side outputs resized (bilinear) to (h, w) and averaged: (N, h, w)."""
    sides = [e.float().cpu().numpy() for e in side_outputs]
    return np.stack([
        np.mean(np.stack([cv2.resize(e[j, 0], (w, h), interpolation=cv2.INTER_LINEAR) for e in sides], 2), axis=2)
        for j in range(len(sides[0]))
    ])


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x.astype(np.float64)))


class SoftEdges(NeuralAnnotator):
    """HED and PiDiNet: a soft-edge map in [0, 1], optionally quantised (safe) or turned into a scribble."""

    SAFE: ClassVar[bool | None] = None  # fixed by the *_safe variants; None: the `safe` parameter
    prepack = True  # on one CPU thread, 128x192 images: HED 0.164 -> 0.141 s, PiDiNet 0.082 -> 0.079 s
    SCRIBBLE: ClassVar[bool] = False

    @property
    def safe(self) -> bool:
        return self.SAFE if self.SAFE is not None else self.params.safe

    def finish(self, edge: np.ndarray) -> np.ndarray:
        """controlnet-aux's ending of HEDdetector and PidiNetDetector: safe step, 8 bit, scribble."""
        from controlnet_aux.util import safe_step

        if self.safe:
            edge = safe_step(edge)
        detected = hwc3((edge * 255.0).clip(0, 255).astype(np.uint8))
        return scribble(detected) if self.SCRIBBLE else detected


@register
class Hed(SoftEdges):
    name = "hed"
    description = "HED soft edges (controlnet-aux ControlNetHED_Apache2)."
    default_model = "lllyasviel/Annotators"
    files = ("ControlNetHED.pth",)

    class Params(Params):
        safe: bool = Field(False, description="Quantise edges as controlnet-aux's safe mode does.")

    def load(self, weights_dir: str) -> None:
        from controlnet_aux.hed import HEDdetector

        detector = HEDdetector.from_pretrained(weights_dir, filename=self.files[0])
        self.network = detector.netNetwork.to(self.device).eval()

    def forward(self, stack: np.ndarray) -> np.ndarray:
        """The maths of controlnet-aux's HEDdetector at the input's own size."""
        return mean_of_sides(self.network(self.tensor(stack)), *stack.shape[1:3])

    def draw(self, logits: np.ndarray) -> np.ndarray:
        return self.finish(sigmoid(logits))


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
class PidiNet(SoftEdges):
    name = "pidinet"
    description = "PiDiNet soft edges (controlnet-aux PidiNetDetector)."
    default_model = "lllyasviel/Annotators"
    files = ("table5_pidinet.pth",)

    class Params(Params):
        safe: bool = Field(False, description="Quantise edges as controlnet-aux's safe mode does.")
        apply_filter: bool = Field(False, description="Binarise edges at 0.5 (controlnet-aux apply_filter).")

    def load(self, weights_dir: str) -> None:
        from controlnet_aux.pidi import PidiNetDetector

        detector = PidiNetDetector.from_pretrained(weights_dir, filename=self.files[0])
        self.network = detector.netNetwork.to(self.device).eval()

    def forward(self, stack: np.ndarray) -> np.ndarray:
        bgr = stack[..., ::-1]  # PiDiNet takes BGR in [0, 1]
        return self.network(self.tensor(bgr) / 255.0)[-1].float().cpu().numpy()[:, 0]

    def draw(self, edge: np.ndarray) -> np.ndarray:
        return self.finish(edge > 0.5 if self.params.apply_filter else edge)


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
    files = ("5_model.pth",)
    pad_multiple = 4
    size = "network input reflect-padded at bottom/right to multiples of 4, output cropped back"
    prepack = True  # 0.018 -> 0.015 s per 128x192 image on one CPU thread

    class Params(Params):
        safe_steps: int = Field(2, ge=0, le=10, description="Quantisation steps (controlnet-aux safe_steps); 0: none.")

    def load(self, weights_dir: str) -> None:
        from controlnet_aux.teed import TEEDdetector

        self.network = TEEDdetector.from_pretrained(weights_dir, filename=self.files[0]).model.to(self.device).eval()

    def forward(self, stack: np.ndarray) -> np.ndarray:
        return mean_of_sides(self.network(self.tensor(stack)), *stack.shape[1:3])

    def draw(self, logits: np.ndarray) -> np.ndarray:
        from controlnet_aux.util import safe_step

        edge = sigmoid(logits)
        if self.params.safe_steps != 0:
            edge = safe_step(edge, self.params.safe_steps)
        return hwc3((edge * 255.0).clip(0, 255).astype(np.uint8))
