"""Training pairs from the pipeline's own output, as a streaming Ray Dataset.

A path is a run output (Parquet under `samples/`) or an `export --format controlnet-train` folder
(under `train/`). Ray Data reads the three columns and prepares every pair on CPU workers: decode,
resize (short side) and center-crop to the resolution, tokenize the text with the base model's own
tokenizer, so the training workers only run the networks.
"""

from __future__ import annotations

import functools
import io
import json
import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from pipeline.io.output import check_plain_parquet
from pipeline.schema import IMAGE
from pipeline.io.sources import filesystem, read_parquet_files
from pipeline.train.config import TrainConfig


class TrainDataError(ValueError):
    """A dataset path that holds no training pairs, or not the columns asked for."""


@dataclass(frozen=True)
class Source:
    """One dataset path: its Parquet files, columns, and what made it (for the model card)."""

    path: str
    files: list[str]  # within the path's filesystem
    image: str
    control: str
    text: str
    rows: int
    provenance: dict[str, Any]


def inspect_source(path: str, cfg: TrainConfig) -> Source:
    fs, root = filesystem(path, cfg.data.storage_options)
    export = fs.exists(posixpath.join(root, "train"))
    if not export and fs.isdir(posixpath.join(root, "sources")):
        raise TrainDataError(f"data path {path} has the normalized layout (source images and control maps in "
                             f"sources/): export it first (python -m pipeline export {path} DEST --format "
                             f"controlnet-train) and train on DEST")
    files = sorted(fs.glob(posixpath.join(root, "train" if export else "samples", "*.parquet")))
    if not files:
        if not fs.exists(root):
            raise TrainDataError(f"data path {path} does not exist")
        hint = ""
        if fs.isfile(root) or fs.glob(posixpath.join(root, "*.parquet")):  # the samples/ or train/ folder, or a file
            hint = "; it holds Parquet itself: give the folder above a run's samples/ or an export's train/"
        raise TrainDataError(f"data path {path} has no samples/*.parquet (a run output) or train/*.parquet (an "
                             f"export){hint}")
    with fs.open(files[0], "rb") as f:
        check_plain_parquet(f, files[0])
        schema = pq.read_schema(f)
    columns = schema.names
    rows = 0
    for name in files:
        with fs.open(name, "rb") as f:
            rows += pq.ParquetFile(f).metadata.num_rows
    controls = [f.name for f in schema if f.name.startswith("control_") and f.type == IMAGE]  # the control maps
    image = cfg.data.image_column or ("image" if export else "generated" if "generated" in columns else "image")
    control = cfg.data.control_column or ("conditioning_image" if export else controls[0] if len(controls) == 1 else None)
    text = cfg.data.text_column or ("text" if export else "prompt" if "prompt" in columns else "caption")
    if control is None:
        raise TrainDataError(f"data path {path} has control maps {controls}: choose one with data.control_column")
    missing = [c for c in (image, control, text) if c not in columns]
    if missing:
        raise TrainDataError(f"data path {path} has no column {', '.join(missing)}; it has {columns}")
    record = "export.json" if export else "manifest.json"
    provenance: dict[str, Any] = {"path": path, "kind": "export" if export else "run output", "rows": rows}
    if fs.exists(posixpath.join(root, record)):
        with fs.open(posixpath.join(root, record), "r") as f:
            doc = json.load(f)
        provenance.update({k: doc.get(k) for k in ("run_id", "job_fingerprint", "source", "source_run_id") if doc.get(k)})
        # whether the run (or the run an export was made from) had completed; unknown for older exports
        provenance["completed"] = doc.get("source_completed" if export else "completed")
    return Source(path, files, image, control, text, rows, provenance)


def square(png: bytes, resolution: int) -> np.ndarray:
    """A PNG as uint8 RGB, resized so its short side is `resolution`, center-cropped to a square."""
    with Image.open(io.BytesIO(png)) as im:
        im = im.convert("RGB")
        scale = resolution / min(im.size)
        im = im.resize((max(resolution, round(im.width * scale)), max(resolution, round(im.height * scale))),
                       Image.Resampling.BICUBIC)
        left, top = (im.width - resolution) // 2, (im.height - resolution) // 2
        return np.asarray(im.crop((left, top, left + resolution, top + resolution)))


@functools.lru_cache(maxsize=4)
def tokenizer(base_model: str, revision: str | None):
    """The base model's own tokenizer, loaded once per Ray worker process."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(base_model, subfolder="tokenizer", revision=revision)


def prepare(batch: pa.Table, cfg: TrainConfig, source: Source) -> dict[str, np.ndarray]:
    """Decode, resize and crop both images; tokenize the text."""
    rows = batch.to_pylist()
    tok = tokenizer(cfg.base_model, cfg.revision)
    ids = tok([r[source.text] or "" for r in rows], padding="max_length", max_length=tok.model_max_length,
              truncation=True, return_tensors="np").input_ids
    return {
        "pixels": np.stack([square(r[source.image]["bytes"], cfg.resolution) for r in rows]),
        "control": np.stack([square(r[source.control]["bytes"], cfg.resolution) for r in rows]),
        "input_ids": ids.astype(np.int64),
    }


@functools.lru_cache(maxsize=1)
def encoders(base_model: str, revision: str | None, device: str):
    """The locked VAE and text encoder, loaded once per Ray worker process."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    vae = AutoencoderKL.from_pretrained(base_model, subfolder="vae", revision=revision).to(device).eval()
    text_encoder = CLIPTextModel.from_pretrained(base_model, subfolder="text_encoder", revision=revision).to(device).eval()
    return vae, text_encoder


def encode(batch: dict[str, np.ndarray], cfg: TrainConfig) -> dict[str, np.ndarray]:
    """VAE-encode the images and text-encode the captions (`data.precompute`): the training workers
    then run only the UNet and the ControlNet. The latent distribution is kept (mean and std), so
    each step still draws its own latent sample, exactly as `latent_dist.sample` would."""
    import torch

    device = "cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu"
    vae, text_encoder = encoders(cfg.base_model, cfg.revision, device)
    with torch.no_grad():
        pixels = torch.from_numpy(batch["pixels"]).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        latent = vae.encode(pixels).latent_dist
        text = text_encoder(torch.from_numpy(batch["input_ids"]).to(device), return_dict=False)[0]
    return {"latent_mean": latent.mean.float().cpu().numpy(), "latent_std": latent.std.float().cpu().numpy(),
            "text": text.float().cpu().numpy(), "control": batch["control"]}


def training_dataset(cfg: TrainConfig, sources: list[Source]):
    """Every pair of every source as one streaming Dataset of prepared numpy batches.

    Reading and preparing are tasks with light CPU claims, not actors: the training workers hold
    most CPUs for the whole run, and whatever Ray Data keeps must leave room for its own tasks. The
    files, already listed, are read as they are (`read_parquet_files`). With `data.precompute`, a
    further stage encodes on a GPU of its own (`use_gpu`) or on CPU.
    """
    datasets = []
    for source in sources:
        fs, _ = filesystem(source.path, cfg.data.storage_options)
        arrow_fs = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
        ds = read_parquet_files(source.files, filesystem=arrow_fs, columns=[source.image, source.control, source.text],
                                num_cpus=0.25)
        datasets.append(ds.map_batches(prepare, fn_kwargs={"cfg": cfg, "source": source}, batch_format="pyarrow",
                                       batch_size=16, num_cpus=0.25))
    ds = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
    if cfg.data.precompute:
        resources = {"num_gpus": 1} if cfg.use_gpu else {"num_cpus": 0.25}
        ds = ds.map_batches(encode, fn_kwargs={"cfg": cfg}, batch_format="numpy", batch_size=16, **resources)
    return ds
