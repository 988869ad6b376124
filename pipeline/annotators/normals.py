"""Surface normals (controlnet-aux network)."""

from __future__ import annotations

import numpy as np

from pipeline.annotators.base import NeuralAnnotator, register


@register
class NormalBae(NeuralAnnotator):
    name = "normal_bae"
    description = "Surface normals, Bae et al. (controlnet-aux NormalBaeDetector)."
    default_model = "lllyasviel/Annotators"
    files = ("scannet.pt",)
    pad_multiple = 32
    size = "network input reflect-padded at bottom/right to multiples of 32, normals cropped back"

    def load(self, weights_dir: str) -> None:
        import contextlib
        import io

        from controlnet_aux.normalbae import NormalBaeDetector

        with contextlib.redirect_stdout(io.StringIO()):  # its encoder prints while it builds
            detector = NormalBaeDetector.from_pretrained(weights_dir, filename=self.files[0])
        self.network = detector.model.to(self.device).eval()
        self.norm = detector.norm

    def forward(self, stack: np.ndarray):
        return self.network(self.norm(self.tensor(stack) / 255.0))[0][-1][:, :3]

    def draw(self, normal) -> np.ndarray:
        normal = ((normal + 1) * 0.5).clip(0, 1).permute(1, 2, 0).float().cpu().numpy()
        return (normal * 255.0).clip(0, 255).astype(np.uint8)
