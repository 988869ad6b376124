"""Generation throughput through Ray on one GPU: a base model + one ControlNet, end to end, against the FLOP floor.

    python benchmarks/gpu.py                                  # full-size SD 1.5 + ControlNet, random weights
    python benchmarks/gpu.py --family sdxl --batches 4        # sdxl, sdxl_union, sd3 or flux at 1024 px
    python benchmarks/gpu.py --base DIR --controlnet DIR      # real weights (local directories or hub ids)
    python benchmarks/gpu.py --batches 8,16 --inputs 64 --size 512 --steps 20 [--window 0.6] [--compile]
    python benchmarks/gpu.py --script                         # and the hand-written loop on the same GPU
    python benchmarks/gpu.py --batches 16 --gen channels_last=false   # any other generation setting
    python benchmarks/gpu.py --tiny --device cpu --inputs 4 --size 128 --steps 2 --batches 2   # a smoke run

Each batch size is one `python -m pipeline run` (a fresh local Ray instance, canny control maps, one
variant per photo, the run's own stage figures from its manifest). Printed per run: images/s of the
generate stage (its own seconds of work, compilation excluded: what the GPU sustains) and end to end
(the run on Ray: actors starting and loading their models included, Ray's own start-up not), and the
fraction of the FLOP floor (an image's denoiser and ControlNet steps, both guidance halves where the family
guides, and its VAE decode, counted by `benchmarks/full_size.py` on the meta device: SD 1.5 at 512 px and 20
steps 46.0 TFLOP, SDXL at 1024 px 402, SD3 461, Flux 1637; a ControlNet window shorter than the steps does
less work than that) over the card's dense fp16/bf16 peak. Random full-size weights cost the same FLOPs as
real ones (their images are noise); they are written once under /tmp/gpu-bench-models (full_size.py).
The photos are square (crops of the bundled ones), so every image has the floor's pixels.

With `--script` (SD 1.5), the script a user would write for the same job runs too, as a fresh process on the same
GPU: diffusers' StableDiffusionControlNetPipeline in fp16, cv2's Canny, one photo per call, one Parquet
file. Both are timed whole from outside (process start to exit: imports, Ray, model loads, writing),
and the ratio printed is pipeline / script (below 1: the pipeline is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from full_size import FAMILIES, image_flops, write  # noqa: E402
from vs_script import photos, png  # noqa: E402

# dense tensor-core fp16 (bf16 the same) by a part of torch.cuda.get_device_name(), the first that matches
# (longer names first)
PEAK_FP16 = [("H100 PCIe", 756e12), ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12),
             ("L40", 181e12), ("L4", 121e12), ("4090", 165e12)]


def square_photos(directory: Path, n: int) -> Path:
    """n distinct square photos: `vs_script.photos`, each centre-cropped to its short side."""
    from PIL import Image

    for path in sorted(photos(directory, n).iterdir()):
        image = Image.open(path)
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image.crop((left, top, left + side, top + side)).save(path)
    return directory


def hand_written(spec: dict) -> None:
    """The obvious script on one GPU: fp16 weights, one photo per call, Canny by cv2, one Parquet file."""
    import cv2
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, UniPCMultistepScheduler
    from PIL import Image

    device = spec["device"]
    dtype = torch.float16 if device == "cuda" else torch.float32
    controlnet = ControlNetModel.from_pretrained(spec["controlnet"], torch_dtype=dtype)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(spec["base"], controlnet=controlnet, torch_dtype=dtype,
                                                             safety_checker=None, requires_safety_checker=False)
    pipe = pipe.to(device)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    rows, size = [], spec["size"]
    for n, path in enumerate(sorted(Path(spec["photos"]).iterdir())):
        image = Image.open(path).convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
        canny = Image.fromarray(cv2.cvtColor(cv2.Canny(np.asarray(image), 100, 200), cv2.COLOR_GRAY2RGB))
        picture = pipe("a photo", image=canny, negative_prompt="lowres", num_inference_steps=spec["steps"],
                       guidance_scale=7.5, control_guidance_end=spec["window"],
                       generator=torch.Generator(device).manual_seed(n)).images[0]
        rows.append({"source": str(path), "image": png(image), "control_canny": png(canny), "generated": png(picture)})
    Path(spec["output"]).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), Path(spec["output"]) / "samples.parquet")


def timed(command: list[str], env: dict) -> float:
    """Seconds from starting `command` to its exit; its stderr's end if it fails."""
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        sys.exit(f"{' '.join(command[1:4])}: failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def job(base: str, controlnet: str, photos_dir: Path, out: Path, args, batch: int) -> dict:
    gen = {"family": args.family, "base_model": base,
           "controlnets": [{"condition": "canny", "model": controlnet, "guidance_end": args.window}],
           "steps": args.steps, "guidance_scale": 7.5, "variants_per_image": 1,
           "prompt": {"prompts": ["a photo"], "negative": "lowres"}, "batch_size": batch, "compile": args.compile,
           "dtype": args.dtype, "num_gpus": 0 if args.device == "cpu" else 1}
    gen |= {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.gen)}
    return {"seed": 0, "source": {"type": "images", "path": str(photos_dir)}, "image": {"resolution": args.size, "multiple_of": 16 if args.family == "flux" else 8},
            "annotators": [{"name": "canny", "params": {"low_threshold": 100, "high_threshold": 200}}],
            "generation": gen, "output": {"path": str(out), "overwrite": True}}


def peak_flops(device: str, override: float | None) -> tuple[str, float | None]:
    if device == "cpu":
        return "cpu", override
    import torch

    name = torch.cuda.get_device_name()
    return name, override or next((v for k, v in PEAK_FP16 if k in name), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="base model (directory or hub id); default: the family's, full-size, random")
    p.add_argument("--controlnet", help="ControlNet (directory or hub id); default: the family's, full-size, random")
    p.add_argument("--family", default="sd15", choices=list(FAMILIES), help="the generator family (generation.family)")
    p.add_argument("--tiny", action="store_true", help="the test models instead (a smoke run on CPU)")
    p.add_argument("--inputs", type=int, default=64)
    p.add_argument("--size", type=int, help="image side, px (default: the family's own, 512 for sd15, else 1024)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batches", default="8,16")
    p.add_argument("--window", type=float, default=1.0, help="the ControlNet's guidance_end (0.6: skipped after)")
    p.add_argument("--compile", action="store_true", help="generation.compile (its seconds are reported)")
    p.add_argument("--dtype", default="auto",
                   help="generation.dtype (auto: float16 on a GPU, bfloat16 for sd3 and flux)")
    p.add_argument("--gen", action="append", default=[], metavar="KEY=VALUE",
                   help="another generation setting, its value read as YAML (e.g. channels_last=false)")
    p.add_argument("--script", action="store_true", help="also time the hand-written script (see above)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--peak-tflops", type=float, help="the card's dense fp16 peak, if not in the table")
    p.add_argument("--hand-written", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.hand_written:
        return hand_written(json.loads(Path(args.hand_written).read_text()))

    if args.script and args.family != "sd15":
        p.error("--script: the hand-written script is SD 1.5's")
    args.size = args.size or FAMILIES[args.family].size
    cache = Path(tempfile.gettempdir()) / "gpu-bench-models"
    if args.tiny:
        from pipeline.testing import make_tiny

        tiny = make_tiny(cache / "tiny", conditions=("canny",), annotators=(), captioners=(), families=(args.family,))
        base, controlnet = tiny[FAMILIES[args.family].tiny_key], tiny[FAMILIES[args.family].tiny_controlnet]
    elif args.base or args.controlnet:
        if not (args.base and args.controlnet):
            p.error("--base and --controlnet go together")
        base, controlnet = args.base, args.controlnet
    else:
        models = write(args.family, cache / args.family, args.device)
        base, controlnet = models["base_model"], models["controlnet"]
    device, peak = peak_flops(args.device, args.peak_tflops * 1e12 if args.peak_tflops else None)
    floor = image_flops(args.family, args.size, args.steps)  # the whole window's work, full-size models
    work = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    photos_dir = square_photos(work / "photos", args.inputs)
    print(f"# {device}; {args.family}, {args.inputs} inputs, {args.size} px, {args.steps} steps, ControlNet window "
          f"0-{args.window}; floor {floor / 1e12:.1f} TFLOP per image", flush=True)
    env = dict(os.environ, RAY_ADDRESS="", PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")
    script_s = None
    if args.script:
        spec = {"base": base, "controlnet": controlnet, "photos": str(photos_dir), "output": str(work / "out-script"),
                "size": args.size, "steps": args.steps, "window": args.window, "device": args.device}
        (work / "script.json").write_text(json.dumps(spec))
        script_s = timed([sys.executable, __file__, "--hand-written", str(work / "script.json")], env)
        print(json.dumps({"script_wall_s": round(script_s, 1), "script_img_s": round(args.inputs / script_s, 3)}),
              flush=True)
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        out = work / f"out-{batch}"
        (work / f"job-{batch}.yaml").write_text(yaml.safe_dump(job(base, controlnet, photos_dir, out, args, batch)))
        command = [sys.executable, "-m", "pipeline", "run", str(work / f"job-{batch}.yaml"), "-q", "--address", "local"]
        wall = timed(command, env)
        manifest = json.loads((out / "manifest.json").read_text())
        gen, samples = manifest["stages"]["generate"], manifest["counts"]["samples"]
        compile_s = manifest["stages"].get("generate:compile", {}).get("seconds", 0.0)
        stage_rate = gen["rows_out"] / max(gen["seconds"] - compile_s, 1e-9)
        row = {"batch": batch, "samples": samples, "generate_img_s": round(stage_rate, 3),
               "end_to_end_img_s": manifest["timings"]["samples_per_s"], "compile_s": round(compile_s, 1),
               "floor_fraction": round(stage_rate * floor / peak, 3) if peak else None, "wall_s": round(wall, 1),
               "vs_script": round(wall / script_s, 2) if script_s else None}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(f"\n{'batch':>5}  {'generate img/s':>14}  {'end to end img/s':>16}  {'of FLOP floor':>13}  "
          f"{'wall s':>7}  {'vs script':>9}")
    for r in rows:
        fraction = f"{100 * r['floor_fraction']:.1f}%" if r["floor_fraction"] is not None else "n/a"
        versus = f"{r['vs_script']:.2f}x" if r["vs_script"] else "n/a"
        print(f"{r['batch']:>5}  {r['generate_img_s']:>14.3f}  {r['end_to_end_img_s']:>16.3f}  {fraction:>13}  "
              f"{r['wall_s']:>7.1f}  {versus:>9}")
    if script_s:
        print(f"script: {script_s:.1f} s for {args.inputs} images ({args.inputs / script_s:.3f} img/s)")


if __name__ == "__main__":
    main()
