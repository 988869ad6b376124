"""Tiny random-weight captioners with the real architectures, for tests and offline runs: BLIP
(`BlipForConditionalGeneration`, a BERT WordPiece tokenizer written from a small vocab.txt) and
Florence-2 (`Florence2ForConditionalGeneration`: DaViT vision tower + BART, a byte-level BPE
tokenizer written from a small vocab.json/merges.txt), each with its real processor, in the
`save_pretrained` layout that `from_pretrained` and `models fetch` expect.

Random weights caption in random words. BLIP's vocabulary holds only words and letters; Florence-2's
generation_config keeps its decoder to lowercase letters and spaces and asks for a few tokens at least
(the pipeline's greedy decoding settings apply on top, as with real checkpoints), so that every caption
is readable, non-empty text.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

BLIP_WORDS = ("a", "photo", "of", "the", "cat", "man", "cup", "rocket", "person", "camera", "coffee", "on", "in",
              "with", "space", "sitting", "white", "black")
IMAGE_SIZE = 64


def _generation_config(model, tokenizer, keep: set[int], min_new_tokens: int = 4) -> None:
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.sep_token_id} - {None}
    cfg = model.generation_config
    cfg.suppress_tokens = [i for i in range(len(tokenizer)) if i not in keep and i not in special]
    cfg.min_new_tokens = min_new_tokens


def write_blip(out_dir: str | Path, seed: int = 0) -> str:
    """A tiny BLIP captioning model (random weights) and its BlipProcessor under out_dir."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    letters = list(string.ascii_lowercase)
    words = [w for w in BLIP_WORDS if len(w) > 1]
    # no "##" word pieces: captioning never tokenizes text, and so every generated token is a word or a letter
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *words]
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(str(out / "vocab.txt"), bos_token="[DEC]", model_max_length=64)
    torch.manual_seed(seed)
    config = BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=IMAGE_SIZE, patch_size=16),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, encoder_hidden_size=32,
                         bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
                         eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id),
        projection_dim=16, image_text_hidden_size=16)
    model = BlipForConditionalGeneration(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    processor = BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    BlipProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(out)
    return str(out)


# a few BPE merges so that some words are single tokens; everything else splits into bytes
FLORENCE2_MERGES = [("Ġ", "a"), ("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "c"), ("Ġc", "a"), ("Ġca", "t")]


def write_florence2(out_dir: str | Path, seed: int = 0) -> str:
    """A tiny Florence-2 model (DaViT + BART, random weights) and its Florence2Processor under out_dir."""
    from transformers import (
        BartConfig,
        BartTokenizer,
        CLIPImageProcessor,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
        Florence2VisionConfig,
    )

    from pipeline.testing.diffusion import _bytes_to_unicode

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokens = ["<s>", "<pad>", "</s>", "<unk>", *_bytes_to_unicode(), *(a + b for a, b in FLORENCE2_MERGES), "<mask>"]
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in FLORENCE2_MERGES),
                                    encoding="utf-8")
    tokenizer = BartTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=1024,
                              extra_special_tokens={"image_token": "<image>"})
    torch.manual_seed(seed)
    # strides 4, 2, 2, 2: a 64 px image gives 2 x 2 visual tokens, plus one pooled token
    vision = Florence2VisionConfig(depths=(1, 1, 1, 1), embed_dim=(8, 16, 16, 32), num_heads=(1, 2, 2, 4),
                                   num_groups=(1, 2, 2, 4), window_size=2, projection_dim=32, max_position_embeddings=8,
                                   drop_path_rate=0.0)
    text = BartConfig(vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1,
                      encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                      max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      decoder_start_token_id=tokenizer.eos_token_id, forced_bos_token_id=tokenizer.bos_token_id,
                      init_std=1.0)  # large random weights: the image visibly changes the caption
    model = Florence2ForConditionalGeneration(
        Florence2Config(vision_config=vision, text_config=text, image_token_id=tokenizer.image_token_id)).eval()
    keep = {i for t, i in tokenizer.get_vocab().items() if t == "Ġ" or set(t.removeprefix("Ġ")) <= LOWERCASE}
    _generation_config(model, tokenizer, keep)
    model.save_pretrained(out, safe_serialization=True)
    side = IMAGE_SIZE // 32
    processor = CLIPImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_center_crop=False,
                                   crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_seq_length=side * side + 1)
    # the parse rules the released checkpoints' processor_config.json carries (captions are pure_text)
    parse = {"pure_text": {}, "ocr": {"pattern": OCR_PATTERN, "area_threshold": 0.0},
             "phrase_grounding": {"banned_grounding_tokens": ["the image"]}, "description_with_bboxes": {},
             "description_with_polygons": {}, "polygons": {}, "bboxes": {}, "description_with_bboxes_or_polygons": {}}
    Florence2Processor(image_processor=processor, tokenizer=tokenizer, post_processor_config=parse).save_pretrained(out)
    return str(out)


LOWERCASE = set(string.ascii_lowercase)
OCR_PATTERN = r"(.+?)" + r"<loc_(\d+)>" * 8
WRITERS = {"blip": write_blip, "florence2": write_florence2}


def write_captioners(root: str | Path, kinds=("blip", "florence2"), seed: int = 0) -> dict[str, str]:
    """The tiny captioners of `kinds` under root/captioner-<kind>; returns {"captioner/<kind>": path}."""
    root = Path(root)
    return {f"captioner/{kind}": WRITERS[kind](root / f"captioner-{kind}", seed) for kind in kinds}
