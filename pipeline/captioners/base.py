"""The Captioner interface: a transformers image-to-text model, loaded once, captioning a batch of
images with greedy decoding (the same image always gets the same caption)."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from pipeline.models import ResolvedModel

PROBE = "config.json"
# what the loaders read (models fetch downloads these; a local directory's fingerprint covers them)
FILES = ("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
         "preprocessor_config.json", "processor_config.json", "tokenizer*", "special_tokens_map.json",
         "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt")


class Captioner:
    """Subclasses set `kind`, `tasks` (the task prompts they accept, the default first; empty: none) and
    implement `load` and `generate`."""

    kind: ClassVar[str]
    tasks: ClassVar[tuple[str, ...]] = ()
    probe: ClassVar[str] = PROBE
    files: ClassVar[tuple[str, ...]] = FILES

    def __init__(self, model: ResolvedModel, task: str | None, max_new_tokens: int, device: str = "cpu"):
        import torch
        import transformers

        transformers.utils.logging.disable_progress_bar()
        self._torch = torch
        self.model_ref, self.task, self.max_new_tokens, self.device = model, task, max_new_tokens, device
        self.dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self.load(model)

    def load(self, model: ResolvedModel) -> None:
        raise NotImplementedError

    def generate(self, images: list[np.ndarray]) -> list[str]:
        raise NotImplementedError

    def greedy(self) -> dict[str, Any]:
        """Deterministic decoding, whatever the checkpoint's generation_config suggests (beams, sampling)."""
        return {"max_new_tokens": self.max_new_tokens, "do_sample": False, "num_beams": 1}

    def __call__(self, images: list[np.ndarray]) -> list[str]:
        with self._torch.inference_mode():
            return [" ".join(text.split()) for text in self.generate(images)]

    def provenance(self) -> dict[str, Any]:
        import transformers

        return {"kind": self.kind, "model": self.model_ref.model, "revision": self.model_ref.commit,
                "task": self.task, "max_new_tokens": self.max_new_tokens, "decoding": "greedy",
                "transformers": transformers.__version__}
