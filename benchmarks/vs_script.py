"""The pipeline against the script a user would write by hand for the same job, on this machine.

    python benchmarks/vs_script.py [--sizes 8,40,200] [--pairs 2] [--sets tiny,mid] [--mid-inputs 24] [--no-memory]

The job is the demo's (canny + HED, two ControlNets, UniPC, 4 steps, guidance 7.5, 2 variants per
photo with their own prompts, a negative prompt), without the captioner, and with the HED ControlNet
guiding the first 60% of the steps (`guidance_end: 0.6`). `hand_written` below is the
obvious sequential script: PIL, cv2, controlnet-aux's HEDdetector, diffusers'
StableDiffusionControlNetPipeline, one Parquet file with the same columns of images. Both run as
fresh processes (`python -m pipeline run` on a local Ray instance it starts itself), interleaved,
`--pairs` times per size; wall time and CPU time (every process of the tree, sampled) are measured
from outside, and the ratios printed are pipeline / script (below 1: the pipeline is faster or
lighter). Each run's line also gives the CPU seconds of each kind of process of its tree (`cpu_s_by_process`:
the command itself, Ray's workers by the names Ray gives them, such as `annotate:canny->annotate:hed` for a
fused actor stage, and Ray's own processes), to say where the time went. Peak memory (the sum of the
tree's proportional set sizes) is measured in one more pair of its own: reading a process's PSS makes
the kernel walk its page tables (about 5 ms for a torch process), and doing that every second for each of
the pipeline's ~15 processes took ~1 s of CPU from a 17-s run on two cores, against one process of the
script's: it slowed the side it measured most.

With `--layout N` (default 8) it also runs the tiny job on N photos at 128 and at 512 px in both
`output.layout`s (flat, normalized) and prints the Parquet bytes of each.

Two model sets: `tiny` (the test models, 128 px) and `mid` (written here: the SD 1.5 structure,
narrower, ~1-3 s per generated image on a CPU core, 256 px), each loaded through the same
`from_pretrained` paths as real weights.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a watercolor painting", "a photo at night"]
NEGATIVE = "lowres, blurry"
SCALES, ENDS = [1.0, 0.5], [1.0, 0.6]  # the HED ControlNet guides the first 60% of the steps
STEPS, GUIDANCE, SEED = 4, 7.5, 0


# -- the hand-written script ---------------------------------------------------------------------

def png(image) -> bytes:
    """A PIL image as PNG bytes, as the hand-written scripts store their images."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def hand_written(job: dict) -> None:
    """What a user writes without the pipeline: one process, one image after another."""
    import cv2
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from controlnet_aux import HEDdetector
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, UniPCMultistepScheduler
    from PIL import Image

    controlnets = [ControlNetModel.from_pretrained(job["controlnet/canny"]),
                   ControlNetModel.from_pretrained(job["controlnet/hed"])]
    pipe = StableDiffusionControlNetPipeline.from_pretrained(job["base_model"], controlnet=controlnets,
                                                             safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    hed = HEDdetector.from_pretrained(job["annotators"], filename="ControlNetHED.pth")
    size = job["resolution"]

    rows = []
    for n, path in enumerate(sorted(Path(job["photos"]).iterdir())):
        image = Image.open(path).convert("RGB")
        scale = size / min(image.size)
        image = image.resize((round(image.width * scale / 8) * 8, round(image.height * scale / 8) * 8),
                             Image.Resampling.LANCZOS)
        canny = Image.fromarray(cv2.cvtColor(cv2.Canny(np.asarray(image), 100, 200), cv2.COLOR_GRAY2RGB))
        soft = hed(image, detect_resolution=min(image.size), image_resolution=min(image.size)).resize(image.size)
        generated = pipe(PROMPTS, image=[canny, soft], negative_prompt=[NEGATIVE] * len(PROMPTS),
                         num_inference_steps=STEPS, guidance_scale=GUIDANCE, controlnet_conditioning_scale=SCALES,
                         control_guidance_end=ENDS, height=image.height, width=image.width,
                         generator=[torch.Generator().manual_seed(SEED + n * len(PROMPTS) + v)
                                    for v in range(len(PROMPTS))]).images
        for v, picture in enumerate(generated):
            rows.append({"source": str(path), "variant": v, "prompt": PROMPTS[v], "image": png(image),
                         "control_canny": png(canny), "control_hed": png(soft), "generated": png(picture)})
    pq.write_table(pa.Table.from_pylist(rows), Path(job["output"]) / "samples.parquet")


# -- the same job through the pipeline -----------------------------------------------------------

def pipeline_config(job: dict) -> dict:
    return {
        "seed": SEED,
        "source": {"type": "images", "path": job["photos"]},
        "image": {"resolution": job["resolution"]},
        "annotators": [{"name": "canny", "params": {"low_threshold": 100, "high_threshold": 200}},
                       {"name": "hed", "model": job["annotators"]}],
        "generation": {
            "base_model": job["base_model"],
            "controlnets": [{"condition": "canny", "model": job["controlnet/canny"], "conditioning_scale": SCALES[0]},
                            {"condition": "hed", "model": job["controlnet/hed"], "conditioning_scale": SCALES[1],
                             "guidance_end": ENDS[1]}],
            "scheduler": "unipc", "steps": STEPS, "guidance_scale": GUIDANCE, "variants_per_image": len(PROMPTS),
            "prompt": {"prompts": PROMPTS, "template": "{prompt}", "negative": NEGATIVE},
        },
        "output": {"path": job["output"], "overwrite": True},
    }


# -- inputs and models ---------------------------------------------------------------------------

def photos(directory: Path, n: int) -> Path:
    """n distinct photos (crops and flips of the bundled ones: the pipeline drops duplicate content)."""
    from PIL import Image, ImageOps

    directory.mkdir(parents=True, exist_ok=True)
    bases = [Image.open(p).convert("RGB") for p in sorted((ROOT / "jobs" / "sample_photos").iterdir())]
    for i in range(n):
        base = bases[i % len(bases)]
        k = i // len(bases)
        w, h = base.size
        crop = base.crop((k % 7 * w // 40, k % 5 * h // 40, w - k % 3 * w // 40, h - k % 4 * h // 40))
        (ImageOps.mirror(crop) if k % 2 else crop).save(directory / f"photo-{i:04d}.jpg", quality=90)
    return directory


def write_mid(directory: Path, tiny: dict) -> dict:
    """The SD 1.5 structure (four down blocks, three with cross-attention, two layers each), narrower."""
    import shutil

    import torch
    from diffusers import AutoencoderKL, ControlNetModel, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if (directory / "done.json").is_file():
        return json.loads((directory / "done.json").read_text())
    width = 128
    encoder = {"in_channels": 4, "block_out_channels": (32, 64, 128, 128), "layers_per_block": 2,
               "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), "cross_attention_dim": width,
               "attention_head_dim": 4, "norm_num_groups": 32}
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(tiny["base_model"], subfolder="tokenizer")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=1000, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(sample_size=32, out_channels=4, up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                                **encoder)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64, 64),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=32, sample_size=256)
    scheduler_dir = Path(tiny["base_model"]) / "scheduler"
    from diffusers import DDIMScheduler

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler.from_pretrained(scheduler_dir), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(directory / "stable-diffusion", safe_serialization=True)
    models = {"base_model": str(directory / "stable-diffusion"), "annotators": tiny["annotators"]}
    for condition in ("canny", "hed"):
        net = ControlNetModel(conditioning_channels=3, conditioning_embedding_out_channels=(16, 32, 96, 128), **encoder)
        for conv in [net.controlnet_cond_embedding.conv_out, *net.controlnet_down_blocks, net.controlnet_mid_block]:
            torch.nn.init.normal_(conv.weight, std=0.02)  # not zero, so the control image matters
        net.save_pretrained(directory / f"controlnet-{condition}", safe_serialization=True)
        models[f"controlnet/{condition}"] = str(directory / f"controlnet-{condition}")
    shutil.rmtree(directory / "unused", ignore_errors=True)
    (directory / "done.json").write_text(json.dumps(models))
    return models


# -- measuring -----------------------------------------------------------------------------------

def role(proc, root) -> str:
    """What a process of the tree is, for the CPU breakdown: the command itself, a Ray actor or task by the
    name Ray gives its process (`ray::MapWorker(MapBatches(annotate:canny)->...)`), or one of Ray's own. A
    task worker runs tasks of several kinds one after another (decode, then the sink's writes): it is named for
    the first."""
    if proc.pid == root.pid:
        return "command"
    line = " ".join(proc.cmdline())
    if line.startswith("ray::"):
        name, dot, method = line.split()[0].removeprefix("ray::").rpartition(".")
        name = name if dot and method.isidentifier() else method  # an actor without the method it runs now
        return name.replace("MapWorker(", "").replace("MapBatches(", "").replace(")", "")
    if "default_worker.py" in line:  # a Ray worker not named yet
        return "IDLE"
    words = [Path(w).name for w in line.split()[:3]]
    ray = [f"ray {w}" for w in words if w in ("raylet", "gcs_server") or w.endswith(".py")]  # Ray's own
    return (ray or words or ["?"])[0]


def measure(command: list[str], env: dict, memory: bool = False) -> dict:
    """Wall time and CPU time of a command and every process it starts, and the CPU time of each kind of
    process (`role`) that used a second or more; with `memory`, their peak proportional memory instead (costly
    to read: see the module's docstring)."""
    import psutil

    start = time.perf_counter()
    proc = psutil.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    cpu: dict[tuple, float] = {}
    roles: dict[tuple, str] = {}
    peak, tick = 0, 0
    while proc.poll() is None:  # CPU times 4 times a second; memory (reading smaps is costly) once a second
        tick += 1
        pss, read_memory = 0, memory and tick % 4 == 1
        try:
            tree = [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for p in tree:
            try:
                t, key = p.cpu_times(), (p.pid, p.create_time())
                cpu[key] = t.user + t.system
                if roles.get(key, "IDLE") == "IDLE":  # a Ray worker is named for its actor or task once it has one
                    roles[key] = role(p, proc)
                if read_memory:
                    pss += p.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        peak = max(peak, pss)
        time.sleep(0.25)
    wall = time.perf_counter() - start
    stderr = proc.stderr.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    if memory:
        return {"peak_mib": round(peak / 2**20)}
    by_role: dict[str, float] = defaultdict(float)
    for key, seconds in cpu.items():  # a process that ended between its CPU times and its name: "?"
        by_role[roles.get(key, "?")] += seconds
    top = dict(sorted(((k, round(v, 1)) for k, v in by_role.items() if v >= 1.0), key=lambda kv: -kv[1]))
    return {"wall_s": round(wall, 2), "cpu_s": round(sum(cpu.values()), 2), "cpu_s_by_process": top}


def parquet_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*/*.parquet"))


def layout_bytes(job: dict, work: Path) -> dict:
    """Bytes of the pipeline's Parquet output for `job` in the flat and in the normalized layout."""
    import yaml

    sizes = {}
    for layout in ("flat", "normalized"):
        config = pipeline_config({**job, "output": str(work / f"out-{layout}")})
        config["output"]["layout"] = layout
        (work / f"{layout}.yaml").write_text(yaml.safe_dump(config))
        command = [sys.executable, "-m", "pipeline", "run", str(work / f"{layout}.yaml"), "-q", "--address", "local"]
        measure(command, run_env())
        sizes[f"{layout}_bytes"] = parquet_bytes(work / f"out-{layout}")
    return sizes | {"saved": round(1 - sizes["normalized_bytes"] / sizes["flat_bytes"], 3)}


def run_env() -> dict:  # noqa: N802
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"HF_HUB_OFFLINE": "1"}


def run_pair(job: dict, order: tuple[str, str], work: Path, memory: bool = False) -> dict:
    env = run_env()
    results = {}
    for kind in order:
        out = work / f"out-{kind}"
        out.mkdir(parents=True, exist_ok=True)
        spec = {**job, "output": str(out)}
        if kind == "script":
            (work / "script.json").write_text(json.dumps(spec))
            command = [sys.executable, __file__, "--hand-written", str(work / "script.json")]
        else:
            import yaml

            (work / "job.yaml").write_text(yaml.safe_dump(pipeline_config(spec)))
            command = [sys.executable, "-m", "pipeline", "run", str(work / "job.yaml"), "-q", "--address", "local"]
        results[kind] = measure(command, env, memory)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="8,40,200", help="numbers of photos for the tiny models")
    parser.add_argument("--mid-inputs", type=int, default=24, help="photos for the mid-size models")
    parser.add_argument("--sets", default="tiny,mid")
    parser.add_argument("--pairs", type=int, default=2, help="interleaved (script, pipeline) runs per size")
    parser.add_argument("--no-memory", action="store_true", help="skip the pair that measures peak memory")
    parser.add_argument("--layout", type=int, default=8, help="inputs of the output.layout comparison (flat against "
                                                             "normalized bytes, tiny models at 128 and 512 px; 0: none)")
    parser.add_argument("--hand-written", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hand_written:
        return hand_written(json.loads(Path(args.hand_written).read_text()))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    import psutil

    from pipeline.testing import make_tiny

    print(f"# {psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB; ratios are pipeline / script")
    cache = Path(tempfile.gettempdir()) / "vs-script-models"
    tiny = make_tiny(cache / "tiny", conditions=("canny", "hed"), seed=0, annotators=("hed",))
    plans = []
    if "tiny" in args.sets.split(","):
        plans += [("tiny", tiny, 128, int(n)) for n in args.sizes.split(",")]
    if "mid" in args.sets.split(","):
        plans.append(("mid", write_mid(cache / "mid", tiny), 256, args.mid_inputs))
    summary, layouts = [], []
    for name, models, resolution, n in plans:
        with tempfile.TemporaryDirectory() as tmp:
            job = {**models, "resolution": resolution, "photos": str(photos(Path(tmp) / "photos", n))}
            runs = []
            for i in range(args.pairs):
                order = ("script", "pipeline") if i % 2 == 0 else ("pipeline", "script")
                runs.append(run_pair(job, order, Path(tmp)))
                print(json.dumps({"models": name, "inputs": n, **runs[-1]}), flush=True)
            memory = None if args.no_memory else run_pair(job, ("script", "pipeline"), Path(tmp), memory=True)
            if memory:
                print(json.dumps({"models": name, "inputs": n, **memory}), flush=True)

        ratio = {k: round(statistics.median(r["pipeline"][k] / r["script"][k] for r in runs), 2)
                 for k in ("wall_s", "cpu_s")}
        ratio["peak_mib"] = round(memory["pipeline"]["peak_mib"] / memory["script"]["peak_mib"], 2) if memory else None
        median = lambda kind, k: statistics.median(r[kind][k] for r in runs)  # noqa: E731
        summary.append((name, n, median("script", "wall_s"), median("pipeline", "wall_s"), ratio))
    for resolution in (128, 512) if args.layout else ():  # the tiny models' job, its photos at two sizes
        with tempfile.TemporaryDirectory() as tmp:
            job = {**tiny, "resolution": resolution, "photos": str(photos(Path(tmp) / "photos", args.layout))}
            sizes = layout_bytes(job, Path(tmp))
            print(json.dumps({"layout": resolution, "inputs": args.layout, **sizes}), flush=True)
            layouts.append((resolution, args.layout, sizes))
    print(f"\n{'models':8}{'inputs':>7}{'script s':>10}{'pipeline s':>12}{'wall':>7}{'cpu':>7}{'memory':>8}")
    for name, n, script, pipeline, ratio in summary:
        print(f"{name:8}{n:>7}{script:>10.1f}{pipeline:>12.1f}{ratio['wall_s']:>6.2f}x{ratio['cpu_s']:>6.2f}x"
              + (f"{ratio['peak_mib']:>7.2f}x" if ratio["peak_mib"] else f"{'-':>8}"))
    for resolution, n, sizes in layouts:
        print(f"output.layout normalized, {n} inputs at {resolution} px: {sizes['normalized_bytes']:,} bytes of Parquet "
              f"against {sizes['flat_bytes']:,} flat ({sizes['saved']:.0%} saved)")


if __name__ == "__main__":
    main()
