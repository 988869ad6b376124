"""Annotator throughput: images/s per annotator, one batched call vs one image per call.

    python benchmarks/annotators.py                       # tiny random weights (written to a temp dir), CPU
    python benchmarks/annotators.py --models DIR          # real weights: DIR/<repo id>/ as `models fetch` writes
    python benchmarks/annotators.py --only hed,dwpose --sizes 512,768x512 --batch 8 --device cuda

Not a test: it prints a table (and the batched/one-by-one ratio). With tiny weights the numbers show
the cost of pre/post-processing and of small networks, not of the real ones. The images come in several
sizes (`--sizes`, taken in turn), as photos do: an annotator can be fast on one shape and slow on its
neighbours (HED's convolutions once were, at 128x136 to 128x240 but not at 128x128 or 128x192).
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


def photos(n: int, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    """n photos, the i-th at sizes[i % len(sizes)] (width, height)."""
    from skimage import data

    names = ["astronaut", "coffee", "chelsea", "rocket"]
    return [np.asarray(Image.fromarray(getattr(data, names[i % len(names)])()).convert("RGB").resize(sizes[i % len(sizes)]))
            for i in range(n)]


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'128,168x128' -> [(128, 128), (168, 128)]: a side (square) or WIDTHxHEIGHT, comma-separated."""
    sizes = []
    for item in text.split(","):
        width, _, height = item.strip().partition("x")
        sizes.append((int(width), int(height or width)))
    return sizes


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
    parser.add_argument("--sizes", type=parse_sizes, default="128,168x128,216x128,128x176",
                        help="image sizes taken in turn: a side (square) or WIDTHxHEIGHT, comma-separated")
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

    images = photos(args.batch, args.sizes)
    print(f"{args.batch} images of {', '.join(f'{w}x{h}' for w, h in args.sizes[:args.batch])}, {'real' if args.models else 'tiny random'} weights, "
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
