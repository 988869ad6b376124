"""Tiny random-weight diffusion models with the real architectures: a Stable Diffusion 1.5-style
pipeline (`StableDiffusionPipeline.save_pretrained` layout, no safety checker) and ControlNets that
mirror its UNet's encoder, so that diffusers' own `from_pretrained` loads them from a directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

CROSS_ATTENTION_DIM = 32
# Shared by the UNet and every ControlNet: a ControlNet must mirror its UNet's encoder.
ENCODER = dict(
    in_channels=4,
    block_out_channels=(8, 16),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    cross_attention_dim=CROSS_ATTENTION_DIM,
    attention_head_dim=2,
    norm_num_groups=4,
)
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
LATENT_SIZE = 8  # default image size = LATENT_SIZE * 8 = 64 px

# A few BPE merges so common words become single tokens; everything else splits into bytes.
MERGES = [("t", "h"), ("th", "e</w>"), ("o", "f</w>"), ("c", "a"), ("ca", "t</w>")]


def _bytes_to_unicode() -> list[str]:
    """The 256-character byte-level alphabet of CLIP's (and GPT-2's) BPE, in CLIP's order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def _make_tokenizer(tokenizer_dir: Path) -> CLIPTokenizer:
    """Write vocab.json/merges.txt (CLIP layout, vocab order as in CLIP) and load them."""
    alphabet = _bytes_to_unicode()
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    vocab_file = tokenizer_dir / "vocab.json"
    merges_file = tokenizer_dir / "merges.txt"
    vocab_file.write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES), encoding="utf-8")
    # model_max_length must be given: the default is "very large", which breaks padding in transformers v5.
    return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77)


def write_stable_diffusion(sd_dir: Path, seed: int) -> None:
    tokenizer = _make_tokenizer(sd_dir / "tokenizer")

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=1000,
            hidden_size=CROSS_ATTENTION_DIM,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    assert len(tokenizer) <= text_encoder.config.vocab_size

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=LATENT_SIZE, out_channels=4, up_block_types=UP_BLOCK_TYPES, **ENCODER)

    torch.manual_seed(seed)
    vae = AutoencoderKL(  # four blocks -> scale factor 2**3 = 8, as in SD 1.5
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=LATENT_SIZE * 8,
    )

    scheduler = DDIMScheduler(  # SD 1.5's scheduler_config values
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=False,
    )

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(sd_dir, safe_serialization=True)


def write_controlnet(cn_dir: Path, seed: int) -> None:
    torch.manual_seed(seed)
    controlnet = ControlNetModel(
        conditioning_channels=3,
        conditioning_embedding_out_channels=(8, 8, 8, 8),  # three stride-2 convs: 8x, as in SD 1.5
        **ENCODER,
    )
    # A fresh ControlNet's "zero convolutions" are all zeros, so it would have no effect at all.
    # Give them small random weights so that the control image actually changes the output.
    zero_convs = [
        controlnet.controlnet_cond_embedding.conv_out,
        *controlnet.controlnet_down_blocks,
        controlnet.controlnet_mid_block,
    ]
    with torch.no_grad():
        for conv in zero_convs:
            for param in conv.parameters():
                param.normal_(std=0.1)
    controlnet.save_pretrained(cn_dir, safe_serialization=True)

