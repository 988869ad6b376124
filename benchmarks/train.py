"""Training throughput: samples/s per worker with 1 and 2 Ray Train workers, and the ratio.

    python benchmarks/train.py [--steps 30] [--resolution 64] [--models DIR]

Tiny random-weight models by default (written to a temporary directory); `--models` takes a
directory from `python -m pipeline models make-tiny` or a real base model's directory. Each setting
runs as a fresh training run on the local Ray instance this script starts; each figure is over the
whole run (model loading and Ray Train start-up included), so use enough --steps for the rate to
settle.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw


def pairs(root: Path, n: int, size: int) -> Path:
    from pipeline.export import TRAIN_SCHEMA

    (root / "train").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(n):
        x, y, r = (int(v) for v in rng.integers(size // 4, 3 * size // 4, 3))
        r = max(4, r // 3)
        outline, filled = Image.new("RGB", (size, size)), Image.new("RGB", (size, size), "white")
        ImageDraw.Draw(outline).ellipse((x - r, y - r, x + r, y + r), outline="white", width=2)
        ImageDraw.Draw(filled).ellipse((x - r, y - r, x + r, y + r), fill="red")
        encode = lambda im: (lambda b: (im.save(b, format="PNG"), b.getvalue())[1])(io.BytesIO())  # noqa: E731
        rows.append({"image": {"bytes": encode(filled), "path": None},
                     "conditioning_image": {"bytes": encode(outline), "path": None}, "text": "a red circle"})
    pq.write_table(pa.Table.from_pylist(rows, schema=TRAIN_SCHEMA), root / "train" / "part-00000.parquet")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--models", help="a make-tiny directory or a base model directory")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray

    from pipeline.testing import make_tiny
    from pipeline.train import load_train_config, run_training

    ray.init(include_dashboard=False, log_to_driver=False)
    cpus = ray.cluster_resources().get("CPU", 2)
    with tempfile.TemporaryDirectory() as tmp:
        base = args.models or make_tiny(Path(tmp) / "tiny")["base_model"]
        base = str(Path(base) / "stable-diffusion") if (Path(base) / "stable-diffusion").is_dir() else base
        data = pairs(Path(tmp) / "pairs", 64, args.resolution)
        rates = {}
        for workers in (1, 2):
            half = max(1, args.steps // 2)
            cfg = load_train_config(data={
                "base_model": base, "data": {"paths": [str(data)]}, "resolution": args.resolution,
                "batch_size": args.batch_size, "steps": args.steps, "checkpoint_every": half, "num_workers": workers,
                "cpus_per_worker": (cpus - 1) / workers, "output": {"path": f"{tmp}/out-{workers}"}})
            start = time.perf_counter()
            run_training(cfg, echo=lambda _: None)
            seconds = time.perf_counter() - start
            rates[workers] = args.steps * args.batch_size * workers / seconds
            print(json.dumps({"workers": workers, "seconds": round(seconds, 2),
                              "samples_per_s": round(rates[workers], 3),
                              "samples_per_s_per_worker": round(rates[workers] / workers, 3)}))
        print(f"2 workers vs 1: {rates[2] / rates[1]:.2f}x samples/s on {cpus:g} CPUs")


if __name__ == "__main__":
    main()
