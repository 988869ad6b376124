"""BLIP image captioning (transformers `BlipForConditionalGeneration` + `BlipProcessor`), e.g.
`Salesforce/blip-image-captioning-base` or `-large`: unconditional captions, no task prompt."""

from __future__ import annotations

import numpy as np

from pipeline.captioners.base import Captioner
from pipeline.models import ResolvedModel


class BlipCaptioner(Captioner):
    kind = "blip"
    tasks = ()

    def load(self, model: ResolvedModel) -> None:
        from transformers import BlipForConditionalGeneration, BlipProcessor

        self.model = BlipForConditionalGeneration.from_pretrained(
            model.load_path, revision=model.load_revision, use_safetensors=True, dtype=self.dtype).to(self.device).eval()
        self.processor = BlipProcessor.from_pretrained(model.load_path, revision=model.load_revision)

    def generate(self, images: list[np.ndarray]) -> list[str]:
        inputs = self.processor(images=list(images), return_tensors="pt").to(self.device, self.dtype)
        ids = self.model.generate(**inputs, **self.greedy())
        return self.processor.batch_decode(ids, skip_special_tokens=True)


CAPTIONER = BlipCaptioner
