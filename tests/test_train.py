"""Training a ControlNet with Ray Train on the pipeline's own kind of output: tiny models, CPU, 2 workers."""

import io
import json
import os
import re
import shutil
import subprocess
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image, ImageDraw

from pipeline.config import ConfigError, load_config
from pipeline.export import TRAIN_SCHEMA
from pipeline.io.output import RunOutput
from pipeline.job import run
from pipeline.models import ModelUnavailable
from pipeline.train import (
    POLL_INTERVAL,
    NotEnoughResources,
    TrainDataError,
    TrainOutputExists,
    claim_output,
    load_train_config,
    resolved,
    run_training,
)
from pipeline.train.data import inspect_source, training_dataset
from pipeline.train.loop import diffusion_loss, first_batch_fetched_meanwhile, load_models
from tests.helpers import ROOT, cli_command, cli_env, job_dict, kill_tree, lacking_weight, read_parquet_dir
from tests.s3_server import s3  # noqa: F401 - the fixture

SIZE = 64


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def circles(tmp_path_factory):
    """A learnable task as an export folder: the outline of a circle -> the circle filled."""
    root = tmp_path_factory.mktemp("circles")
    (root / "train").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(8):
        x, y, r = (int(v) for v in (rng.integers(18, 46), rng.integers(18, 46), rng.integers(8, 16)))
        outline, filled = Image.new("RGB", (SIZE, SIZE)), Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
        ImageDraw.Draw(outline).ellipse((x - r, y - r, x + r, y + r), outline=(255, 255, 255), width=2)
        ImageDraw.Draw(filled).ellipse((x - r, y - r, x + r, y + r), fill=(200, 30, 30))
        rows.append({"image": {"bytes": png(filled), "path": None},
                     "conditioning_image": {"bytes": png(outline), "path": None}, "text": "a red circle"})
    pq.write_table(pa.Table.from_pylist(rows, schema=TRAIN_SCHEMA), root / "train" / "part-00000.parquet")
    (root / "export.json").write_text(json.dumps({"source_run_id": "circles-run", "rows": len(rows)}))
    Image.open(io.BytesIO(rows[0]["conditioning_image"]["bytes"])).save(root / "validation.png")
    return root


def train_dict(tiny, data, output, **changes) -> dict:
    return {"seed": 0, "base_model": tiny["base_model"], "data": {"paths": [str(data)]}, "resolution": SIZE,
            "learning_rate": 3e-3, "batch_size": 2, "steps": 24, "checkpoint_every": 12, "num_workers": 2,
            "cpus_per_worker": 0.5, "validation": {"prompts": ["a red circle"],
                                                    "control_images": [str(data / "validation.png")], "steps": 2},
            "output": {"path": str(output)}, **changes}


def fixed_batch(data) -> dict:
    table = read_parquet_dir(data / "train")
    from transformers import CLIPTokenizer

    rows = table.to_pylist()
    decode = lambda b: np.asarray(Image.open(io.BytesIO(b["bytes"])).convert("RGB"))  # noqa: E731
    return {"pixels": torch.from_numpy(np.stack([decode(r["image"]) for r in rows])),
            "control": torch.from_numpy(np.stack([decode(r["conditioning_image"]) for r in rows])), "rows": rows,
            "tokenizer": CLIPTokenizer}


def mean_loss(cfg, controlnet_state, data, seeds=range(6)) -> float:
    """The training loss on all pairs, averaged over fixed noise draws, for a given ControlNet state."""
    scheduler, text_encoder, vae, unet, controlnet, _ = load_models(cfg, torch.device("cpu"))
    if controlnet_state is not None:
        controlnet.load_state_dict(controlnet_state)
    fixed = fixed_batch(data)
    tokenizer = fixed["tokenizer"].from_pretrained(cfg.base_model, subfolder="tokenizer")
    ids = tokenizer([r["text"] for r in fixed["rows"]], padding="max_length", max_length=77, truncation=True,
                    return_tensors="pt").input_ids
    batch = {"pixels": fixed["pixels"], "control": fixed["control"], "input_ids": ids}
    with torch.no_grad():
        return float(np.mean([diffusion_loss(batch, scheduler, text_encoder, vae, unet, controlnet,
                                             torch.Generator().manual_seed(s)) for s in seeds]))


def test_a_workers_first_batch_is_fetched_while_it_loads_its_models():
    """The first batch starts Ray Data's stream on a thread, before the models load; its error surfaces in the loop."""
    started = threading.Event()

    def batches():
        started.set()
        yield from (1, 2, 3)

    epoch = first_batch_fetched_meanwhile(batches())
    assert started.wait(timeout=120)  # nothing consumed yet
    assert list(epoch) == [1, 2, 3]
    assert list(first_batch_fetched_meanwhile(iter(()))) == []  # an empty shard: no batch (the loop then says so)

    def failing():
        raise OSError("a pair could not be read")
        yield

    epoch = first_batch_fetched_meanwhile(failing())
    with pytest.raises(OSError, match="a pair could not be read"):
        next(epoch)


def test_a_new_controlnet_adds_exactly_nothing_to_the_locked_unet(tiny_models, circles, tmp_path):
    cfg = load_train_config(data=train_dict(tiny_models, circles, tmp_path))
    _, _, _, unet, controlnet, _ = load_models(cfg, torch.device("cpu"))
    latents = torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    control = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    steps = torch.tensor([10, 500])
    with torch.no_grad():
        down, mid = controlnet(latents, steps, encoder_hidden_states=text, controlnet_cond=control, return_dict=False)
        assert all(bool((r == 0).all()) for r in [*down, mid])  # zero convolutions
        alone = unet(latents, steps, encoder_hidden_states=text).sample
        joined = unet(latents, steps, encoder_hidden_states=text, down_block_additional_residuals=down,
                      mid_block_additional_residual=mid).sample
    torch.testing.assert_close(joined, alone, rtol=0, atol=0)
    assert not any(p.requires_grad for m in (unet,) for p in m.parameters())  # the UNet is locked


def test_latents_and_text_encoded_in_ray_data_give_the_same_loss(ray_session, tiny_models, circles, tmp_path, capsys):
    """data.precompute moves the VAE and text encoder into a Ray Data stage; the objective is unchanged."""
    losses = {}
    for precompute in (False, True):
        job = train_dict(tiny_models, circles, tmp_path)
        job["data"]["precompute"] = precompute
        cfg = load_train_config(data=job)
        dataset = training_dataset(cfg, [inspect_source(str(circles), cfg)])
        capsys.readouterr()
        dataset.explain()  # the listed files read as they are: no second listing with its pool of footer actors
        plan = capsys.readouterr().out
        assert "Read[ReadParquet]" in plan and "ListFiles" not in plan, plan
        batch = dataset.take_batch(8, batch_format="numpy")
        assert ("latent_mean" in batch, "pixels" in batch) == (precompute, not precompute)
        scheduler, text_encoder, vae, unet, controlnet, _ = load_models(cfg, torch.device("cpu"))
        batch = {k: torch.from_numpy(v) for k, v in batch.items()}
        with torch.no_grad():
            losses[precompute] = diffusion_loss(batch, scheduler, text_encoder, vae, unet, controlnet,
                                                torch.Generator().manual_seed(0))
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def trained(ray_session, tiny_models, circles, tmp_path_factory):
    output = tmp_path_factory.mktemp("trained") / "out"
    job = train_dict(tiny_models, circles, output)
    job["data"]["precompute"] = True  # the VAE and text encoder run in Ray Data (the resume test runs them in the loop)
    cfg = load_train_config(data=job)
    return cfg, run_training(cfg, echo=lambda _: None), output


def test_training_changes_only_the_controlnet_and_lowers_the_loss(trained, circles):
    cfg, result, output = trained
    assert result.step == cfg.steps and result.metrics["steps_this_run"] == cfg.steps
    assert result.metrics["frozen_unchanged"] is True  # UNet, VAE and text encoder untouched on every worker
    from diffusers import ControlNetModel

    net = ControlNetModel.from_pretrained(result.controlnet)
    zero_convs = [net.controlnet_cond_embedding.conv_out, *net.controlnet_down_blocks, net.controlnet_mid_block]
    assert any(bool(p.abs().sum() > 0) for conv in zero_convs for p in conv.parameters())  # it learned something
    before, after = mean_loss(cfg, None, circles), mean_loss(cfg, net.state_dict(), circles)
    assert after < 0.97 * before, (before, after)  # the same noise draws before and after


def test_a_re_run_resumes_only_the_same_training(trained, tmp_path):
    """OUTPUT/train.json holds what decides what a training learns: a re-run may train longer or on more workers
    (it resumes), a changed config is refused before anything starts, and output.overwrite starts over."""
    cfg, _, output = trained
    job = cfg.model_dump(mode="json")
    identity = json.loads((output / "train.json").read_text())
    assert identity["learning_rate"] == cfg.learning_rate and "steps" not in identity and "output" not in identity
    before = {p: p.stat().st_mtime_ns for p in output.rglob("*")}
    with pytest.raises(TrainOutputExists, match=r"holds a training of another config \(changed: batch_size, "
                                                r"learning_rate\); a re-run may change only checkpoint_every, "):
        run_training(load_train_config(data=job | {"learning_rate": 1e-3, "batch_size": 4}))
    assert {p: p.stat().st_mtime_ns for p in output.rglob("*")} == before  # nothing written, nothing removed

    copy = tmp_path / "copy"
    shutil.copytree(output, copy)

    def claim(said=None, **changes):
        base, again = resolved(load_train_config(data=job | {"output": {"path": str(copy)}} | changes))
        claim_output(again, base, RunOutput(str(copy)), echo=(said if said is not None else []).append)

    claim(steps=48, num_workers=1, data=job["data"] | {"precompute": False})  # resumable changes
    (copy / "train.json").unlink()  # as an earlier version left it: resumed, with a note
    said = []
    claim(said, learning_rate=2e-3)
    assert said == [(f"note: {copy} holds checkpoints of a training that did not record its config (an earlier "
                     f"version): resumed as this config's")]
    claim(learning_rate=1e-3, output={"path": str(copy), "overwrite": True})
    assert sorted(os.listdir(copy)) == ["train.json"]  # checkpoints, validation images and the ControlNet removed
    assert json.loads((copy / "train.json").read_text())["learning_rate"] == 1e-3
    claim(learning_rate=5e-4)  # no checkpoint yet (a training that stopped before one): nothing to resume, replaced
    assert json.loads((copy / "train.json").read_text())["learning_rate"] == 5e-4


def test_checkpoints_validation_images_and_the_model_card(trained):
    cfg, result, output = trained
    assert sorted(os.listdir(output / "validation")) == ["index.html", "step-0000012", "step-0000024"]
    assert sorted(os.listdir(output / "validation" / "step-0000024")) == ["0-control.png", "0-generated.png"]
    assert Image.open(output / "validation" / "step-0000024" / "0-generated.png").size == (SIZE, SIZE)
    card = (output / "controlnet" / "README.md").read_text()
    assert "8 pairs" in card and "source_run_id `circles-run`" in card and "trained for\n24 steps" in card
    assert (output / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()
    assert os.environ[POLL_INTERVAL] == "0.5"  # what fit() passes to the controller (Ray's 2 s when unset)


def test_the_trained_controlnet_loads_in_a_generation_job(trained, tiny_models, photos_dir, tmp_path):
    _, result, _ = trained
    data = job_dict(str(photos_dir), str(tmp_path / "out"), tiny_models, variants_per_image=1)
    data["generation"]["controlnets"] = [{"condition": "canny", "model": result.controlnet}]
    job = run(load_config(data=data), echo=lambda _: None)
    assert job.samples == len(list(photos_dir.iterdir())) and job.errors == 0
    models = read_parquet_dir(tmp_path / "out" / "samples", columns=["controlnet_models"])["controlnet_models"]
    assert set(map(tuple, models.to_pylist())) == {(result.controlnet,)}
    # that run output is itself training data: generated image, a chosen control map, the prompt
    cfg = load_train_config(data=train_dict(tiny_models, tmp_path / "out", tmp_path / "next"))
    with pytest.raises(TrainDataError, match=r"control maps \['control_canny', 'control_hed'\]: choose one"):
        inspect_source(str(tmp_path / "out"), cfg)
    cfg = load_train_config(data=train_dict(tiny_models, tmp_path / "out", tmp_path / "next"),
                            overrides=["data.control_column=control_hed"])
    source = inspect_source(str(tmp_path / "out"), cfg)
    assert (source.image, source.control, source.text, source.rows) == ("generated", "control_hed", "prompt", job.samples)
    assert source.provenance["run_id"] == job.run_id


@pytest.mark.parametrize("change, message", [
    ({"learning_rate": 0}, "learning_rate: Input should be greater than 0"),
    ({"mixed_precision": "fp16"}, "fp16 needs use_gpu: true"),
    ({"validation": {"prompts": ["a"]}}, "validation.prompts and validation.control_images must have the same length"),
    ({"data": {"paths": []}}, "data.paths: List should have at least 1 item"),
    ({"epochs": 3}, "epochs: unknown key"),
])
def test_a_bad_training_config_names_the_key(tiny_models, tmp_path, change, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_train_config(data={**train_dict(tiny_models, tmp_path, tmp_path / "out"), **change})


def test_training_refuses_to_start_where_it_could_not_finish(ray_session, tiny_models, circles, tmp_path):
    with pytest.raises(NotEnoughResources, match="claim 2 of the cluster's 2 CPUs; Ray Data needs at least 1 more"):
        run_training(load_train_config(data=train_dict(tiny_models, circles, tmp_path / "a", cpus_per_worker=1)))
    gpu = train_dict(tiny_models, circles, tmp_path / "a", num_workers=1, use_gpu=True)  # the test instance has none
    with pytest.raises(NotEnoughResources, match="claim a GPU each and this Ray instance has 0: set use_gpu: false"):
        run_training(load_train_config(data=gpu))
    with pytest.raises(ModelUnavailable, match="model directory .*/missing does not exist"):
        run_training(load_train_config(data=train_dict({"base_model": str(tmp_path / "missing")}, circles, tmp_path)))
    with pytest.raises(TrainDataError, match="has no samples/.*parquet .* or train/.*parquet .an export.$"):
        run_training(load_train_config(data=train_dict(tiny_models, tmp_path, tmp_path / "b")))
    with pytest.raises(TrainDataError, match="it holds Parquet itself: give the folder above a run's samples/ or an "
                                             "export's train/"):  # the export's own train/ folder
        run_training(load_train_config(data=train_dict(tiny_models, circles / "train", tmp_path / "b")))
    with pytest.raises(TrainDataError, match="data path .*/nowhere does not exist"):
        run_training(load_train_config(data=train_dict(tiny_models, tmp_path / "nowhere", tmp_path / "b")))
    normalized = tmp_path / "normalized"  # output.layout normalized: the maps are in sources/
    shutil.copytree(circles / "train", normalized / "samples")
    (normalized / "sources").mkdir()
    with pytest.raises(TrainDataError, match="has the normalized layout .* export it first"):
        run_training(load_train_config(data=train_dict(tiny_models, normalized, tmp_path / "c")))
    assert not any((tmp_path / d).exists() for d in "abc")  # nothing written


def test_a_controlnet_checkpoint_that_lacks_weights_is_not_trained_from_random_ones(tiny_models, tmp_path):
    net = lacking_weight(tiny_models["controlnet/hed"], tmp_path / "controlnet")
    cfg = load_train_config(data=train_dict(tiny_models, tmp_path, tmp_path / "out", controlnet=str(net)))
    with pytest.raises(OSError, match=r"its checkpoint lacks 1 of the ControlNetModel's weights "
                                      r"\(controlnet_mid_block.weight, \.\.\.\)"):
        load_models(cfg, torch.device("cpu"))


def test_unlocking_the_unet_decoder_trains_its_up_blocks_only(tiny_models, tmp_path):
    cfg = load_train_config(data=train_dict(tiny_models, tmp_path, tmp_path / "out", unlock_unet_decoder=True))
    _, text_encoder, vae, unet, controlnet, _ = load_models(cfg, torch.device("cpu"))
    trainable = {name.split(".")[0] for name, p in unet.named_parameters() if p.requires_grad}
    assert trainable == {"up_blocks", "conv_norm_out", "conv_out"}
    assert all(p.requires_grad for p in controlnet.parameters())
    assert not any(p.requires_grad for m in (text_encoder, vae) for p in m.parameters())


def last_checkpoint_step(fs, output: str) -> int | None:
    """The step of the checkpoint Ray Train would resume from (its snapshot of the run's checkpoints)."""
    try:
        snapshot = json.loads(fs.cat_file(f"{output}/train/checkpoint_manager_snapshot.json"))
        return snapshot["latest_checkpoint_result"]["metrics"]["step"]
    except (OSError, ValueError, KeyError, TypeError):  # not written yet, or being written
        return None


def test_a_killed_training_on_s3_resumes_from_its_last_checkpoint(ray_address, tiny_models, circles, s3, tmp_path):
    """Pairs read from s3://, checkpoints written there; the CLI killed after a checkpoint, then run again (on the
    test session's Ray: a resume does not depend on the instance, and one fewer Ray start)."""
    fs = s3.fs()
    fs.put(str(circles / "train") + "/", f"{s3.bucket}/circles/train", recursive=True)
    output = f"{s3.bucket}/trained"
    # one worker: two-worker training is the `trained` fixture's; each of the two runs here is then ~20 CPU-s less
    job = train_dict(tiny_models, circles, "", steps=8, checkpoint_every=2, validation={}, num_workers=1)
    job["data"] = {"paths": [s3.url("circles")], "storage_options": s3.storage_options}
    job["output"] = {"path": s3.url("trained"), "storage_options": s3.storage_options}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(job))
    args = ("train", tmp_path / "train.yaml", "--address", "local")
    first = subprocess.Popen(cli_command(*args), cwd=ROOT, env=cli_env({"RAY_ADDRESS": ""}), start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while last_checkpoint_step(fs, output) is None and first.poll() is None:  # Ray Train has recorded a checkpoint
        time.sleep(0.2)
    kill_tree(first)  # its own Ray instance goes down with it
    assert not fs.exists(f"{output}/controlnet"), "the training finished before it was killed"
    killed_at = last_checkpoint_step(fs, output)
    again = subprocess.run(cli_command("train", tmp_path / "train.yaml", "--address", ray_address), cwd=ROOT,
                           env=cli_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    metrics = json.loads(fs.cat_file(max(fs.glob(f"{output}/train/checkpoint_*/metrics.json"))))
    assert metrics["step"] == 8 and metrics["resumed_from"] == killed_at >= 2
    assert f"step 8/8 · loss {metrics['loss']:.4f} · " in again.stderr  # the first worker's steps reach the driver
    assert metrics["steps_this_run"] == 8 - metrics["resumed_from"]  # no step done twice in this run
    assert fs.exists(f"{output}/controlnet/diffusion_pytorch_model.safetensors")


def test_ctrl_c_stops_a_training_at_once_keeping_its_checkpoints(tiny_models, circles, tmp_path):
    """Ray Train's own SIGINT handler (set when fit() runs on the main thread) let a local training go on to its
    last step; the CLI runs fit() on a thread of its own, so Ctrl-C ends it with the interrupt's message and 130."""
    import signal

    import fsspec

    job = train_dict(tiny_models, circles, tmp_path / "out", steps=200, checkpoint_every=2, validation={},
                     num_workers=1)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(job))
    proc = subprocess.Popen(cli_command("train", tmp_path / "train.yaml", "--address", "local"), cwd=ROOT,
                            env=cli_env({"RAY_ADDRESS": ""}), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        fs = fsspec.filesystem("file")
        while last_checkpoint_step(fs, str(tmp_path / "out")) is None and proc.poll() is None:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        err = proc.communicate()[1]
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    assert proc.returncode == 130, err[-3000:]
    assert err.rstrip().endswith("interrupted: the checkpoints are kept; run the same command again to resume")
    assert last_checkpoint_step(fs, str(tmp_path / "out")) < 200  # it stopped; 200 steps take ~50 s here
