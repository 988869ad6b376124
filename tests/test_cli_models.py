"""`python -m pipeline annotators` and `python -m pipeline models fetch`, offline."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.annotators import ANNOTATORS
from pipeline.cli import main

from tests.helpers import cli, job_dict


def test_annotators_lists_every_annotator_with_params_and_weights(capsys):
    assert main(["annotators"]) == 0
    out = capsys.readouterr().out
    lines = {line.split(":")[0]: line for line in out.splitlines() if not line.startswith(" ")}
    assert set(lines) == set(ANNOTATORS)
    assert "no weights" in lines["canny"] and "weights: lllyasviel/Annotators (ControlNetHED.pth)" in lines["hed"]
    assert "weights: yzd-v/DWPose (yolox_l.onnx, dw-ll_ucoco_384.onnx)" in lines["dwpose"]
    assert "    low_threshold: int = 100" in out and "    safe_steps: int = 2" in out
    assert "keypoints_<id>" in out


def write_config(tmp_path: Path, tiny: dict, **annotator) -> Path:
    cfg = job_dict(str(tmp_path), str(tmp_path / "out"), tiny)
    cfg["annotators"][1].update(annotator)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_fetch_with_local_models_checks_them(tmp_path, tiny_models, capsys):
    assert main(["models", "fetch", str(write_config(tmp_path, tiny_models)), "--dir", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert f"annotator hed: {tiny_models['annotators']} -> {tiny_models['annotators']} (local: ControlNetHED.pth)" in out
    assert "base_model:" in out and "controlnet canny:" in out
    assert not (tmp_path / "m").exists()  # nothing to download


def test_fetch_for_an_annotate_only_job_needs_no_diffusion_models(tmp_path, tiny_models, capsys):
    cfg = job_dict(str(tmp_path), str(tmp_path / "out"), tiny_models)
    del cfg["generation"]
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["models", "fetch", str(tmp_path / "job.yaml"), "--dir", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "annotator hed:" in out and "base_model" not in out and "controlnet" not in out


def test_fetch_names_a_local_model_without_its_files(tmp_path, tiny_models, capsys):
    config = write_config(tmp_path, tiny_models, name="pidinet", id="hed")  # the tiny directory has no PiDiNet file
    assert main(["models", "fetch", str(config), "--dir", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: annotator hed: model directory") and "table5_pidinet.pth" in err


def test_fetch_from_an_unreachable_hub_fails_with_one_line(tmp_path, tiny_models):
    config = write_config(tmp_path, tiny_models, model="lllyasviel/Annotators")
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2",
           "HF_HUB_DOWNLOAD_TIMEOUT": "2", "HF_HOME": str(tmp_path / "hf")}  # online, to a port nothing listens on
    proc = cli("models", "fetch", config, "--dir", tmp_path / "m", env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    assert "annotator hed: could not fetch ControlNetHED.pth of model 'lllyasviel/Annotators'" in lines[0]


def test_a_missing_model_is_named_by_its_role_in_the_job(tmp_path, tiny_models):
    import pytest

    from pipeline.config import load_config
    from pipeline.job import resolve_models
    from pipeline.models import ModelUnavailable

    cfg = job_dict(str(tmp_path), str(tmp_path / "out"), tiny_models)
    cfg["generation"]["controlnets"][1]["model"] = str(tmp_path / "missing")
    with pytest.raises(ModelUnavailable, match=r"^generation controlnet hed: model directory .*/missing does not exist"):
        resolve_models(load_config(data=cfg))


def _cut_short(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])


def _lfs_pointer(path: Path) -> None:
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 159200\n")


def _one_of_two_shards(folder: Path) -> None:
    (folder / "diffusion_pytorch_model.safetensors").rename(folder / "part-1.safetensors")
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        '{"metadata": {}, "weight_map": {"a": "part-1.safetensors", "b": "part-2.safetensors"}}')


def _wordpiece_only(folder: Path) -> None:
    """A vocabulary of another kind (BERT's vocab.txt): CLIP's tokenizer then knows no word."""
    (folder / "vocab.json").rename(folder / "vocab.txt")
    (folder / "merges.txt").unlink()
    (folder / "tokenizer.json").unlink()


# damage done to a copy of the tiny base model (or its hed ControlNet: `folder` None), what the check says of it
DAMAGE = {
    "no weights": (None, lambda d: (d / "diffusion_pytorch_model.safetensors").unlink(),
                   r"the directory has a config.json but no weights \(diffusion_pytorch_model.safetensors\)"),
    "cut short": (None, lambda d: _cut_short(d / "diffusion_pytorch_model.safetensors"),
                  (r"diffusion_pytorch_model.safetensors is cut short \([\d,]+ bytes, its header describes "
                   r"[\d,]+\): copy it again")),
    "git lfs pointer": ("text_encoder", lambda d: _lfs_pointer(d / "model.safetensors"),
                        r"text_encoder/model.safetensors is a Git LFS pointer, not the weights: fetch them"),
    "shard missing": ("unet", _one_of_two_shards,
                      (r"unet/diffusion_pytorch_model.safetensors.index.json names part-2.safetensors, which is "
                       r"not there")),
    "not an index": ("unet", lambda d: (d / "diffusion_pytorch_model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "diffusion_pytorch_model.safetensors"}}'),
                     r"unet/diffusion_pytorch_model.safetensors.index.json is not a weight index"),
    "component missing": ("tokenizer", shutil.rmtree,
                          r"its model_index.json names a tokenizer \(CLIPTokenizer\), but there is no tokenizer/ folder"),
    "no vocabulary": ("tokenizer", lambda d: [(d / n).unlink() for n in ("merges.txt", "tokenizer.json")],  # vocab.json
                      (r"tokenizer/ holds no vocabulary \(tokenizer.json or vocab.json with merges.txt\), which its "
                       r"CLIPTokenizer reads")),
    "another kind of vocabulary": ("tokenizer", _wordpiece_only,
                                   r"tokenizer/ holds no vocabulary \(tokenizer.json or vocab.json with merges.txt\)"),
    "no scheduler config": ("scheduler", lambda d: (d / "scheduler_config.json").unlink(),
                            r"scheduler/ has no scheduler_config.json, which its DDIMScheduler reads"),
    "model index unreadable": (".", lambda d: (d / "model_index.json").write_text("{"),
                               r"its model_index.json is not readable JSON"),
    "no config": ("unet", lambda d: (d / "config.json").unlink(),
                  r"unet/ has no config.json, which its UNet2DConditionModel reads"),
    "the other library's name": ("text_encoder", lambda d: (d / "model.safetensors").rename(
        d / "diffusion_pytorch_model.safetensors"), r"text_encoder/ has a config.json but no weights \(model.safetensors\)"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_weights_that_cannot_load_are_refused_at_start(tmp_path, tiny_models, damage):
    """Weights missing, cut short or left as Git LFS pointers fail diffusers' loader in every generator actor; the
    job says which file, before any data moves."""
    from pipeline.config import load_config
    from pipeline.job import resolve_models
    from pipeline.models import ModelUnavailable

    folder, harm, says = DAMAGE[damage]
    cfg = job_dict(str(tmp_path), str(tmp_path / "out"), tiny_models)
    copy = tmp_path / "model"
    if folder is None:
        shutil.copytree(tiny_models["controlnet/hed"], copy)
        cfg["generation"]["controlnets"][1]["model"] = str(copy)
        role = "controlnet hed"
    else:
        shutil.copytree(tiny_models["base_model"], copy)
        cfg["generation"]["base_model"] = str(copy)
        role = "base_model"
    resolve_models(load_config(data=cfg))  # intact, it passes
    harm(copy / (folder or ""))
    with pytest.raises(ModelUnavailable, match=rf"^generation {role}: model '.*/model' cannot load: {says}"):
        resolve_models(load_config(data=cfg))


def test_the_weights_check_refuses_only_what_diffusers_cannot_load(tmp_path, tiny_models):
    """The damage the check refuses fails diffusers' own loader, or (a tokenizer's folder gone) makes an empty
    tokenizer of it; what diffusers loads passes: a component the family hands the loader itself (the safety
    checker), a shard index beside a single file (diffusers reads the shards)."""
    import safetensors
    from diffusers import ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTokenizer

    from pipeline.config import load_config
    from pipeline.job import resolve_models

    for damage in ("no weights", "cut short"):
        net = tmp_path / damage
        shutil.copytree(tiny_models["controlnet/hed"], net)
        DAMAGE[damage][1](net)
        with pytest.raises(OSError):
            ControlNetModel.from_pretrained(net)
    net = tmp_path / "older"  # a config without _diffusers_version: still a diffusers model (its _class_name)
    shutil.copytree(tiny_models["controlnet/hed"], net)
    config = json.loads((net / "config.json").read_text())
    del config["_diffusers_version"]
    (net / "config.json").write_text(json.dumps(config))
    ControlNetModel.from_pretrained(net)
    base = tmp_path / "base"
    shutil.copytree(tiny_models["base_model"], base)
    assert len(CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")) > 2
    shutil.rmtree(base / "tokenizer")
    assert len(CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")) == 2  # no vocabulary: every word unknown
    shutil.copytree(Path(tiny_models["base_model"]) / "tokenizer", base / "tokenizer")
    (base / "tokenizer" / "config.json").write_text("{}")  # a stray file: a tokenizer folder holds no weights
    unet = base / "unet"
    shutil.copy(unet / "diffusion_pytorch_model.safetensors", unet / "part-1.safetensors")
    with safetensors.safe_open(unet / "part-1.safetensors", "pt") as f:
        weight_map = dict.fromkeys(f.keys(), "part-1.safetensors")
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _cut_short(unet / "diffusion_pytorch_model.safetensors")  # the single file diffusers does not read
    UNet2DConditionModel.from_pretrained(unet)
    index = json.loads((base / "model_index.json").read_text())
    (base / "model_index.json").write_text(json.dumps(index | {"safety_checker": ["stable_diffusion",
                                                                                  "StableDiffusionSafetyChecker"]}))
    (base / "safety_checker").mkdir()
    shutil.copy(base / "text_encoder" / "config.json", base / "safety_checker" / "config.json")  # no weights
    cfg = job_dict(str(tmp_path), str(tmp_path / "out"), tiny_models)
    cfg["generation"]["base_model"] = str(base)
    cfg["generation"]["controlnets"][1]["model"] = str(net)
    models = resolve_models(load_config(data=cfg)).generation
    assert models["base_model"].local_dir == str(base) and models["controlnets"][1].local_dir == str(net)


@pytest.mark.parametrize(("damage", "says"), [
    (lambda data: data + b"\0" * 100, "is longer than its header says (260 bytes, its header describes 160)"),
    (lambda data: (2**40).to_bytes(8, "little") + data[8:], "has no readable safetensors header"),
    (lambda data: data[:8] + b"{not json" + data[17:], "has no readable safetensors header"),
])
def test_a_safetensors_file_is_judged_by_its_size_and_header_as_the_library_does(tmp_path, damage, says):
    import safetensors
    import safetensors.torch
    import torch

    from pipeline.models import safetensors_problem

    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file({"a": torch.zeros(4), "b": torch.ones(2, 3)}, path)
    assert safetensors_problem(path) is None
    path.write_bytes(damage(path.read_bytes()))
    assert safetensors_problem(path).startswith(says)
    with pytest.raises(safetensors.SafetensorError):
        safetensors.torch.load_file(path)
