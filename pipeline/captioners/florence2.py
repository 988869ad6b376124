"""Florence-2 captioning (transformers `Florence2ForConditionalGeneration` + `Florence2Processor`), e.g.
`florence-community/Florence-2-base` or `-large` (the transformers-native checkpoints), with one of
its caption task prompts: `<CAPTION>`, `<DETAILED_CAPTION>`, `<MORE_DETAILED_CAPTION>`."""

from __future__ import annotations

import numpy as np

from pipeline.captioners.base import Captioner
from pipeline.models import ResolvedModel


class Florence2Captioner(Captioner):
    kind = "florence2"
    tasks = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")

    def load(self, model: ResolvedModel) -> None:
        from transformers import Florence2ForConditionalGeneration, Florence2Processor

        self.model = Florence2ForConditionalGeneration.from_pretrained(
            model.load_path, revision=model.load_revision, use_safetensors=True, dtype=self.dtype).to(self.device).eval()
        self.processor = Florence2Processor.from_pretrained(model.load_path, revision=model.load_revision)

    def generate(self, images: list[np.ndarray]) -> list[str]:
        inputs = self.processor(text=[self.task] * len(images), images=list(images), return_tensors="pt")
        inputs = inputs.to(self.device, self.dtype)
        ids = self.model.generate(**inputs, **self.greedy())
        # special tokens skipped: a batch pads its shorter captions with <pad>, which the parsing of caption
        # tasks (pure text) would keep; then the processor's own parsing for the task
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        return [self.processor.post_process_generation(text=t, task=self.task, image_size=(im.shape[1], im.shape[0]))[self.task]
                for t, im in zip(texts, images)]


CAPTIONER = Florence2Captioner
