"""Training pairs from the pipeline's own output, as a streaming Ray Dataset.

A path is a run output (Parquet under `samples/`) or an `export --format controlnet-train` folder
(under `train/`). Ray Data reads the three columns and prepares every pair on CPU workers: decode,
resize (short side) and center-crop to the resolution, tokenize the text with the base model's own
tokenizer, so the training workers only run the networks.
"""

from __future__ import annotations

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
from pipeline.io.sources import filesystem
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
    files = sorted(fs.glob(posixpath.join(root, "train" if export else "samples", "*.parquet")))
    if not files:
        raise TrainDataError(f"data path {path} has no samples/*.parquet (a run output) or train/*.parquet (an export)")
    with fs.open(files[0], "rb") as f:
        check_plain_parquet(f, files[0])
        columns = pq.read_schema(f).names
    rows = 0
    for name in files:
        with fs.open(name, "rb") as f:
            rows += pq.ParquetFile(f).metadata.num_rows
    controls = [c for c in columns if c.startswith("control_")]
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


class Prepare:
    """Decode, resize and crop both images; tokenize the text (the base model's tokenizer, loaded once)."""

    def __init__(self, cfg: TrainConfig, source: Source):
        from transformers import CLIPTokenizer

        self.resolution, self.source = cfg.resolution, source
        self.tokenizer = CLIPTokenizer.from_pretrained(cfg.base_model, subfolder="tokenizer", revision=cfg.revision)

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        rows = batch.to_pylist()
        texts = [r[self.source.text] or "" for r in rows]
        ids = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
                             return_tensors="np").input_ids
        return {
            "pixels": np.stack([square(r[self.source.image]["bytes"], self.resolution) for r in rows]),
            "control": np.stack([square(r[self.source.control]["bytes"], self.resolution) for r in rows]),
            "input_ids": ids.astype(np.int64),
        }


def training_dataset(cfg: TrainConfig, sources: list[Source]):
    """Every pair of every source as one streaming Dataset of prepared numpy batches."""
    import ray

    datasets = []
    for source in sources:
        fs, _ = filesystem(source.path, cfg.data.storage_options)
        arrow_fs = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
        # light claims: the training workers hold most CPUs, and the readers must still run beside them
        ds = ray.data.read_parquet(source.files, filesystem=arrow_fs, columns=[source.image, source.control, source.text],
                                   ray_remote_args={"num_cpus": 0.25})
        datasets.append(ds.map_batches(Prepare, fn_constructor_kwargs={"cfg": cfg, "source": source},
                                       compute=ray.data.ActorPoolStrategy(size=1), batch_format="pyarrow",
                                       batch_size=16, num_cpus=0.25))
    return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
