"""Per-row isolation in the annotator stage: one failing row in a batch becomes an error row."""

import json

import numpy as np
import pyarrow as pa
from skimage import data

from pipeline.annotators.stage import Annotate
from pipeline.config import AnnotatorConfig
from pipeline.io.images import array_to_png, png_to_array
from pipeline.models import resolve_model


def row(name: str, array: np.ndarray) -> dict:
    return {"source_uri": name, "image": array_to_png(array), "width": array.shape[1], "height": array.shape[0]}


def test_one_failing_row_in_an_annotator_batch_becomes_an_error_row(tiny_models):
    cfg = AnnotatorConfig(name="hed", model=tiny_models["annotators"])
    stage = Annotate(cfg, resolve_model(cfg.model, None, "ControlNetHED.pth"))
    a, b = data.astronaut()[::8, ::8], data.chelsea()[::5, ::5]
    bad = row("lies-about-its-size", a) | {"width": 7}  # the control map cannot match the row's size
    broken = row("not-a-png", a) | {"image": b"\x89PNG but cut"}
    out = stage(pa.Table.from_pylist([row("a", a), bad, row("b", b), broken])).to_pylist()

    assert [r["source_uri"] for r in out] == ["a", "lies-about-its-size", "b", "not-a-png"]
    good = [r for r in out if r.get("error_stage") is None]
    assert [r["source_uri"] for r in good] == ["a", "b"]
    for r, image in zip(good, (a, b)):
        assert png_to_array(r["control_hed"]).shape == image.shape
        assert json.loads(r["annotator_hed"])["name"] == "hed"
    # the good rows are exactly what the annotator gives when they are alone in their batch
    alone = stage(pa.Table.from_pylist([row("a", a)])).to_pylist()[0]
    assert np.abs(png_to_array(alone["control_hed"]).astype(int) - png_to_array(good[0]["control_hed"]).astype(int)).max() <= 1
    errors = {r["source_uri"]: r for r in out if r.get("error_stage")}
    assert errors["lies-about-its-size"]["error_stage"] == "annotate:hed"
    assert "returned (64, 64, 3) for a 7x64 image" in errors["lies-about-its-size"]["error_message"]
    assert errors["not-a-png"]["error_stage"] == "annotate:hed"


def test_dedupe_names_the_first_copy_across_blocks_and_passes_blocks_of_failed_inputs_on(ray_session):
    from pipeline.console import start_progress
    from pipeline.io.resume import FirstCopy

    dedupe = FirstCopy(start_progress())  # the run's registry: every decode task asks it
    never_read = pa.Table.from_pylist([{"source_uri": "gone.jpg", "error_stage": "decode",
                                        "error_type": "FileNotFoundError", "error_message": "no such file"}])
    assert dedupe(never_read).equals(never_read)  # failed before hashing: no source_sha256 column at all
    sha = "ab" * 32
    first = pa.Table.from_pylist([
        {"source_uri": "a.jpg", "source_sha256": sha, "error_stage": None, "error_type": None},
        {"source_uri": "b.jpg", "source_sha256": sha, "error_stage": None, "error_type": None},
        {"source_uri": "c.jpg", "source_sha256": "cd" * 32, "error_stage": "decode", "error_type": "OSError"}])
    later = pa.Table.from_pylist([{"source_uri": "d.jpg", "source_sha256": sha}, {"source_uri": "e.jpg",
                                                                                 "source_sha256": "cd" * 32}])
    out = dedupe(first).to_pylist() + dedupe(later).to_pylist()
    assert [(r["source_uri"], r["error_type"]) for r in out] == [
        ("a.jpg", None), ("b.jpg", "DuplicateContent"), ("c.jpg", "OSError"), ("d.jpg", "DuplicateContent"),
        ("e.jpg", None)]  # a failed input does not claim its content: a good copy of it is the first
    assert all("same content as a.jpg" in r["error_message"] for r in out if r["error_type"] == "DuplicateContent")
