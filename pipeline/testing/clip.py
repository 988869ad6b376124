"""A tiny random-weight CLIP model (transformers `CLIPModel` + `CLIPProcessor`, save_pretrained layout)
for the quality gate's CLIP score in tests and offline runs. Its tokenizer is the offline CLIP BPE
tokenizer of the tiny diffusion models."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from pipeline.testing.diffusion import _make_tokenizer

IMAGE_SIZE = 32


def write_clip(clip_dir: str | Path, seed: int = 0) -> str:
    """Write the tiny CLIP model and its processor to clip_dir; returns the directory."""
    clip_dir = Path(clip_dir)
    tokenizer = _make_tokenizer(clip_dir)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"vocab_size": 1000, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 77, "eos_token_id": tokenizer.eos_token_id,
                     "bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": IMAGE_SIZE, "patch_size": 8},
        projection_dim=16,
    )
    CLIPModel(config).eval().save_pretrained(clip_dir, safe_serialization=True)
    processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                   crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(clip_dir)
    return str(clip_dir)
