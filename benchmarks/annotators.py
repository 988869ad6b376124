"""Annotator throughput: images/s per annotator, one batched call vs one image per call.

    python benchmarks/annotators.py                       # tiny random weights (written to a temp dir), CPU
    python benchmarks/annotators.py --models DIR          # real weights: DIR/<repo id>/ as `models fetch` writes
    python benchmarks/annotators.py --only hed,dwpose --size 512 --batch 8 --device cuda

Not a test: it prints a table (and the batched/one-by-one ratio). With tiny weights the numbers show
the cost of pre/post-processing and of small networks, not of the real ones.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.annotators import ANNOTATORS  # noqa: E402
from pipeline.models import resolve_model  # noqa: E402


def photos(n: int, size: int) -> list[np.ndarray]:
    from skimage import data

    names = ["astronaut", "coffee", "chelsea", "rocket"]
    return [np.asarray(Image.fromarray(getattr(data, names[i % len(names)])()).convert("RGB").resize((size, size)))
            for i in range(n)]


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="directory with real weights laid out as DIR/<repo id>/ (default: tiny random weights)")
    parser.add_argument("--only", help="comma-separated annotators (default: all)")
    parser.add_argument("--size", type=int, default=128, help="square image side (default 128)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, and cpu)")
    parser.add_argument("--heavy", action="store_true", help="with tiny weights, include the heavy checkpoints too")
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    import torch

    devices = [args.device] if args.device else (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    names = args.only.split(",") if args.only else list(ANNOTATORS)
    weights: dict[str, str] = {}
    if args.models:
        for n in names:
            if ANNOTATORS[n].default_model:
                weights[n] = str(Path(args.models) / ANNOTATORS[n].default_model)
    else:
        from pipeline.testing import HEAVY, write_annotators

        neural = [n for n in names if ANNOTATORS[n].default_model and (args.heavy or n not in HEAVY)]
        names = [n for n in names if not ANNOTATORS[n].default_model or n in neural]
        weights = write_annotators(tempfile.mkdtemp(prefix="annotator-bench-"), neural) if neural else {}

    images = photos(args.batch, args.size)
    print(f"{args.batch} images of {args.size}x{args.size}, {'real' if args.models else 'tiny random'} weights, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'annotator':<18} {'device':<6} {'batched img/s':>14} {'one-by-one img/s':>17} {'ratio':>6}")
    for device in devices:
        for name in names:
            cls = ANNOTATORS[name]
            if cls.default_model is None and device != devices[0]:
                continue  # weight-free annotators run on the CPU only
            model = resolve_model(weights[name], None, cls.files[0]) if cls.default_model else None
            annotator = cls({}, model=model, device=device)
            repeats = args.repeats if cls.default_model else max(args.repeats, 50)  # weight-free: fast, noisy
            batched = timed(lambda: annotator.annotate(images), repeats)
            single = timed(lambda: [annotator.annotate([i]) for i in images], repeats)
            print(f"{name:<18} {device if cls.default_model else 'cpu':<6} {len(images) / batched:>14.1f} "
                  f"{len(images) / single:>17.1f} {single / batched:>6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
