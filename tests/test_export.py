"""Annotate-only jobs and `export --format controlnet-train` on local Ray."""

import io
import json
import shutil

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import load_config
from pipeline.export import ExportError, export_controlnet_train
from pipeline.job import OutputExists, run
from pipeline.schema import samples_schema
from pipeline.ids import sample_identity
from tests.helpers import cli, job_dict, read_parquet_dir


def pixels(image: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image["bytes"])))


@pytest.fixture(scope="module")
def annotate_only(ray_session, tiny_models, photos_dir, tmp_path_factory):
    """A job with no generation section over a Parquet shard with captions (one broken image)."""
    tmp = tmp_path_factory.mktemp("annotate-only")
    photos = sorted(photos_dir.glob("*.jpg"))
    pq.write_table(pa.table({"jpg": [p.read_bytes() for p in photos] + [b"garbage"],
                             "text": [f"a photo of {p.stem}" for p in photos] + ["broken"]}), tmp / "shard.parquet")
    data = job_dict(str(tmp / "shard.parquet"), str(tmp / "out"), tiny_models)
    data["source"] = {"type": "parquet", "path": str(tmp / "shard.parquet"), "image_column": "jpg", "caption_column": "text"}
    del data["generation"]
    cfg = load_config(data=data)
    return cfg, run(cfg), tmp / "out", photos


def test_annotate_only_job_writes_images_controls_and_captions(annotate_only):
    cfg, result, out, photos = annotate_only
    assert (result.inputs, result.samples, result.errors) == (len(photos) + 1, len(photos), 1)
    table = read_parquet_dir(out / "samples")
    for f in (out / "samples").glob("*.parquet"):
        got = pq.read_schema(f)
        assert got.equals(samples_schema(["canny", "hed"], family=None), check_metadata=False), got
        assert set(json.loads(got.metadata[b"huggingface"])["info"]["features"]) == {"image", "control_canny", "control_hed"}
    assert "generated" not in table.column_names and "prompt" not in table.column_names
    for row in table.to_pylist():
        assert row["sample_id"] == sample_identity(cfg.seed, row["source_sha256"], 0)[0]
        image = pixels(row["image"])
        edges = cv2.Canny(image, 50, 150)
        np.testing.assert_array_equal(pixels(row["control_canny"])[:, :, 0], edges)
        assert pixels(row["control_hed"]).shape == image.shape
    assert sorted(table["caption"].to_pylist()) == sorted(f"a photo of {p.stem}" for p in photos)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["completed"] and manifest["models"]["base_model"] is None
    assert (out / "report.html").is_file() and "annotate-only" in (out / "README.md").read_text()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert run(cfg).run_id == manifest["run_id"]  # a finished job, like any: nothing to do, nothing written
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_export_controlnet_train_from_an_annotate_only_run(annotate_only, tmp_path):
    from datasets import Image as ImageFeature, Value, load_dataset

    _, _, out, photos = annotate_only
    with pytest.raises(ExportError, match=r"control maps \['canny', 'hed'\]: choose one with --control"):
        export_controlnet_train(str(out), str(tmp_path / "x"))
    record = export_controlnet_train(str(out), str(tmp_path / "train"), control="hed")
    assert (record["image"], record["conditioning_image"], record["text"], record["rows"]) == \
        ("image", "control_hed", "caption", len(photos))

    ds = load_dataset(str(tmp_path / "train"), split="train")
    assert ds.column_names == ["image", "conditioning_image", "text"]  # train_controlnet.py's default order
    assert isinstance(ds.features["image"], ImageFeature) and isinstance(ds.features["conditioning_image"], ImageFeature)
    assert ds.features["text"] == Value("string")
    source = {r["caption"]: r for r in read_parquet_dir(out / "samples").to_pylist()}
    assert sorted(ds["text"]) == sorted(source)
    for row in ds:
        want = source[row["text"]]
        np.testing.assert_array_equal(np.asarray(row["image"]), pixels(want["image"]))
        np.testing.assert_array_equal(np.asarray(row["conditioning_image"]), pixels(want["control_hed"]))

    with pytest.raises(ExportError, match="already holds train, export.json, README.md"):
        export_controlnet_train(str(out), str(tmp_path / "train"), control="hed")
    assert export_controlnet_train(str(out), str(tmp_path / "train"), control="canny", overwrite=True)["rows"] == len(photos)
    # read again: the canny maps now, not the hed maps from the cache of the first read (the folder's name is the same)
    canny = {r["caption"]: pixels(r["control_canny"]) for r in read_parquet_dir(out / "samples").to_pylist()}
    for row in load_dataset(str(tmp_path / "train"), split="train"):
        np.testing.assert_array_equal(np.asarray(row["conditioning_image"]), canny[row["text"]])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("my notes")
    with pytest.raises(ExportError, match="already holds README.md"):  # a user's own file is not replaced
        export_controlnet_train(str(out), str(mine), control="hed")
    assert (mine / "README.md").read_text() == "my notes" and not (mine / "train").exists()
    (tmp_path / "notes.txt").write_text("a file")
    with pytest.raises(ExportError, match="notes.txt is a file, not a directory"):
        export_controlnet_train(str(out), str(tmp_path / "notes.txt" / "train"), control="hed")
    for inside in (out, out / "samples"):
        with pytest.raises(ExportError, match="inside the output"):
            export_controlnet_train(str(out), str(inside), control="hed")
    assert not (out / "train").exists() and not (out / "export.json").exists()
    shutil.copytree(out, tmp_path / "wrap" / "train")  # the run where an export writes: never replaced by it
    with pytest.raises(ExportError, match="wrap/train, which an export replaces"):
        export_controlnet_train(str(tmp_path / "wrap" / "train"), str(tmp_path / "wrap"), control="hed", overwrite=True)
    assert (tmp_path / "wrap" / "train" / "manifest.json").exists()


def test_an_unfinished_run_is_exported_and_trained_on_with_a_warning(annotate_only, tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.train import load_train_config
    from pipeline.train.data import inspect_source

    out = annotate_only[2]
    partial = tmp_path / "partial"
    shutil.copytree(out, partial)
    manifest = json.loads((partial / "manifest.json").read_text())
    (partial / "manifest.json").write_text(json.dumps(manifest | {"completed": False}))  # as a stopped run leaves it
    assert main(["export", str(partial), str(tmp_path / "pairs"), "--format", "controlnet-train", "--control", "hed"]) == 0
    assert f"warning: {partial} is a run that has not completed (still running, or stopped; its command run again " \
           f"resumes it): the export holds the samples it had written" in capsys.readouterr().err
    assert json.loads((tmp_path / "pairs" / "export.json").read_text())["source_completed"] is False

    def completed(path, **data) -> bool | None:
        cfg = load_train_config(data={"base_model": "-", "data": {"paths": [str(path)], **data}, "output": {"path": "-"}})
        return inspect_source(str(path), cfg).provenance["completed"]

    seen = {p: completed(p, control_column="control_hed") for p in (out, partial)} | {"pairs": completed(tmp_path / "pairs")}
    assert seen == {out: True, partial: False, "pairs": False}


def test_an_output_with_the_earlier_names_of_parquet_rows_is_not_resumed(annotate_only, tmp_path):
    """Before, a Parquet row was `<file>#<name>` or `<file>#sha256=...`: resumed, each finished input would come back
    under its new name as a duplicate of itself."""
    from pipeline.job import prepare

    cfg, _, out, _ = annotate_only
    old = tmp_path / "out"
    shutil.copytree(out, old)
    for f in (old / "samples").glob("*.parquet"):
        table = pq.read_table(f)
        uris = [u.split("#")[0] + "#sha256=0123456789abcdef" for u in table["source_uri"].to_pylist()]
        pq.write_table(table.set_column(table.schema.get_field_index("source_uri"), "source_uri", pa.array(uris)), f)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps(manifest | {"completed": False}))
    moved = cfg.model_copy(update={"output": cfg.output.model_copy(update={"path": str(old)})})
    with pytest.raises(OutputExists, match="written by an earlier version, which named Parquet rows otherwise "
                                           r"\(.*shard\.parquet#sha256=0123456789abcdef\)"):
        prepare(moved, dry_run=True)
    prepare(cfg.model_copy(update={"output": cfg.output.model_copy(update={"path": str(out)})}), dry_run=True)


def test_export_from_a_generation_run_pairs_generated_images_with_prompts(ray_session, tiny_models, photos_dir, tmp_path):
    data = job_dict(str(photos_dir), str(tmp_path / "out"), tiny_models, variants_per_image=2)
    data["annotators"] = data["annotators"][:1]
    data["generation"]["controlnets"] = data["generation"]["controlnets"][:1]
    run(load_config(data=data))
    proc = cli("export", tmp_path / "out", tmp_path / "train", "--format", "controlnet-train")
    assert proc.returncode == 0, proc.stderr
    assert "(generated, control_canny, prompt)" in proc.stdout
    exported = read_parquet_dir(tmp_path / "train" / "train")
    want = read_parquet_dir(tmp_path / "out" / "samples")
    assert sorted(exported["text"].to_pylist()) == sorted(want["prompt"].to_pylist())
    assert sorted(r["bytes"] for r in exported["image"].to_pylist()) == sorted(r["bytes"] for r in want["generated"].to_pylist())

    # the source images: one pair per source, not one per variant (each copy would weigh it once more)
    proc = cli("export", tmp_path / "out", tmp_path / "sources", "--format", "controlnet-train", "--image", "image")
    assert proc.returncode == 0, proc.stderr
    pairs = read_parquet_dir(tmp_path / "sources" / "train")
    by_source = {r["source_sha256"]: r for r in want.to_pylist()}
    assert want.num_rows == 2 * len(by_source) and pairs.num_rows == len(by_source)
    assert sorted(r["bytes"] for r in pairs["image"].to_pylist()) == sorted(r["image"]["bytes"] for r in by_source.values())
    assert sorted(r["bytes"] for r in pairs["conditioning_image"].to_pylist()) == sorted(
        r["control_canny"]["bytes"] for r in by_source.values())
    assert json.loads((tmp_path / "sources" / "export.json").read_text())["rows"] == len(by_source)

    proc = cli("export", tmp_path / "out", tmp_path / "t2", "--format", "controlnet-train", "--control", "depth")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path / 'out'} has no control map 'depth'; it has ['canny']"


def test_pose_job_keeps_keypoints_next_to_the_skeleton(ray_session, annotator_weights, photos_dir, tmp_path):
    """An annotate-only pose job: the keypoints reach Parquet as OpenPose JSON at the row's size,
    next to the drawn skeleton."""

    data = {"source": {"type": "images", "path": str(photos_dir)}, "image": {"resolution": 128},
            "annotators": [{"name": "dwpose", "model": annotator_weights("dwpose")}, {"name": "canny"}],
            "output": {"path": str(tmp_path / "out")}}
    result = run(load_config(data=data))
    assert result.errors == 0
    files = sorted((tmp_path / "out" / "samples").glob("*.parquet"))
    schema = pq.read_schema(files[0])
    assert schema.field("keypoints_dwpose").type == pa.string() and "keypoints_canny" not in schema.names
    rows = read_parquet_dir(tmp_path / "out" / "samples").to_pylist()
    people = 0
    for row in rows:
        doc = json.loads(row["keypoints_dwpose"])
        assert (doc["canvas_width"], doc["canvas_height"]) == (row["width"], row["height"])
        people += len(doc["people"])
        for person in doc["people"]:
            assert len(person["pose_keypoints_2d"]) == 18 * 3
        (prov,) = [a for a in row["annotators"] if a["id"] == "dwpose"]
        assert prov["weights_sha256"] and prov["name"] == "dwpose"
    assert people > 0  # the tiny estimator finds people, so the JSON carries points
