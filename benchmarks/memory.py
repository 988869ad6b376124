"""Bounded memory: peak RSS of the driver and of the Ray workers at 1x and 10x the input size.

    python benchmarks/memory.py [--base 200] [--factor 10]

Each size runs as its own `python -m pipeline run` on a fresh local Ray instance (so the sizes do
not share caches) over generated small images, with tiny random-weight models (the
speed of the models is not what is measured here; the memory of the data path is). A sampler reads every process of that run (the
driver and all its descendants: raylet, Ray Data tasks, actors) every 0.2 s. It prints the peaks
and their 10x/1x ratios, measured in this one run: a streaming job keeps them near 1.0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def write_images(directory: Path, n: int, size: int = 96) -> None:
    """n distinct images: smooth random colour fields with a few shapes (cheap to make, real JPEGs)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        a, b, c = rng.random(3)
        img = np.stack([np.sin(6 * a * xx + b), np.cos(5 * b * yy + c), np.sin(4 * c * (xx + yy) + a)], 2)
        img = ((img + 1) * 127.5).astype(np.uint8)
        x0, y0 = rng.integers(0, size // 2, 2)
        img[y0 : y0 + size // 3, x0 : x0 + size // 4] = rng.integers(0, 255, 3)
        Image.fromarray(img).save(directory / f"img-{i:06d}.jpg", quality=90)


def sample_tree(root: psutil.Process, peaks: dict, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            break
        total = worker_max = 0
        for p in procs:
            try:
                rss, is_worker = p.memory_info().rss, p.cmdline()[:1] and p.cmdline()[0].startswith("ray::")
            except psutil.Error:  # gone, or a zombie, since the listing
                continue
            total += rss
            if p.pid == root.pid:
                peaks["driver"] = max(peaks["driver"], rss)
            elif is_worker:
                worker_max = max(worker_max, rss)
        peaks["worker"] = max(peaks["worker"], worker_max)
        peaks["total"] = max(peaks["total"], total)
        time.sleep(0.2)


def run_size(n: int, models: dict[str, str], work: Path) -> dict:
    inputs, out = work / f"in-{n}", work / f"out-{n}"
    write_images(inputs, n)
    job = yaml.safe_load((ROOT / "jobs/configs/demo.yaml").read_text())
    job["source"] = {"type": "images", "path": str(inputs)}
    job["image"] = {"resolution": 64}
    job["generation"].update(steps=1, variants_per_image=1, batch_size=8)
    job["generation"]["base_model"] = models["base_model"]
    for cn in job["generation"]["controlnets"]:
        cn["model"] = models[f"controlnet/{cn['condition']}"]
    for a in job["annotators"]:
        if a["name"] != "canny":
            a["model"] = models["annotators"]
    job["output"] = {"path": str(out), "overwrite": True, "rows_per_file": 200}
    (work / f"job-{n}.yaml").write_text(yaml.safe_dump(job))

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    t0 = time.perf_counter()
    command = [sys.executable, "-m", "pipeline", "run", str(work / f"job-{n}.yaml"), "--address", "local"]
    proc = subprocess.Popen(command, cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peaks, stop = {"driver": 0, "worker": 0, "total": 0}, threading.Event()
    sampler = threading.Thread(target=sample_tree, args=(psutil.Process(proc.pid), peaks, stop), daemon=True)
    sampler.start()
    stdout, _ = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode:
        sys.exit(f"run of {n} images failed (exit {proc.returncode}): {stdout}")
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    return {"n": n, "seconds": time.perf_counter() - t0, "samples": counts["samples"], **peaks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=int, default=200, help="images at 1x (default 200)")
    parser.add_argument("--factor", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        from pipeline.testing import make_tiny

        models = make_tiny(work / "models", conditions=("canny", "hed"), seed=0)
        small = run_size(args.base, models, work)
        big = run_size(args.base * args.factor, models, work)
    mib = 1 << 20
    print(f"{'images':>8} {'samples':>8} {'seconds':>8} {'driver MiB':>11} {'max worker MiB':>15} {'all processes MiB':>18}")
    for r in (small, big):
        print(f"{r['n']:>8} {r['samples']:>8} {r['seconds']:>8.1f} {r['driver'] / mib:>11.0f} {r['worker'] / mib:>15.0f} "
              f"{r['total'] / mib:>18.0f}")
    print(f"ratio {args.factor}x/1x: driver {big['driver'] / small['driver']:.2f}, max worker "
          f"{big['worker'] / small['worker']:.2f}, all processes {big['total'] / small['total']:.2f} "
          f"(input {args.factor}x, samples {big['samples'] / max(small['samples'], 1):.1f}x)")


if __name__ == "__main__":
    main()
