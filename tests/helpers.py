"""Plain helpers the test files share: the real photographs, a complete job config, a folder of
Parquet files read as one table, and the `python -m pipeline` CLI in a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ("astronaut", "chelsea", "coffee", "camera", "rocket")  # camera is grayscale, astronaut a person


def _skimage_photo(name: str) -> np.ndarray:
    from skimage import data

    return np.asarray(getattr(data, name)())


def photo(name: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """A real photograph from scikit-image as RGB uint8 (grayscale ones converted), resized to
    size=(width, height) if given."""
    image = Image.fromarray(_skimage_photo(name)).convert("RGB")
    if size is not None:
        image = image.resize(size)
    return np.asarray(image)


def write_photos(directory: Path, names=PHOTOS, fmt: str = "jpg") -> list[Path]:
    """Real photographs from scikit-image, written as image files in their own mode (camera stays
    grayscale)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        path = directory / f"{name}.{fmt}"
        Image.fromarray(_skimage_photo(name)).save(path)
        paths.append(path)
    return paths


def canny_job(source: str, output: str) -> dict:
    """`job_dict`'s job without generation and with canny alone: no model loads, for tests of what reaches the
    writer (sources, decoding, names), which generation does not change."""
    return {"seed": 7, "source": {"type": "images", "path": source}, "image": {"resolution": 64},
            "annotators": [{"name": "canny", "params": {"low_threshold": 50, "high_threshold": 150}}],
            "output": {"path": output}}


def job_dict(source: str, output: str, tiny: dict[str, str], **generation) -> dict:
    """A complete job config as data: canny + hed, two ControlNets, tiny models, 64 px."""
    data = canny_job(source, output)
    data["annotators"].append({"name": "hed", "model": tiny["annotators"]})
    data["generation"] = {
        "base_model": tiny["base_model"],
        "controlnets": [
            {"condition": "canny", "model": tiny["controlnet/canny"]},
            {"condition": "hed", "model": tiny["controlnet/hed"], "conditioning_scale": 0.5, "guidance_end": 0.8},
        ],
        "steps": 3,
        "variants_per_image": 2,
        "prompt": {"prompts": ["a painting", "a photo at night"], "template": "{prompt} of {caption}",
                   "negative": "blurry"},
        "batch_size": 3,
        **generation,
    }
    return data


def read_parquet_dir(directory, columns: list[str] | None = None, schema_if_empty: pa.Schema | None = None,
                     fs=None) -> pa.Table:
    """Every *.parquet file directly in `directory`, in name order, as one table (only `columns` if
    given). `fs`: an fsspec filesystem holding the directory (a local path otherwise). A directory
    without Parquet files gives the empty table of `schema_if_empty`; without one it is an error."""
    if fs is None:
        files = sorted(Path(directory).glob("*.parquet"))
        tables = [pq.read_table(f, columns=columns) for f in files]
    else:
        files = sorted(fs.glob(f"{str(directory).rstrip('/')}/*.parquet"))
        tables = [pq.read_table(f, columns=columns, filesystem=fs) for f in files]
    if tables:
        return pa.concat_tables(tables)
    if schema_if_empty is None:
        raise FileNotFoundError(f"no Parquet files in {directory}")
    empty = schema_if_empty.empty_table()
    return empty.select(columns) if columns is not None else empty


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment, offline (nothing downloaded), with `extra` on top."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", **(extra or {})}


def cli_command(*args) -> list[str]:
    """The command line of `python -m pipeline ARGS` with this interpreter."""
    return [sys.executable, "-m", "pipeline", *map(str, args)]


def lacking_weight(model: str | Path, copy: Path, key: str = "controlnet_mid_block.weight") -> Path:
    """A copy of a diffusers model folder whose checkpoint lacks one weight (a whole, readable file)."""
    import shutil

    import safetensors.torch

    shutil.copytree(model, copy)
    weights = copy / "diffusion_pytorch_model.safetensors"
    state = safetensors.torch.load_file(weights)
    del state[key]
    safetensors.torch.save_file(state, weights)
    return copy


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (free once the probing socket closes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_tree(proc: subprocess.Popen, timeout: float = 60) -> list:
    """SIGKILL a process and every process under it (a CLI and the local Ray instance it started go down
    together), reap it, and wait up to `timeout` s for the rest; returns those still running (zombies aside)."""
    import psutil

    root = psutil.Process(proc.pid)
    family = [root, *root.children(recursive=True)]
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    _, alive = psutil.wait_procs(family, timeout=timeout)
    survivors = []
    for p in alive:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                survivors.append(p)
        except psutil.NoSuchProcess:
            pass
    return survivors


def cli(*args, cwd=ROOT, env: dict[str, str] | None = None, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """Run `python -m pipeline ARGS` in a subprocess, offline, and capture its output as text (a
    nonzero exit is returned, not raised). `env` adds to (or overrides) the offline environment;
    other keywords go to subprocess.run."""
    return subprocess.run(cli_command(*args), capture_output=True, text=True, cwd=cwd, env=cli_env(env),
                          timeout=timeout, check=False, **kw)
