"""Shared fixtures: offline hub, one local Ray instance per session, tiny models, real photographs."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may be downloaded in tests
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "camera", "rocket")  # camera is grayscale, astronaut a person


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    from pipeline.testing import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny-models"), conditions=("canny", "hed"), seed=0, annotators=("hed",))


@pytest.fixture(scope="session")
def annotator_weights(tmp_path_factory):
    """annotator name -> directory with its tiny random-weight checkpoints, written on first use."""
    from pipeline.testing import write_annotators

    root = tmp_path_factory.mktemp("annotator-weights")
    written: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in written:
            written.update(write_annotators(root, [name], seed=0, skip_existing=True))
        return written[name]

    return get


def write_photos(directory: Path, names=PHOTOS, fmt: str = "jpg") -> list[Path]:
    """Real photographs from scikit-image, written as image files."""
    from skimage import data

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        path = directory / f"{name}.{fmt}"
        Image.fromarray(np.asarray(getattr(data, name)())).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def photos_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("photos")
    write_photos(directory)
    return directory


def job_dict(source: str, output: str, tiny: dict[str, str], **generation) -> dict:
    """A complete job config as data: canny + hed, two ControlNets, tiny models, 64 px."""
    return {
        "seed": 7,
        "source": {"type": "images", "path": source},
        "image": {"resolution": 64},
        "annotators": [
            {"name": "canny", "params": {"low_threshold": 50, "high_threshold": 150}},
            {"name": "hed", "model": tiny["annotators"]},
        ],
        "generation": {
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
        },
        "output": {"path": output},
    }
