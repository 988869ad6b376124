"""Shared fixtures: offline hub, one local Ray instance per session, tiny models, real photographs."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may be downloaded in tests
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

from pathlib import Path

import pytest

# the plain helpers live in tests/helpers.py; PHOTOS and job_dict stay importable from here as well
from tests.helpers import PHOTOS, job_dict, write_photos  # noqa: F401


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_address(ray_session) -> str:
    """The session's Ray instance, for a CLI to join (`--address`)."""
    return ray_session.get_runtime_context().gcs_address


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


@pytest.fixture(scope="session")
def photos_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("photos")
    write_photos(directory)
    return directory
