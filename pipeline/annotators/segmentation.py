"""Semantic segmentation (transformers UperNet), drawn in the ADE20K palette."""

from __future__ import annotations

import numpy as np

from pipeline.annotators.base import TransformersAnnotator, register


@register
class SegAde20k(TransformersAnnotator):
    name = "seg_ade20k"
    description = "Semantic segmentation (transformers UperNetForSemanticSegmentation) in the ADE20K palette."
    default_model = "openmmlab/upernet-convnext-small"
    model_class = "UperNetForSemanticSegmentation"
    size = "network input resized by the model's image processor, logits resized (bilinear) back, then argmax"

    def forward(self, stack: np.ndarray) -> list:
        outputs = self.network(pixel_values=self.pixel_values(stack))
        return self.processor.post_process_semantic_segmentation(outputs, target_sizes=[stack.shape[1:3]] * len(stack))

    def draw(self, labels) -> np.ndarray:
        from controlnet_aux.util import ade_palette

        palette = np.array(ade_palette(), dtype=np.uint8)
        return palette[np.asarray(labels.cpu(), dtype=np.int64) % len(palette)]
