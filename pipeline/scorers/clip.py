"""CLIP score: cosine similarity of the CLIP embeddings of a sample's prompt and its generated image.

The model is any transformers `CLIPModel` with its processor (a hub id such as
`openai/clip-vit-large-patch14`, or a local directory with the same layout), loaded once per scoring
actor from safetensors. The score is the cosine in -1..1; torchmetrics' `CLIPScore` reports
100 * max(cosine, 0) of the same embeddings (the tests check that).
"""

from __future__ import annotations

import numpy as np

from pipeline.models import ResolvedModel

PROBE = "config.json"
# what the loader reads (a local directory's fingerprint covers these)
FILES = ("config.json", "*.safetensors", "preprocessor_config.json", "processor_config.json", "tokenizer*",
         "vocab.json", "merges.txt", "special_tokens_map.json")


class ClipScorer:
    def __init__(self, model: ResolvedModel, device: str = "cpu"):
        import torch
        import transformers
        from transformers import CLIPModel, CLIPProcessor

        transformers.utils.logging.disable_progress_bar()
        self._torch = torch
        self.device = device
        self.model = CLIPModel.from_pretrained(model.load_path, revision=model.load_revision,
                                               use_safetensors=True).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(model.load_path, revision=model.load_revision)
        self.max_tokens = self.model.config.text_config.max_position_embeddings

    def __call__(self, images: list[np.ndarray], prompts: list[str]) -> list[float]:
        """One cosine per (image, prompt) pair; prompts longer than the text model's context are truncated."""
        inputs = self.processor(text=[p or "" for p in prompts], images=list(images), return_tensors="pt",
                                padding=True, truncation=True, max_length=self.max_tokens).to(self.device)
        with self._torch.inference_mode():
            out = self.model(**inputs)
        return (out.image_embeds * out.text_embeds).sum(-1).float().cpu().tolist()
