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
ENCODER = {
    "in_channels": 4,
    "block_out_channels": (8, 16),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "cross_attention_dim": CROSS_ATTENTION_DIM,
    "attention_head_dim": 2,
    "norm_num_groups": 4,
}
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



def _randomize_zero_convs(controlnet, extra=()) -> None:
    """A fresh ControlNet's "zero" layers are all zeros, so it would have no effect at all: give them small
    random weights so that the control image actually changes the output."""
    import torch

    layers = [controlnet.controlnet_cond_embedding.conv_out, *controlnet.controlnet_down_blocks,
              controlnet.controlnet_mid_block, *extra]
    with torch.no_grad():
        for layer in layers:
            for param in layer.parameters():
                param.normal_(std=0.1)


# ---- Stable Diffusion XL -----------------------------------------------------------------------------
# Two CLIP text encoders of width 32: cross-attention sees both (64); the pooled projection of the second
# (32) plus six size embeddings of 8 form the "text_time" added condition (6 * 8 + 32 = 80).
SDXL_ENCODER = {
    "in_channels": 4,
    "block_out_channels": (8, 16),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "cross_attention_dim": 2 * CROSS_ATTENTION_DIM,
    "attention_head_dim": 2,
    "norm_num_groups": 4,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + CROSS_ATTENTION_DIM,
}
UNION_CONTROL_TYPES = 8  # as ProMax: 0 openpose ... 6 tile, 7 repaint


def _clip_config(tokenizer, projection_dim: int | None = None) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=1000, hidden_size=CROSS_ATTENTION_DIM, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **({"projection_dim": projection_dim} if projection_dim else {}),
    )


def _vae_8x(**extra) -> AutoencoderKL:
    return AutoencoderKL(  # four blocks -> scale factor 2**3 = 8, as the real models
        in_channels=3, out_channels=3, block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=4, sample_size=LATENT_SIZE * 8,
        **({"latent_channels": 4} | extra),
    )


def write_sdxl(sdxl_dir: Path, seed: int) -> None:
    """A Stable Diffusion XL pipeline (`StableDiffusionXLPipeline.save_pretrained` layout)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    tokenizer = _make_tokenizer(sdxl_dir / "tokenizer")
    tokenizer_2 = _make_tokenizer(sdxl_dir / "tokenizer_2")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer, projection_dim=CROSS_ATTENTION_DIM))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=LATENT_SIZE, out_channels=4, up_block_types=UP_BLOCK_TYPES, **SDXL_ENCODER)
    torch.manual_seed(seed)
    vae = _vae_8x()
    scheduler = EulerDiscreteScheduler(  # SDXL's scheduler_config values
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, timestep_spacing="leading", interpolation_type="linear", prediction_type="epsilon",
    )
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(sdxl_dir, safe_serialization=True)


def write_sdxl_controlnet(cn_dir: Path, seed: int, union: bool = False) -> None:
    """An SDXL ControlNet (`ControlNetModel`), or with `union` a `ControlNetUnionModel` (xinsir's layout)."""
    from diffusers import ControlNetUnionModel

    torch.manual_seed(seed)
    common = dict(conditioning_channels=3, conditioning_embedding_out_channels=(8, 8, 8, 8), **SDXL_ENCODER)
    if union:
        width = SDXL_ENCODER["block_out_channels"][0]
        controlnet = ControlNetUnionModel(num_control_type=UNION_CONTROL_TYPES, num_trans_channel=width,
                                          num_trans_head=2, num_trans_layer=1, num_proj_channel=width, **common)
        _randomize_zero_convs(controlnet, [controlnet.spatial_ch_projs])
    else:
        controlnet = ControlNetModel(**common)
        _randomize_zero_convs(controlnet)
    controlnet.save_pretrained(cn_dir, safe_serialization=True)


# ---- T5 (Flux, SD3) -------------------------------------------------------------------------------------
T5_WORDS = ("a", "photo", "of", "the", "painting", "at", "night", "blurry")


def _make_t5_tokenizer(tokenizer_dir: Path):
    """A small SentencePiece-style Unigram tokenizer (T5's pieces: "▁word", single characters, </s> appended),
    built with the tokenizers library and saved as T5TokenizerFast writes it (tokenizer.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import T5TokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in chars] + [("\u2581" + w, -1.0) for w in T5_WORDS]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                extra_ids=0, model_max_length=512)
    tokenizer.save_pretrained(tokenizer_dir)
    return T5TokenizerFast.from_pretrained(tokenizer_dir)


def _t5_encoder(d_model: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=128, d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0))


def _flow_vae() -> AutoencoderKL:
    """Flux/SD3-style VAE: no quant convs, shift and scaling factors (8x, as the real ones)."""
    return _vae_8x(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)


# Flux: 4 latent channels packed 2x2 -> 16 transformer channels; rope axes add up to the head dim.
FLUX_NET = {"patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
                "num_attention_heads": 2, "joint_attention_dim": CROSS_ATTENTION_DIM, "pooled_projection_dim": CROSS_ATTENTION_DIM,
                "guidance_embeds": True, "axes_dims_rope": (4, 6, 6)}
FLUX_UNION_MODES = 10  # as InstantX's Union checkpoint


def write_flux(flux_dir: Path, seed: int) -> None:
    """A Flux.1-dev-style pipeline (`FluxPipeline.save_pretrained` layout): CLIP + T5, the MM-DiT transformer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer = _make_tokenizer(flux_dir / "tokenizer")
    tokenizer_2 = _make_t5_tokenizer(flux_dir / "tokenizer_2")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_config(tokenizer))
    text_encoder_2 = _t5_encoder(CROSS_ATTENTION_DIM)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**FLUX_NET)
    torch.manual_seed(seed)
    vae = _flow_vae()
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's scheduler_config values
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                 text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
                 ).save_pretrained(flux_dir, safe_serialization=True)


def write_flux_controlnet(cn_dir: Path, seed: int, union: bool = False) -> None:
    """An InstantX-style `FluxControlNetModel` (the control image is VAE-encoded); `union`: with modes."""
    from diffusers import FluxControlNetModel

    torch.manual_seed(seed)
    net = FluxControlNetModel(**FLUX_NET, num_mode=FLUX_UNION_MODES if union else None)
    with torch.no_grad():  # zero-initialised input and output layers: small random weights, so control matters
        for layer in [net.controlnet_x_embedder, *net.controlnet_blocks, *net.controlnet_single_blocks]:
            for param in layer.parameters():
                param.normal_(std=0.1)
    net.save_pretrained(cn_dir, safe_serialization=True)


# SD3: two CLIP encoders with projections (pooled 32 + 32 = 64), T5 of width 64 (CLIP's 64 padded to it).
SD3_NET = {"sample_size": LATENT_SIZE, "patch_size": 1, "in_channels": 4, "attention_head_dim": 8, "num_attention_heads": 4,
               "joint_attention_dim": 2 * CROSS_ATTENTION_DIM, "caption_projection_dim": 32,
               "pooled_projection_dim": 2 * CROSS_ATTENTION_DIM, "out_channels": 4}


def write_sd3(sd3_dir: Path, seed: int) -> None:
    """A Stable Diffusion 3-style pipeline (`StableDiffusion3Pipeline.save_pretrained` layout)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    tokenizer = _make_tokenizer(sd3_dir / "tokenizer")
    tokenizer_2 = _make_tokenizer(sd3_dir / "tokenizer_2")
    tokenizer_3 = _make_t5_tokenizer(sd3_dir / "tokenizer_3")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(_clip_config(tokenizer, projection_dim=CROSS_ATTENTION_DIM))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer_2, projection_dim=CROSS_ATTENTION_DIM))
    text_encoder_3 = _t5_encoder(2 * CROSS_ATTENTION_DIM)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(num_layers=2, **SD3_NET)
    torch.manual_seed(seed)
    vae = _flow_vae()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)  # SD3's scheduler_config
    StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                             tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                             text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
                             ).save_pretrained(sd3_dir, safe_serialization=True)


def write_sd3_controlnet(cn_dir: Path, seed: int) -> None:
    from diffusers import SD3ControlNetModel

    torch.manual_seed(seed)
    net = SD3ControlNetModel(num_layers=1, **SD3_NET)
    with torch.no_grad():  # zero-initialised input embedding and output blocks: small random weights
        for layer in [net.pos_embed_input, *net.controlnet_blocks]:
            for param in layer.parameters():
                param.normal_(std=0.1)
    net.save_pretrained(cn_dir, safe_serialization=True)


# ---- every family's tiny models, for make_tiny ----------------------------------------------------------
# family -> (base model directory, ControlNet directory pattern or Union directory, writers)
TINY_FAMILIES = ("sd15", "sdxl", "sdxl_union", "flux", "sd3")


def family_names(families) -> list[str]:
    names = list(TINY_FAMILIES) if families == "all" or list(families) == ["all"] else list(families)
    unknown = [f for f in names if f not in TINY_FAMILIES]
    if unknown:
        raise ValueError(f"no tiny models for families {unknown}; known: {list(TINY_FAMILIES)}")
    return sorted(set(names), key=TINY_FAMILIES.index)


def family_paths(out: Path, family: str, conditions) -> dict[str, str]:
    """Where `write_family` puts a family's models, by key ("F/base_model", "F/controlnet/<cond>", "F/controlnet")."""
    if family == "sd15":
        return {}  # the top-level "base_model" and "controlnet/<cond>"
    if family == "sdxl":
        return {"sdxl/base_model": str(out / "sdxl" / "base"),
                **{f"sdxl/controlnet/{c}": str(out / "sdxl" / f"controlnet-{c}") for c in conditions}}
    if family == "sdxl_union":
        return {"sdxl_union/base_model": str(out / "sdxl" / "base"),
                "sdxl_union/controlnet": str(out / "sdxl" / "controlnet-union")}
    if family in ("flux", "sd3"):
        return {f"{family}/base_model": str(out / family / "base"),
                **{f"{family}/controlnet/{c}": str(out / family / f"controlnet-{c}") for c in conditions},
                **({"flux/controlnet": str(out / "flux" / "controlnet-union")} if family == "flux" else {})}
    raise ValueError(family)


def write_family(out: Path, family: str, conditions, seed: int) -> None:
    paths = family_paths(out, family, conditions)
    if family == "sdxl":
        write_sdxl(Path(paths["sdxl/base_model"]), seed)
        for index, cond in enumerate(conditions):
            write_sdxl_controlnet(Path(paths[f"sdxl/controlnet/{cond}"]), seed + index)
    elif family == "sdxl_union":
        write_sdxl(Path(paths["sdxl_union/base_model"]), seed)
        write_sdxl_controlnet(Path(paths["sdxl_union/controlnet"]), seed, union=True)
    elif family == "flux":
        write_flux(Path(paths["flux/base_model"]), seed)
        for index, cond in enumerate(conditions):
            write_flux_controlnet(Path(paths[f"flux/controlnet/{cond}"]), seed + index)
        write_flux_controlnet(Path(paths["flux/controlnet"]), seed, union=True)
    elif family == "sd3":
        write_sd3(Path(paths["sd3/base_model"]), seed)
        for index, cond in enumerate(conditions):
            write_sd3_controlnet(Path(paths[f"sd3/controlnet/{cond}"]), seed + index)
