"""Lines (controlnet-aux networks): M-LSD straight segments and the line-art generators."""

from __future__ import annotations

from typing import ClassVar

import cv2
import numpy as np
from pydantic import Field

from pipeline.annotators.base import NeuralAnnotator, Params, hwc3, pad_to_multiple, register


@register
class Mlsd(NeuralAnnotator):
    """Padded like the others but not cropped: the network's output is a half-resolution line map whose
    segments are drawn on a canvas of the image's size, so it writes its own `run`."""

    name = "mlsd"
    description = "M-LSD straight line segments (controlnet-aux MLSDdetector)."
    default_model = "lllyasviel/Annotators"
    files = ("mlsd_large_512_fp32.pth",)
    pad_multiple = 16
    size = ("network input reflect-padded at bottom/right to multiples of 16; "
            "lines drawn on a canvas of the image's size")

    class Params(Params):
        thr_v: float = Field(0.1, ge=0, le=1, description="Line score threshold.")
        thr_d: float = Field(0.1, ge=0, description="Minimum line length (network pixels).")

    def load(self, weights_dir: str) -> None:
        from controlnet_aux.mlsd import MLSDdetector

        self.network = MLSDdetector.from_pretrained(weights_dir, filename=self.files[0]).model.to(self.device).eval()

    def run(self, same_shape: list[np.ndarray]) -> list[np.ndarray]:
        """controlnet-aux's pred_lines (input_shape = the padded size, so no resize), batched."""
        from controlnet_aux.mlsd.utils import deccode_output_score_and_ptss

        torch = self._torch
        h, w = same_shape[0].shape[:2]
        padded = pad_to_multiple(np.stack(same_shape), self.pad_multiple).astype(np.float32)
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
    files = ("sk_model.pth", "sk_model2.pth")  # controlnet-aux's loader reads both
    pad_multiple = 4
    size = "network input reflect-padded at bottom/right to multiples of 4, output cropped back"
    COARSE: ClassVar[bool] = False

    def load(self, weights_dir: str) -> None:
        from controlnet_aux.lineart import LineartDetector

        detector = LineartDetector.from_pretrained(weights_dir, filename=self.files[0], coarse_filename=self.files[1])
        self.network = (detector.model_coarse if self.COARSE else detector.model).to(self.device).eval()

    def forward(self, stack: np.ndarray) -> np.ndarray:
        return self.network(self.tensor(stack) / 255.0)[:, 0].float().cpu().numpy()

    def draw(self, line: np.ndarray) -> np.ndarray:
        return 255 - hwc3((line * 255.0).clip(0, 255).astype(np.uint8))


@register
class LineartCoarse(Lineart):
    name = "lineart_coarse"
    description = "Line art, coarse (controlnet-aux LineartDetector coarse=True)."
    COARSE = True


@register
class LineartAnime(NeuralAnnotator):
    name = "lineart_anime"
    description = "Anime line art (controlnet-aux LineartAnimeDetector)."
    default_model = "lllyasviel/Annotators"
    files = ("netG.pth",)
    size = "network input resized (cubic) to multiples of 256, output resized (cubic) back, as controlnet-aux does"

    def load(self, weights_dir: str) -> None:
        from controlnet_aux.lineart_anime import LineartAnimeDetector

        detector = LineartAnimeDetector.from_pretrained(weights_dir, filename=self.files[0])
        self.network = detector.model.to(self.device).eval()

    def forward(self, stack: np.ndarray) -> list[np.ndarray]:
        h, w = stack.shape[1:3]
        hn, wn = 256 * int(np.ceil(h / 256.0)), 256 * int(np.ceil(w / 256.0))
        feed = np.stack([cv2.resize(img, (wn, hn), interpolation=cv2.INTER_CUBIC) for img in stack])
        lines = (self.network(self.tensor(feed) / 127.5 - 1.0)[:, 0] * 127.5 + 127.5).float().cpu().numpy()
        return [cv2.resize(line, (w, h), interpolation=cv2.INTER_CUBIC) for line in lines]

    def draw(self, line: np.ndarray) -> np.ndarray:
        return 255 - hwc3(line.clip(0, 255).astype(np.uint8))
