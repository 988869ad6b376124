"""End to end on local Ray: real photographs plus damaged files in, Parquet with provenance out."""

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from pipeline.config import load_config
from pipeline.job import run
from pipeline.models import file_sha256, fingerprint
from pipeline.schema import samples_schema, errors_schema
from pipeline.ids import sample_identity
from pipeline.io.images import png_to_array
from tests.helpers import ROOT, cli, job_dict, read_parquet_dir


def read(out: Path, kind: str) -> pa.Table:
    return read_parquet_dir(out / kind, schema_if_empty=errors_schema() if kind == "errors" else None)


def by_id(table: pa.Table) -> dict[str, dict]:
    return {r["sample_id"]: r for r in table.to_pylist()}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, photos_dir) -> Path:
    directory = tmp_path_factory.mktemp("inputs")
    for p in photos_dir.iterdir():
        shutil.copy(p, directory / p.name)
    good = (photos_dir / "chelsea.jpg").read_bytes()
    (directory / "truncated.jpg").write_bytes(good[: len(good) // 4])
    (directory / "empty.png").write_bytes(b"")
    (directory / "notes.txt").write_text("not an image and not read")
    return directory


@pytest.fixture(scope="module")
def first_run(ray_session, tiny_models, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    cfg = load_config(data=job_dict(str(inputs), str(out), tiny_models))
    return cfg, run(cfg), out


def test_counts_and_accounting(first_run):
    cfg, result, out = first_run
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"inputs": 7, "rejected_inputs": 2, "samples": 10, "failed_samples": 0,
                                  "errors": 2, "errors_by_stage": {"decode": 2},
                                  "duplicate_sample_ids": 0}
    assert (result.inputs, result.samples, result.errors) == (7, 10, 2)
    assert read(out, "samples").num_rows == 10
    assert manifest["completed"] is True
    assert sorted(manifest["files"]) == sorted(str(p.relative_to(out)) for p in out.glob("*/*.parquet"))


def test_bad_files_are_error_rows(first_run, inputs):
    _, _, out = first_run
    errors = {Path(r["source_uri"]).name: r for r in read(out, "errors").to_pylist()}
    assert set(errors) == {"truncated.jpg", "empty.png"}
    assert errors["empty.png"]["error_message"] == "empty file (0 bytes)"
    assert errors["truncated.jpg"]["error_type"] == "RejectedImage"
    assert "not a decodable image" in errors["truncated.jpg"]["error_message"]
    assert all(e["stage"] == "decode" for e in errors.values())
    assert errors["truncated.jpg"]["source_sha256"] == hashlib.sha256((inputs / "truncated.jpg").read_bytes()).hexdigest()


def test_schema_matches_contract(first_run):
    _, _, out = first_run
    want = samples_schema(["canny", "hed"])
    for f in (out / "samples").glob("*.parquet"):
        got = pq.read_schema(f)
        assert got.equals(want, check_metadata=False), got
        assert json.loads(got.metadata[b"huggingface"])["info"]["features"]["generated"] == {"_type": "Image"}
    contract = json.loads((ROOT / "schemas" / "samples.schema.json").read_text())
    names = [c["name"] for c in contract["columns"]]
    documented = [{"control_canny": "control_{id}"}.get(n, n) for n in want.names if n != "control_hed"]
    documented.insert(documented.index("control_{id}") + 1, "keypoints_{id}")  # pose annotators only
    assert names == documented


def test_provenance_in_every_row(first_run, inputs, tiny_models):
    cfg, result, out = first_run
    rows = read(out, "samples").to_pylist()
    assert len({r["sample_id"] for r in rows}) == len(rows)
    base_rev = "sha256:" + fingerprint(Path(tiny_models["base_model"]))
    hed_sha = file_sha256(Path(tiny_models["annotators"]) / "ControlNetHED.pth")
    for r in rows:
        src = Path(r["source_uri"])
        assert src.parent == inputs
        assert r["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
        assert (r["sample_id"], r["seed"]) == sample_identity(7, r["source_sha256"], r["variant_index"])
        # "{prompt} of {caption}" without a caption: the empty field goes with its " of"
        assert r["prompt"] == ["a painting", "a photo at night"][r["variant_index"]]
        assert r["negative_prompt"] == "blurry"
        assert r["base_model"] == tiny_models["base_model"] and r["base_model_revision"] == base_rev
        assert r["controlnet_models"] == [tiny_models["controlnet/canny"], tiny_models["controlnet/hed"]]
        assert r["controlnet_conditions"] == ["canny", "hed"]
        assert r["controlnet_conditioning_scale"] == [1.0, 0.5]
        assert r["control_guidance_end"] == [1.0, 0.8]
        assert (r["scheduler"], r["num_inference_steps"], r["guidance_scale"], r["dtype"]) == ("unipc", 3, 7.5, "float32")
        canny, hed = r["annotators"]
        assert canny["name"] == "canny" and json.loads(canny["params"]) == {"low_threshold": 50, "high_threshold": 150}
        assert hed["name"] == "hed" and hed["weights_sha256"] == hed_sha and hed["model"] == tiny_models["annotators"]
        assert r["run_id"] == result.run_id and r["code_version"].startswith("0.1.0")
        assert r["created_at"] is not None
        transform = json.loads(r["transform"])
        assert min(transform["size"]) == 64 and transform["size"] == [r["width"], r["height"]]
        for column in ("image", "control_canny", "control_hed", "generated"):
            with Image.open(io.BytesIO(r[column]["bytes"])) as im:
                assert im.size == (r["width"], r["height"]), column
                assert im.format == "PNG"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["models"]["base_model"]["commit"] == base_rev
    assert manifest["versions"]["diffusers"] and manifest["versions"]["ray"] and manifest["versions"]["torch"]
    assert manifest["config"]["generation"]["steps"] == 3


def test_grayscale_photo_is_converted(first_run):
    _, _, out = first_run
    camera = [r for r in read(out, "samples").to_pylist() if r["source_uri"].endswith("camera.jpg")]
    assert len(camera) == 2 and json.loads(camera[0]["transform"])["original_mode"] == "L"


def test_loads_with_hugging_face_datasets(first_run):
    import datasets

    _, _, out = first_run
    ds = datasets.load_dataset("parquet", data_files=str(out / "samples" / "*.parquet"), split="train")
    assert ds.num_rows == 10
    for column in ("image", "control_canny", "control_hed", "generated"):
        assert isinstance(ds.features[column], datasets.Image)
    row = ds[0]
    assert row["generated"].size == (row["width"], row["height"])


def test_same_config_twice_gives_same_ids_seeds_and_images(ray_session, tiny_models, inputs, first_run, tmp_path):
    _, _, out_a = first_run
    runs = []
    for name in ("b", "c"):
        cfg = load_config(data=job_dict(str(inputs), str(tmp_path / name), tiny_models, batch_size=1))
        run(cfg)
        runs.append(by_id(read(tmp_path / name, "samples")))
    a, b, c = by_id(read(out_a, "samples")), *runs
    assert set(a) == set(b) == set(c)
    for sid in a:
        assert a[sid]["seed"] == b[sid]["seed"] == c[sid]["seed"]
        for column in ("image", "control_canny", "control_hed"):
            assert a[sid][column] == b[sid][column]
        # batch size 1 both times: bit for bit the same bytes
        assert b[sid]["generated"]["bytes"] == c[sid]["generated"]["bytes"]
        # batch size 3 vs 1: same noise, pixels equal up to float reduction order
        pa_, pb = (np.asarray(Image.open(io.BytesIO(x[sid]["generated"]["bytes"]))).astype(int) for x in (a, b))
        assert np.abs(pa_ - pb).max() <= 1


def test_parquet_source_with_captions(ray_session, tiny_models, photos_dir, tmp_path):
    photos = sorted(photos_dir.glob("*.jpg"))[:3]
    table = pa.table({
        "jpg": [p.read_bytes() for p in photos] + [b"garbage"],
        "text": [f"caption {p.stem}" for p in photos] + ["broken"],
    })
    pq.write_table(table, tmp_path / "shard-0.parquet")
    data = job_dict(str(tmp_path / "shard-0.parquet"), str(tmp_path / "out"), tiny_models, variants_per_image=1)
    data["source"] = {"type": "parquet", "path": str(tmp_path / "*.parquet"), "image_column": "jpg", "caption_column": "text"}
    result = run(load_config(data=data))
    assert (result.inputs, result.samples, result.errors) == (4, 3, 1)
    rows = read(tmp_path / "out", "samples").to_pylist()
    assert sorted(r["prompt"] for r in rows) == sorted(f"a painting of caption {p.stem}" for p in photos)
    assert all(r["caption"].startswith("caption ") for r in rows)
    assert sorted(r["source_uri"] for r in rows) == [f"{tmp_path / 'shard-0.parquet'}#row={i}" for i in range(3)]
    (error,) = read(tmp_path / "out", "errors").to_pylist()
    assert error["stage"] == "decode"


def test_cli_config_error_exits_nonzero_with_key_path(tmp_path, tiny_models):
    data = job_dict("/nowhere", str(tmp_path / "out"), tiny_models)
    data["generation"]["stepz"] = 3
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(data))
    proc = cli("run", str(tmp_path / "job.yaml"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: invalid config: generation.stepz: unknown key"


def test_cli_missing_model_exits_nonzero_naming_it(tmp_path, tiny_models, photos_dir):
    data = job_dict(str(photos_dir), str(tmp_path / "out"), tiny_models)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(data))
    proc = cli("run", str(tmp_path / "job.yaml"), "--set", "generation.controlnets.0.model=lllyasviel/sd-controlnet-canny")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "lllyasviel/sd-controlnet-canny" in last and "python -m pipeline models fetch CONFIG --dir DIR" in last
    assert not (tmp_path / "out").exists()  # failed before any work


def test_cli_model_that_cannot_load_stops_the_run_early_with_one_line(ray_address, tmp_path, tiny_models, photos_dir):
    import safetensors.torch
    import torch

    base = tmp_path / "broken-base"
    shutil.copytree(tiny_models["base_model"], base)
    weights = base / "unet" / "diffusion_pytorch_model.safetensors"
    state = safetensors.torch.load_file(weights)
    # whole and readable (the start-up checks pass it), but one tensor of another shape than the UNet's
    safetensors.torch.save_file(state | {"conv_in.weight": torch.zeros(1)}, weights)
    data = job_dict(str(photos_dir), str(tmp_path / "out"), tiny_models)
    data["generation"]["base_model"] = str(base)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(data))
    proc = cli("run", str(tmp_path / "job.yaml"), "--address", ray_address)  # the session's Ray: one fewer start
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the run stopped: stage generate failed: ValueError: ")
    assert "conv_in.weight expected shape" in last and "resumes" in last
    assert "Traceback" not in proc.stderr  # Ray Data's own error log and stack trace stay in its log file
    assert "Traceback" not in proc.stdout and "(raylet)" not in proc.stdout  # nor Ray core's retries of the actor
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["completed"] is False
    # the model mended (its fingerprint changes), the same command runs the job as promised: nothing was written
    shutil.copyfile(Path(tiny_models["base_model"]) / "unet" / "diffusion_pytorch_model.safetensors", weights)
    proc = cli("run", str(tmp_path / "job.yaml"), "--address", ray_address, "-q")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["completed"] is True and manifest["counts"]["samples"] > 0


def test_cheap_stages_run_inside_the_cpu_actor_stage_after_them(ray_session, tiny_models, inputs, tmp_path, capsys,
                                                                monkeypatch):
    """canny (weight-free) runs in the hed actors (Ray Data fuses them: same resources); read and decode stay
    tasks, dedupe runs in the decode tasks (asking the Progress actor), and nothing is fused into a GPU actor.
    Variant expansion is no stage of Ray Data's: the generator's actors expand each batch of inputs first, and
    a batch is as many inputs as make one call's samples (on a GPU too)."""
    from pipeline.job import build_dataset, resolve_models

    def inputs_per_batch(ds) -> int:  # of the generator's stage, the last of the plan
        assert ds._logical_plan.dag.name == "MapBatches(generate)"
        return ds._logical_plan.dag.min_rows_per_bundled_input

    cfg = load_config(data=job_dict(str(inputs), str(tmp_path / "out"), tiny_models, batch_size=8))
    models = resolve_models(cfg)
    ds = build_dataset(cfg, models)
    assert inputs_per_batch(ds) == 4  # 8 samples a call, 2 variants each
    ds.explain()
    optimized = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    assert "ActorPoolMapOperator[MapBatches(generate)]" in optimized and "expand" not in optimized
    assert "ActorPoolMapOperator[MapBatches(annotate:canny)->MapBatches(annotate:hed)]" in optimized
    assert "MapBatches(decode)->MapBatches(dedupe)]" in optimized and "ActorPoolMapOperator[MapBatches(dedupe)" not in optimized
    on_gpu = job_dict(str(inputs), str(tmp_path / "out"), tiny_models, num_gpus=1, batch_size="auto",
                      variants_per_image=3)
    on_gpu["annotators"][1]["num_gpus"] = 1
    # a GPU node, as the plan sees it (nothing runs)
    monkeypatch.setattr("pipeline.job.ray.cluster_resources", lambda: {"CPU": 2.0, "GPU": 1.0})
    ds = build_dataset(load_config(data=on_gpu), models)
    assert inputs_per_batch(ds) == 5  # auto: 16 samples a call on a GPU; 5 inputs of 3 variants fit in one
    ds.explain()
    optimized = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    assert "ActorPoolMapOperator[MapBatches(generate)]" in optimized and "expand" not in optimized
    assert "ActorPoolMapOperator[MapBatches(annotate:hed)]" in optimized


def test_normalized_layout_writes_each_source_once_and_reads_back_as_the_flat_rows(first_run, tiny_models, inputs,
                                                                                   tmp_path):
    """output.layout normalized: image and control maps once per source in sources/, samples refer to them by
    source_sha256; read back (RunOutput, export, load_dataset) they are the flat run's rows."""
    import datasets

    from pipeline.export import export_controlnet_train
    from pipeline.io.output import RunOutput
    from pipeline.job import OutputExists, prepare

    _, _, flat = first_run
    out = tmp_path / "normalized"
    data = job_dict(str(inputs), str(out), tiny_models)
    data["output"]["layout"] = "normalized"
    data["source"]["limit"] = 4  # a first run on some inputs, resumed on all: no source written twice
    assert run(load_config(data=data)).samples < 10
    del data["source"]["limit"]
    result = run(load_config(data=data))
    assert (result.samples, result.errors) == (10, 2) and len(result.manifest["runs"]) == 2
    samples, sources = read(out, "samples"), read(out, "sources")
    assert not {"image", "control_canny", "control_hed"} & set(samples.column_names)
    assert sources.column("source_sha256").to_pylist() and len(set(sources.column("source_sha256").to_pylist())) \
        == sources.num_rows == len(set(samples.column("source_sha256").to_pylist())) == 5  # 5 sources, 2 variants
    columns = ["sample_id", "image", "control_canny", "control_hed", "generated", "prompt"]
    joined, flat_rows = (by_id(RunOutput(str(o)).read("samples", columns)) for o in (out, flat))
    assert set(joined) == set(flat_rows)
    for sid, row in joined.items():  # generated in other batches (a resumed run): within one level
        assert {k: v for k, v in row.items() if k != "generated"} == {k: v for k, v in flat_rows[sid].items()
                                                                     if k != "generated"}
        pixels = [png_to_array(r["generated"]["bytes"]).astype(int) for r in (row, flat_rows[sid])]
        assert np.abs(pixels[0] - pixels[1]).max() <= 1
    whole = RunOutput(str(out))  # every column of a samples file, as `score` reads it: its own and its source's, once
    full = whole.read_file(whole.files("samples")[0], None)
    assert {"image", "control_hed", "source_sha256", "generated"} <= set(full.column_names)
    assert len(set(full.column_names)) == full.num_columns
    exports = [export_controlnet_train(str(o), str(tmp_path / f"export-{i}"), control="hed") for i, o in enumerate((flat, out))]
    assert exports[0]["rows"] == exports[1]["rows"] == 10
    pairs = [{(r["conditioning_image"]["bytes"], r["text"]): png_to_array(r["image"]["bytes"]).astype(int)
              for r in pq.read_table(tmp_path / f"export-{i}" / "train").to_pylist()} for i in (0, 1)]
    assert pairs[0].keys() == pairs[1].keys() and len(pairs[0]) == 10
    assert all(np.abs(pairs[0][k] - pairs[1][k]).max() <= 1 for k in pairs[0])  # the generated images
    on_flat = job_dict(str(inputs), str(flat), tiny_models)  # the flat run's output is another job's
    on_flat["output"]["layout"] = "normalized"
    with pytest.raises(OutputExists, match=r"a different job \(changed: output\.layout\)"):
        prepare(load_config(data=on_flat), dry_run=True)
    default = datasets.load_dataset(str(out), split="train")  # the card's configs: samples, and sources
    assert default.num_rows == 10 and "image" not in default.column_names
    assert datasets.load_dataset(str(out), "sources", split="train").num_rows == 5
