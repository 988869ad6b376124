"""Full-size random-weight models of every generator family, for `benchmarks/gpu.py`: the real architectures
(so the FLOPs and memory of the real checkpoints; the images are noise), written once in the
`save_pretrained` layout that the pipeline loads, and the FLOPs of an image counted by torch's
`FlopCounterMode` on the meta device (no weights, no time).

    family       base (structure of)                 ControlNet (structure of)                     px
    sd15         stable-diffusion-v1-5               lllyasviel/control_v11p_sd15_canny            512
    sdxl         stable-diffusion-xl-base-1.0        diffusers/controlnet-canny-sdxl-1.0            1024
    sdxl_union   stable-diffusion-xl-base-1.0        xinsir/controlnet-union-sdxl-1.0               1024
    sd3          stable-diffusion-3-medium           InstantX/SD3-Controlnet-Canny                  1024
    flux         FLUX.1-dev                          InstantX/FLUX.1-dev-Controlnet-Canny           1024

Tokenizers and schedulers come from the test kit's tiny models of the same family (`pipeline.testing`): their
vocabularies are small, but the pipelines pad prompts to the real lengths (77 CLIP tokens, 256 or 512 T5
tokens), so the text encoders do the real models' work too.
Each model is built on `device` (a GPU builds Flux's 12 B parameters in seconds) in the dtype the pipeline
runs it in on a GPU (the family's `auto_gpu_dtype`), written, and freed before the next.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "projection_dim": 768, "hidden_act": "quick_gelu"}
CLIP_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
          "projection_dim": 1280, "hidden_act": "gelu"}
T5_XXL = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_layers": 24, "num_heads": 64,
          "feed_forward_proj": "gated-gelu", "vocab_size": 32128}
SD15_UNET = {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8,
             "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2}
SDXL_UNET = {"sample_size": 128, "block_out_channels": (320, 640, 1280), "layers_per_block": 2,
             "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
             "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20),
             "cross_attention_dim": 2048, "use_linear_projection": True, "addition_embed_type": "text_time",
             "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816}
SD3_NET = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "attention_head_dim": 64,
           "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
           "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 192}
FLUX_NET = {"patch_size": 1, "in_channels": 64, "attention_head_dim": 128, "num_attention_heads": 24,
            "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
            "axes_dims_rope": (16, 56, 56)}
VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2,
       "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4}
FLOW_VAE = {**VAE, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False}


@dataclass(frozen=True)
class Family:
    size: int  # the base model's native image side, px
    guided: bool  # classifier-free guidance: the denoiser sees each latent twice (Flux: a distilled guidance input)
    tiny_key: str  # make_tiny's key of the same family's base model (tokenizers, scheduler)
    tiny_controlnet: str  # and of its Canny (or Union) ControlNet


FAMILIES = {
    "sd15": Family(512, True, "base_model", "controlnet/canny"),
    "sdxl": Family(1024, True, "sdxl/base_model", "sdxl/controlnet/canny"),
    "sdxl_union": Family(1024, True, "sdxl_union/base_model", "sdxl_union/controlnet"),
    "sd3": Family(1024, True, "sd3/base_model", "sd3/controlnet/canny"),
    "flux": Family(1024, False, "flux/base_model", "flux/controlnet/canny"),
}


def denoiser(family: str):
    """The family's full-size UNet or transformer (on the current default device and dtype)."""
    import diffusers

    if family == "sd15":
        return diffusers.UNet2DConditionModel(**SD15_UNET)
    if family in ("sdxl", "sdxl_union"):
        return diffusers.UNet2DConditionModel(**SDXL_UNET)
    if family == "sd3":
        return diffusers.SD3Transformer2DModel(num_layers=24, **SD3_NET)
    return diffusers.FluxTransformer2DModel(num_layers=19, num_single_layers=38, **FLUX_NET)


def controlnet(family: str, net):
    """The family's full-size ControlNet for Canny, built beside its denoiser `net`."""
    import diffusers

    if family in ("sd15", "sdxl"):
        return diffusers.ControlNetModel.from_unet(net)
    if family == "sdxl_union":  # xinsir's: a transformer mixing the condition features, 6 condition types
        return diffusers.ControlNetUnionModel.from_unet(net)
    if family == "sd3":
        return diffusers.SD3ControlNetModel(num_layers=6, **SD3_NET)
    return diffusers.FluxControlNetModel(num_layers=5, num_single_layers=0, **FLUX_NET)


def text_encoders(family: str, tokenizers: list) -> dict[str, Any]:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    def clip(spec, projection: bool, tokenizer):
        config = CLIPTextConfig(**spec, max_position_embeddings=77, vocab_size=49408,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id)
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)

    def t5():
        return T5EncoderModel(T5Config(**T5_XXL, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))

    if family == "sd15":
        return {"text_encoder": clip(CLIP_L, False, tokenizers[0])}
    if family in ("sdxl", "sdxl_union"):
        return {"text_encoder": clip(CLIP_L, False, tokenizers[0]), "text_encoder_2": clip(CLIP_G, True, tokenizers[1])}
    if family == "sd3":
        return {"text_encoder": clip(CLIP_L, True, tokenizers[0]), "text_encoder_2": clip(CLIP_G, True, tokenizers[1]),
                "text_encoder_3": t5()}
    return {"text_encoder": clip(CLIP_L, False, tokenizers[0]), "text_encoder_2": t5()}


def vae(family: str):
    from diffusers import AutoencoderKL

    if family == "sd15":
        return AutoencoderKL(**VAE, sample_size=512)
    if family in ("sdxl", "sdxl_union"):
        return AutoencoderKL(**VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
    if family == "sd3":
        return AutoencoderKL(**FLOW_VAE, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609)
    return AutoencoderKL(**FLOW_VAE, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159)


def write(family: str, directory: Path, device: str) -> dict[str, str]:
    """The family's full-size base model and Canny ControlNet under `directory` (once; then read back):
    {"base_model": dir, "controlnet": dir}."""
    done = directory / "done.json"
    if done.is_file():
        return json.loads(done.read_text())
    import diffusers
    import torch

    from pipeline.generators import generator_class
    from pipeline.testing import make_tiny

    spec = FAMILIES[family]
    dtype = getattr(torch, generator_class(family).auto_gpu_dtype)  # what the pipeline's `dtype: auto` runs
    tiny_dir = Path(make_tiny(directory / "tiny", conditions=("canny",), annotators=(), captioners=(),
                              families=(family,))[spec.tiny_key])
    base_class = json.loads((tiny_dir / "model_index.json").read_text())["_class_name"]
    tiny = getattr(diffusers, base_class).from_pretrained(tiny_dir)
    paths = {"base_model": str(directory / "base"), "controlnet": str(directory / "controlnet-canny")}
    torch.manual_seed(0)

    def built(make: Callable[[], Any]):
        with torch.device(device):
            torch.set_default_dtype(dtype)
            try:
                return make()
            finally:
                torch.set_default_dtype(torch.float32)

    def build_and_save() -> None:
        net = built(lambda: denoiser(family))
        built(lambda: controlnet(family, net)).save_pretrained(paths["controlnet"], safe_serialization=True)
        tokenizers = [tiny.tokenizer, getattr(tiny, "tokenizer_2", None)]
        components = {**tiny.components, "vae": built(lambda: vae(family)),
                      ("unet" if family in ("sd15", "sdxl", "sdxl_union") else "transformer"): net,
                      **built(lambda: text_encoders(family, tokenizers))}
        type(tiny)(**components).save_pretrained(paths["base_model"], safe_serialization=True)

    build_and_save()
    if device == "cuda":  # the models went with build_and_save: give their memory back for the runs
        gc.collect()
        torch.cuda.empty_cache()
    done.write_text(json.dumps(paths))
    return paths


def image_flops(family: str, size: int, steps: int) -> float:
    """FLOPs of one image at `size` px and `steps` steps, counted on the meta device: the denoiser and the
    ControlNet at every step (both guidance halves where the family guides; a ControlNet window shorter than the
    steps does less than this) and the VAE's decoder once. The text encoders are left out. SD 1.5 at 512 px and
    20 steps: 46.0 TFLOP."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    batch = 2 if FAMILIES[family].guided else 1
    side = size // 8  # latent side
    with torch.device("meta"):
        net, decoder = denoiser(family), vae(family)
        cn = controlnet(family, net)
        t = torch.full((batch,), 500.0)
        with FlopCounterMode(display=False) as step:
            if family in ("sd15", "sdxl", "sdxl_union"):
                x, cond = torch.randn(batch, 4, side, side), torch.randn(batch, 3, size, size)
                text = torch.randn(batch, 77, net.config.cross_attention_dim)
                extra = {}
                if family != "sd15":  # SDXL's micro-conditioning: pooled text and the six size numbers
                    extra = {"added_cond_kwargs": {"text_embeds": torch.randn(batch, 1280),
                                                   "time_ids": torch.randn(batch, 6)}}
                union = {}
                if family == "sdxl_union":  # one condition (Canny: xinsir's type 3) of the six
                    union = {"control_type": torch.zeros(batch, 6), "control_type_idx": [3]}
                down, mid = cn(x, t, text, [cond] if union else cond, return_dict=False, **union, **extra)
                net(x, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid, **extra)
            elif family == "sd3":  # 77 CLIP + 256 T5 tokens
                x, cond = torch.randn(batch, 16, side, side), torch.randn(batch, 16, side, side)
                text, pooled = torch.randn(batch, 333, 4096), torch.randn(batch, 2048)
                blocks = cn(x, cond, encoder_hidden_states=text, pooled_projections=pooled, timestep=t,
                            return_dict=False)[0]
                net(x, text, pooled, t, block_controlnet_hidden_states=blocks)
            else:  # Flux: 2x2 latent patches as tokens, 512 T5 tokens
                tokens = (side // 2) ** 2
                x, text, pooled = torch.randn(batch, tokens, 64), torch.randn(batch, 512, 4096), torch.randn(batch, 768)
                ids = {"img_ids": torch.zeros(tokens, 3), "txt_ids": torch.zeros(512, 3), "guidance": t}
                blocks, single = cn(x, torch.randn(batch, tokens, 64), encoder_hidden_states=text,
                                    pooled_projections=pooled, timestep=t / 1000, return_dict=False, **ids)
                net(x, text, pooled, t / 1000, controlnet_block_samples=blocks,
                    controlnet_single_block_samples=single, **ids)
        with FlopCounterMode(display=False) as decode:
            decoder.decode(torch.randn(1, decoder.config.latent_channels, side, side))
    return steps * step.get_total_flops() + decode.get_total_flops()
