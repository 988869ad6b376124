"""`python -m pipeline annotators` and `python -m pipeline models fetch`, offline."""

from pathlib import Path

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
