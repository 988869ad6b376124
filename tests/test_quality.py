"""The quality gate (pipeline/scorers): metrics against their reference implementations, scores of a
sample generated from its own control map (ideal) and of an unrelated image (floor) on real photographs,
the quality config, and jobs that score, flag and drop with exact accounting, `score` on an existing output,
and the documents."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.io.images import array_to_png
from pipeline.scorers import metrics
from tests.helpers import job_dict, photo

rng = np.random.default_rng(0)


def shapes(size: int = 64) -> np.ndarray:
    """A fixed gray map with structure (a disc, a bar, a gradient) and a little noise, as RGB uint8."""
    y, x = np.mgrid[:size, :size]
    img = np.where((x - size / 3) ** 2 + (y - size / 2) ** 2 < (size / 5) ** 2, 220, 30).astype(np.float64)
    img[size // 8: size // 4, size // 2:] = 160
    img += x * 0.3 + np.random.default_rng(1).normal(0, 6, img.shape)
    return np.repeat(np.clip(img, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)


def as_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(metrics.gray(img))[None, None]


# ---------------------------------------------------------------- metrics = references


def test_edge_f1_equals_torchmetrics_binary_f1():
    from torchmetrics.functional.classification import binary_f1_score

    a = (rng.random((48, 40)) > 0.8).astype(np.uint8) * 255
    b = a.copy()
    b[rng.random(a.shape) > 0.9] ^= 255  # flip 10% of the pixels
    a3, b3 = np.repeat(a[:, :, None], 3, 2), np.repeat(b[:, :, None], 3, 2)
    ref = binary_f1_score(torch.from_numpy(b >= 128).long().flatten(), torch.from_numpy(a >= 128).long().flatten())
    assert metrics.edge_f1(a3, b3) == pytest.approx(float(ref), abs=1e-9)
    assert 0.3 < metrics.edge_f1(a3, b3) < 0.9
    assert metrics.edge_f1(a3, a3) == 1.0
    empty = np.zeros_like(a3)
    assert metrics.edge_f1(empty, empty) == 1.0 and metrics.edge_f1(a3, empty) == 0.0


def test_ssim_and_ms_ssim_equal_torchmetrics():
    from torchmetrics.functional.image import (
        multiscale_structural_similarity_index_measure as tm_ms_ssim,
    )
    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

    a = shapes(64)
    b = np.clip(a.astype(int) + rng.integers(-40, 40, a.shape[:2])[:, :, None], 0, 255).astype(np.uint8)
    ref = tm_ssim(as_tensor(b), as_tensor(a), data_range=255.0)
    assert metrics.ssim(a, b) == pytest.approx(float(ref), abs=1e-9)
    assert metrics.ssim(a, a) == pytest.approx(1.0)

    big_a = shapes(192)
    big_b = np.roll(big_a, 3, axis=1)
    ref = tm_ms_ssim(as_tensor(big_b), as_tensor(big_a), data_range=255.0, normalize="relu")
    assert metrics.ms_ssim(big_a, big_b) == pytest.approx(float(ref), abs=1e-9)
    assert metrics.ssim_auto(big_a, big_b) == metrics.ms_ssim(big_a, big_b)  # multi-scale where the size allows
    assert metrics.ssim_auto(a, b) == metrics.ssim(a, b)
    with pytest.raises(ValueError, match="MS-SSIM needs sides of at least 176"):
        metrics.ms_ssim(a, b)


def test_rmse_equals_scikit_image_and_miou_equals_torchmetrics_jaccard():
    from skimage.metrics import mean_squared_error
    from torchmetrics.functional.classification import multiclass_jaccard_index

    a, b = shapes(40), np.roll(shapes(40), 5, axis=0)
    assert metrics.rmse(a, b) == pytest.approx(np.sqrt(mean_squared_error(a, b)), abs=1e-9)
    assert metrics.rmse(a, a) == 0.0
    assert metrics.rmse(np.zeros_like(a), np.full_like(a, 255)) == 255.0

    palette = np.array([[120, 120, 120], [180, 120, 120], [6, 230, 230], [80, 50, 50]], np.uint8)
    ref_labels = rng.integers(0, 3, (32, 24))  # classes 0..2
    cand_labels = np.where(rng.random((32, 24)) > 0.7, rng.integers(1, 4, (32, 24)), ref_labels)  # 3 only here
    ref_map, cand_map = palette[ref_labels], palette[cand_labels]
    r, c, k = metrics.color_classes(ref_map, cand_map)
    assert k == 4
    expected = multiclass_jaccard_index(torch.from_numpy(c), torch.from_numpy(r), num_classes=k, average="macro")
    assert metrics.miou(ref_map, cand_map) == pytest.approx(float(expected), abs=1e-6)  # torchmetrics: float32
    assert metrics.miou(ref_map, ref_map) == 1.0


def test_angular_error_and_sharpness_on_known_values():
    from scipy.ndimage import laplace

    up = np.zeros((8, 8, 3), np.float64)
    up[..., 2] = 1.0  # +z
    side = np.zeros_like(up)
    side[..., 0] = 1.0  # +x: 90 degrees away
    encode = lambda n: np.round((n + 1) / 2 * 255).astype(np.uint8)
    assert metrics.angular_error(encode(up), encode(up)) == pytest.approx(0.0, abs=1e-6)
    assert metrics.angular_error(encode(up), encode(side)) == pytest.approx(90.0, abs=0.5)
    assert metrics.angular_error(encode(up), encode(-up)) == pytest.approx(180.0, abs=1.0)  # 8-bit: 0 is 128

    image = photo("camera", (64, 64))
    assert metrics.laplacian_variance(image) == pytest.approx(laplace(metrics.gray(image), mode="mirror").var())
    import cv2

    assert metrics.laplacian_variance(cv2.GaussianBlur(image, (7, 7), 3)) < metrics.laplacian_variance(image) / 4
    assert metrics.laplacian_variance(np.full((32, 32, 3), 90, np.uint8)) == 0.0


def openpose_doc(*people: list[tuple[float, float, float]]) -> str:
    return json.dumps({"people": [{"pose_keypoints_2d": [v for p in person for v in p]} for person in people],
                       "canvas_width": 100, "canvas_height": 100})


def test_pose_pck_pairs_people_and_counts_the_missing_and_the_extra():
    a = [(10, 10, 1), (10, 50, 1), (30, 50, 0.8), (0, 0, 0)]  # box 20 x 40: tolerance 0.2 * 40 = 8 px
    b = [(60, 10, 1), (60, 50, 1), (80, 50, 1), (70, 70, 1)]
    near_a = [(14, 10, 1), (10, 57, 1), (30, 70, 1), (50, 50, 1)]  # 2 of a's 3 visible points within 8 px
    assert metrics.pose_pck(openpose_doc(a, b), openpose_doc(b, a)) == (1.0, {"people_expected": 2, "people_found": 2})
    assert metrics.pose_pck(openpose_doc(a), openpose_doc(near_a))[0] == pytest.approx(2 / 3)
    assert metrics.pose_pck(openpose_doc(a, b), openpose_doc(a))[0] == 0.5  # one person missing
    assert metrics.pose_pck(openpose_doc(a), openpose_doc(a, b)) == (0.5, {"people_expected": 1, "people_found": 2})
    assert metrics.pose_pck(openpose_doc(), openpose_doc()) == (1.0, {"people_expected": 0, "people_found": 0})
    assert metrics.pose_pck(openpose_doc(a), openpose_doc())[0] == 0.0
    assert metrics.pose_pck(openpose_doc(a), openpose_doc(a), alpha=0.01)[0] == 1.0


# ---------------------------------------------------------------- the scorer on real photographs


def quality_cfg(tmp_path, annotators: list[dict], **quality):
    """A job config with these annotators and a quality section (its models are never loaded here)."""
    tiny = {"base_model": str(tmp_path), "annotators": str(tmp_path), "controlnet/canny": str(tmp_path),
            "controlnet/hed": str(tmp_path)}
    data = job_dict(str(tmp_path), str(tmp_path / "out"), tiny)
    data["annotators"] = annotators
    data["generation"]["controlnets"] = [{"condition": a.get("id", a["name"]), "model": str(tmp_path)}
                                         for a in annotators]
    data["quality"] = quality
    return load_config(data=data)


NEURAL = ("depth_anything", "seg_ade20k", "dwpose")


def test_a_sample_generated_from_its_own_control_map_scores_ideal_and_another_image_the_floor(tmp_path, annotator_weights):
    from pipeline.annotators import ANNOTATORS
    from pipeline.models import resolve_model
    from pipeline.scorers.stage import Scorer

    annotators = [{"name": "canny"}, {"name": "lineart_standard"}, {"name": "scribble_xdog"}, {"name": "tile"},
                  {"name": "color"}] + [{"name": n, "model": annotator_weights(n)} for n in NEURAL]
    cfg = quality_cfg(tmp_path, annotators, sharpness=True, min={"canny": 0.5, "lineart_standard": 0.5},
                      max={"depth_anything": 1.0})
    models = {}
    for a in cfg.annotators:
        cls = ANNOTATORS[a.name]
        models[a.key] = resolve_model(a.model, None, cls.files[0], False, cls.files) if a.model else None
    scorer = Scorer(cfg, models, None, device="cpu")
    sources = [photo("astronaut", (96, 64))]  # a person, for the pose annotator
    rows = []
    for i, source in enumerate(sources):
        row = {"sample_id": f"s{i}", "prompt": "a photo", "image": array_to_png(source)}
        for a in cfg.annotators:  # as the annotate stage writes them
            maps, extras = scorer.annotators[a.key].annotate_with_extras([source])
            row[f"control_{a.key}"] = array_to_png(maps[0])
            if extras[0] is not None:
                row[f"keypoints_{a.key}"] = extras[0]
        rows.append(row)
    ideal = scorer.score([{**r, "generated": r["image"]} for r in rows])
    unrelated = np.asarray(np.random.default_rng(3).integers(0, 256, (64, 96, 3)), np.uint8)
    floor = scorer.score([{**rows[0], "generated": array_to_png(unrelated)},
                          {**rows[0], "generated": array_to_png(photo("coffee", (96, 64)))}])  # another photograph
    for row in ideal:
        assert row["score_canny"] == 1.0 and row["score_lineart_standard"] == pytest.approx(1.0)
        assert row["score_scribble_xdog"] == pytest.approx(1.0) and row["score_tile"] == pytest.approx(1.0)
        assert row["score_color"] == 0.0 and row["score_depth_anything"] == 0.0
        assert row["score_seg_ade20k"] == 1.0 and row["score_dwpose"] == 1.0
        assert row["passed"] is True
        people = json.loads(row["score_provenance"])["details"]["dwpose"]
        assert people["people_expected"] == people["people_found"]
    for row in floor:
        assert row["score_canny"] < 0.35  # noise has edges everywhere: F1 about 2r/(1 + r) for edge density r
        assert row["score_lineart_standard"] < 0.5 and row["score_scribble_xdog"] < 0.5
        assert row["score_color"] > 20 and row["score_tile"] < 0.2
        assert row["score_depth_anything"] > 20 and row["score_seg_ade20k"] < 0.1
        assert row["passed"] is False
    assert floor[0]["sharpness_score"] > ideal[0]["sharpness_score"]  # noise is all edges
    prov = json.loads(ideal[0]["score_provenance"])
    assert prov["conditions"]["canny"]["metric"] == "edge_f1"
    assert prov["conditions"]["depth_anything"]["annotator"]["model"] == models["depth_anything"].model
    assert prov["conditions"]["depth_anything"]["annotator"]["revision"] == models["depth_anything"].commit
    assert prov["min"] == {"canny": 0.5, "lineart_standard": 0.5} and prov["scored_by"] == "run"


def test_clip_score_equals_torchmetrics_clip_score(tmp_path):
    from torchmetrics.functional.multimodal import clip_score
    from transformers import CLIPModel, CLIPProcessor

    from pipeline.models import resolve_model
    from pipeline.scorers.clip import FILES, PROBE, ClipScorer
    from pipeline.testing.clip import write_clip

    directory = write_clip(tmp_path / "clip")
    scorer = ClipScorer(resolve_model(directory, None, PROBE, False, FILES))
    images = [photo("chelsea", (64, 48)), photo("rocket", (64, 48))]
    prompts = ["a photo of the cat", "a rocket"]
    ours = scorer(images, prompts)

    class FeaturesAsTensors(CLIPModel):
        """transformers v5's get_*_features return an output object (the projected embeddings in
        pooler_output); torchmetrics 1.9 expects the tensor of transformers v4. Nothing else changes."""

        def get_image_features(self, *args, **kwargs):
            return super().get_image_features(*args, **kwargs).pooler_output

        def get_text_features(self, *args, **kwargs):
            return super().get_text_features(*args, **kwargs).pooler_output

    reference = (FeaturesAsTensors.from_pretrained(directory), CLIPProcessor.from_pretrained(directory))
    for image, prompt, value in zip(images, prompts, ours):
        ref = clip_score(torch.from_numpy(image).permute(2, 0, 1), prompt, model_name_or_path=lambda: reference)
        assert 100 * max(value, 0.0) == pytest.approx(float(ref), abs=1e-3)
    assert ours[0] != ours[1] and max(ours) > 0.05  # a positive score is compared, not only the clamp at 0


def test_a_row_that_cannot_be_scored_becomes_an_error_row_and_the_batch_goes_on(tmp_path):
    from pipeline.rows import table_of
    from pipeline.scorers.stage import Score

    cfg = quality_cfg(tmp_path, [{"name": "canny"}], min={"canny": 0.1})
    source = photo("coffee", (64, 48))
    control = array_to_png(Score(cfg, {}, None).scorer.annotators["canny"].annotate([source])[0])
    rows = [{"sample_id": "good", "prompt": "p", "control_canny": control, "generated": array_to_png(source)},
            {"sample_id": "bad", "prompt": "p", "control_canny": control, "generated": b"not a png"}]
    out = {r["sample_id"]: r for r in Score(cfg, {}, None)(table_of(rows)).to_pylist()}
    assert out["good"]["score_canny"] == 1.0 and out["good"]["passed"] is True and out["good"]["error_stage"] is None
    assert out["bad"]["error_stage"] == "score" and out["bad"]["score_canny"] is None


def test_a_scoring_actor_on_cpu_runs_torch_on_the_threads_of_its_config(tmp_path):
    """`quality.num_cpus` sets a scoring actor's torch threads (Ray's claim may have been scaled down); a Ray task
    (no actor: weight-free scoring) leaves the process's threads alone."""
    import torch

    from pipeline.scorers.stage import Score

    cfg = quality_cfg(tmp_path, [{"name": "canny"}], min={"canny": 0.1})
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        Score(cfg, {}, None)
        assert torch.get_num_threads() == 1
        Score(cfg, {}, None, num_cpus=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("quality, message", [
    ({"min": {"canny": 0.3}, "action": "keep"}, "quality.action"),
    ({"min": {"hed": 0.3}, "speed": 1}, "quality.speed: unknown key"),
    ({"max": {"canny": 0.3}}, "quality.max.canny: higher is better for this score; give its threshold under quality.min"),
    ({"min": {"depth": 0.3}}, "quality.min.depth: not a scored condition"),
    ({"min": {"clip": 0.2}}, "quality.min.clip: set quality.clip_model"),
    ({"min": {"sharpness": 10}}, "quality.min.sharpness: set quality.sharpness=true"),
    ({"conditions": ["nope"]}, "quality.conditions.0: 'nope' is not an annotator id"),
    ({"min": {"hed": 0.3}, "conditions": ["canny"]}, "quality.min.hed: not a scored condition"),
    # a threshold outside its score's range passes every sample or none
    ({"min": {"canny": 30}}, "quality.min.canny: 30 is outside the score's range 0..1, so every sample would fail"),
    ({"min": {"clip": 25}, "clip_model": "x"}, ("quality.min.clip: 25 is outside the score's range -1..1 (torchmetrics' "
                                                "CLIPScore is 100 times this score), so every sample would fail")),
    ({"min": {"hed": -2}}, "quality.min.hed: -2 is outside the score's range -1..1, so every sample would pass"),
    ({"min": {"canny": True}}, "quality.min: canny: true is a yes/no value, not a number"),  # YAML's `yes`
])
def test_quality_config_errors_name_the_key(tmp_path, quality, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        quality_cfg(tmp_path, [{"name": "canny"}, {"name": "hed", "model": str(tmp_path)}], **quality)


def test_quality_needs_generation_and_depth_bounds_are_maxima(tmp_path):
    data = job_dict(str(tmp_path), str(tmp_path / "out"), {"base_model": "x", "annotators": "y", "controlnet/canny": "z",
                                                           "controlnet/hed": "w"})
    data.pop("generation")
    data["quality"] = {"min": {"canny": 0.3}}
    with pytest.raises(ConfigError, match="quality: needs a generation section"):
        load_config(data=data)
    cfg = quality_cfg(tmp_path, [{"name": "depth_anything", "model": str(tmp_path)}], max={"depth_anything": 20})
    assert cfg.quality.max == {"depth_anything": 20}
    with pytest.raises(ConfigError, match=r"quality\.min\.depth_anything: higher is worse"):
        quality_cfg(tmp_path, [{"name": "depth_anything", "model": str(tmp_path)}], min={"depth_anything": 20})


# ---------------------------------------------------------------- jobs: score, flag, drop, resume, `score`, documents


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> str:
    from pipeline.testing.clip import write_clip

    return write_clip(tmp_path_factory.mktemp("clip"))


def quality_job(photos_dir, out, tiny_models, clip_dir, **quality) -> dict:
    data = job_dict(str(photos_dir), str(out), tiny_models)
    data["quality"] = {"clip_model": clip_dir, "sharpness": True, **quality}
    return data


@pytest.fixture(scope="module")
def flagged(ray_session, tiny_models, photos_dir, clip_dir, tmp_path_factory):
    """A run that scores every sample and flags (thresholds every sample meets, one per kind of score)."""
    from pipeline.job import run

    out = tmp_path_factory.mktemp("quality") / "flag"
    cfg = load_config(data=quality_job(photos_dir, out, tiny_models, clip_dir,
                                       min={"canny": 0.0, "clip": -1.0, "sharpness": 0.0}, action="flag"))
    return out, run(cfg, echo=lambda s: None), cfg


def scores_of(out, kind: str = "samples", columns=("sample_id", "score_canny", "passed")) -> list[dict]:
    from tests.helpers import read_parquet_dir

    return read_parquet_dir(out / kind, list(columns)).to_pylist()


def test_a_job_with_quality_scores_every_sample_with_provenance_in_the_documented_schema(flagged, clip_dir):
    import pyarrow.parquet as pq

    from pipeline.schema import samples_schema
    from pipeline.scorers.stage import score_columns
    from tests.helpers import read_parquet_dir

    out, result, cfg = flagged
    assert result.manifest["counts"]["samples"] == 10 and result.errors == 0
    assert not (out / "rejected").exists()
    table = read_parquet_dir(out / "samples")
    expected = samples_schema(["canny", "hed"], [], "sd15", score_columns(cfg))
    assert pq.read_schema(next((out / "samples").glob("*.parquet"))).remove_metadata() == expected.remove_metadata()
    assert [c for c in table.schema.names if "score" in c or c == "passed"] == [
        "score_canny", "score_hed", "clip_score", "sharpness_score", "passed", "score_provenance"]
    for row in table.select(["score_canny", "score_hed", "clip_score", "sharpness_score", "passed",
                             "score_provenance"]).to_pylist():
        assert 0.0 <= row["score_canny"] <= 1.0 and -1.0 <= row["score_hed"] <= 1.0
        assert -1.0 <= row["clip_score"] <= 1.0 and row["sharpness_score"] > 0
        assert row["passed"] is True
        prov = json.loads(row["score_provenance"])
        assert prov["conditions"]["hed"]["metric"] == "ssim"
        assert prov["conditions"]["hed"]["annotator"]["weights_file"] == "ControlNetHED.pth"
        assert prov["clip"]["model"] == clip_dir and prov["clip"]["commit"].startswith("sha256:")
    assert len(set(table.column("score_canny").to_pylist())) > 1  # scored per sample, not a constant
    quality = result.manifest["quality"]
    assert quality["min"] == {"canny": 0.0, "clip": -1.0, "sharpness": 0.0} and quality["scored_by"] == "run"
    assert result.manifest["models"]["scorers"]["clip"]["local_dir"] == clip_dir


def test_score_columns_round_trip_through_load_dataset(flagged):
    import datasets

    from tests.helpers import read_parquet_dir

    out, _, _ = flagged
    ds = datasets.load_dataset("parquet", data_files=str(out / "samples" / "*.parquet"), split="train")
    table = read_parquet_dir(out / "samples", ["sample_id", "score_canny", "clip_score", "passed"])
    by_id = {r["sample_id"]: r for r in table.to_pylist()}
    assert ds.features["score_canny"].dtype == "float64" and ds.features["passed"].dtype == "bool"
    for row in ds.select_columns(["sample_id", "score_canny", "clip_score", "passed"]):
        assert row == by_id[row["sample_id"]]


def test_inspect_report_and_card_show_distributions_extremes_and_thresholds(flagged):
    from pipeline.docs import inspect_text

    out, _, _ = flagged
    text = inspect_text(str(out))
    quality = text[text.index("\nquality:"):]
    for column in ("score_canny", "score_hed", "clip_score", "sharpness_score"):
        assert f"  {column} (" in quality
    assert "score_canny (edge_f1, higher is better; min 0: 0 below): n 10, min " in quality
    assert quality.count("    worst: ") == 4 and quality.count("    best: ") == 4
    html = (out / "report.html").read_text()
    assert html.count('alt="histogram of ') == 4 and html.count('src="data:image/png;base64,') >= 4
    assert html.count('<figure class="worst">') == 4 * 3 and html.count('<figure class="best">') == 4 * 3
    import mlcroissant as mlc

    dataset = mlc.Dataset(jsonld=str(out / "croissant.json"))  # the score columns are Croissant fields too
    assert not dataset.metadata.ctx.issues.errors
    records = list(dataset.records("samples"))
    assert len(records) == 10 and {r["samples/passed"] for r in records} == {True}
    assert all(0.0 <= r["samples/score_canny"] <= 1.0 for r in records)
    card = (out / "README.md").read_text()
    assert "## Quality gate" in card and "| `canny` | ≥ 0.0 |" in card and "| `clip` | ≥ -1.0 |" in card


def test_score_command_regates_an_existing_output_in_place_with_nothing_lost(flagged, tmp_path):
    import shutil

    from pipeline.cli import main
    from pipeline.io.output import RunOutput

    import pyarrow as pa
    import pyarrow.parquet as pq

    source, result, _ = flagged
    out = tmp_path / "scored"
    shutil.copytree(source, out)
    for path in (out / "samples").glob("*.parquet"):  # as a run with a captioner writes them: its record per row
        table = pq.read_table(path)
        pq.write_table(table.append_column("captioner", pa.array(['{"kind": "blip"}'] * len(table))), path)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["config"]["captioner"] = {"kind": "blip"}
    (out / "manifest.json").write_text(json.dumps(manifest))
    columns = set(pq.read_schema(next((out / "samples").glob("*.parquet"))).names)
    before = {r["sample_id"]: r["score_canny"] for r in scores_of(out)}
    threshold = float(np.median(list(before.values())))
    assert main(["score", str(out), "--set", "quality.action=drop", "--set", f"quality.min.canny={threshold}"]) == 0
    kept, rejected = scores_of(out), scores_of(out, "rejected")
    assert kept and rejected
    assert sorted(r["sample_id"] for r in kept + rejected) == sorted(before)  # every sample, once
    assert all(r["passed"] and r["score_canny"] >= threshold for r in kept)
    assert all(not r["passed"] and r["score_canny"] < threshold for r in rejected)
    assert {r["sample_id"]: r["score_canny"] for r in kept + rejected} == pytest.approx(before)  # same annotators
    manifest = RunOutput(str(out)).manifest()
    counts = manifest["counts"]
    assert (counts["samples"], counts["rejected_samples"]) == (len(kept), len(rejected))
    assert counts["inputs"] == result.manifest["counts"]["inputs"] and counts["duplicate_sample_ids"] == 0
    assert manifest["quality"]["scored_by"] == "python -m pipeline score"
    assert manifest["quality"]["min"]["canny"] == threshold
    prov = json.loads(read_one(out / "rejected", "score_provenance"))
    assert prov["scored_by"] == "python -m pipeline score" and prov["action"] == "drop"
    assert f"| `canny` | ≥ {threshold} |" in (out / "README.md").read_text()
    for kind in ("samples", "rejected"):  # every column kept, the captioner's record too
        assert {r["captioner"] for r in scores_of(out, kind, ["captioner"])} == {'{"kind": "blip"}'}
        assert set(pq.read_schema(next((out / kind).glob("*.parquet"))).names) == columns

    # flagging again brings the rejected samples back: rejected/ goes away, nothing is lost
    assert main(["score", str(out), "--set", "quality.action=flag"]) == 0
    assert not (out / "rejected").exists()
    again = scores_of(out)
    assert sorted(r["sample_id"] for r in again) == sorted(before)
    assert sorted(r["passed"] for r in again) == sorted([False] * len(rejected) + [True] * len(kept))
    assert "rejected_samples" not in RunOutput(str(out)).manifest()["counts"]


def read_one(directory, column):
    from tests.helpers import read_parquet_dir

    return read_parquet_dir(directory, [column]).column(column)[0].as_py()


@pytest.mark.parametrize("args, message", [
    (["--set", "generation.steps=3"], "only keys of the quality section can change when scoring"),
    (["--set", "quality.min.depth=3"], "quality.min.depth: not a scored condition"),
    (["--set", "quality.colour=1"], "quality.colour: unknown key"),
    (["--set", "quality"], "--set 'quality': expected KEY=VALUE"),
])
def test_score_command_refuses_other_settings_with_the_key(flagged, args, message, capsys):
    from pipeline.cli import main

    out, _, _ = flagged
    assert main(["score", str(out), *args]) == 2
    assert message in capsys.readouterr().err


def test_drop_routes_failing_samples_to_rejected_with_exact_accounting_and_a_resume_skips_them(
        flagged, ray_session, tiny_models, photos_dir, clip_dir, tmp_path):
    from pipeline.io.output import RunOutput
    from pipeline.job import run

    threshold = float(np.median([r["score_canny"] for r in scores_of(flagged[0])]))
    out = tmp_path / "drop"
    cfg = load_config(data=quality_job(photos_dir, out, tiny_models, clip_dir, min={"canny": threshold},
                                       action="drop"))
    result = run(cfg, echo=lambda s: None)
    kept, rejected = scores_of(out), scores_of(out, "rejected")
    assert kept and rejected  # the median of the flagged run splits this run's samples too
    assert all(r["passed"] and r["score_canny"] >= threshold for r in kept)
    assert all(r["passed"] is False and r["score_canny"] < threshold for r in rejected)
    counts = result.manifest["counts"]
    # inputs = samples + rejected + errors (variants_per_image 2, no failed inputs here)
    assert counts["inputs"] == 5 and counts["samples"] + counts["rejected_samples"] + counts["failed_samples"] == 10
    assert (counts["samples"], counts["rejected_samples"]) == (len(kept), len(rejected))
    assert result.manifest["this_run"] == {"samples": len(kept), "errors": 0, "rejected": len(rejected)}

    manifest = RunOutput(str(out)).manifest()  # as after an interruption: the same command resumes
    manifest["completed"] = False
    (out / "manifest.json").write_text(json.dumps(manifest))
    again = run(cfg, echo=lambda s: None)
    assert again.manifest["this_run"] == {"samples": 0, "errors": 0, "rejected": 0}
    assert again.manifest["counts"] == counts


def test_a_resume_gates_its_new_samples_as_score_last_gated_the_output(flagged, ray_session, tiny_models, photos_dir,
                                                                       tmp_path, capsys):
    """A job without a quality section, gated afterwards by `score`: the inputs added later are scored and gated
    with score's thresholds, so the output keeps one rule and one schema."""
    import shutil

    import pyarrow.parquet as pq

    from pipeline.cli import main
    from pipeline.io.output import RunOutput
    from pipeline.job import run

    threshold = float(np.median([r["score_canny"] for r in scores_of(flagged[0])]))
    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    names = sorted(p.name for p in photos_dir.iterdir())
    for name in names[:2]:
        shutil.copy(photos_dir / name, photos / name)
    cfg = load_config(data=job_dict(str(photos), str(out), tiny_models))
    run(cfg, echo=lambda s: None)
    assert main(["score", str(out), "--set", f"quality.min.canny={threshold}", "--set", "quality.action=drop"]) == 0
    for added in (names[2:4], names[4:]):  # more inputs, twice: the same job resumes, and again
        for name in added:
            shutil.copy(photos_dir / name, photos / name)
        lines = []
        again = run(cfg, echo=lines.append)
        assert f"new samples are gated as `score` last gated the output (canny >= {threshold}, drop)" in \
            "\n".join(lines)
    kept, rejected = scores_of(out), scores_of(out, "rejected")
    assert len(kept) + len(rejected) == 2 * len(names)
    assert again.manifest["this_run"]["samples"] + again.manifest["this_run"]["rejected"] == 2  # the last input's
    assert all(r["passed"] and r["score_canny"] >= threshold for r in kept)
    assert all(r["passed"] is False and r["score_canny"] < threshold for r in rejected)
    schemas = {tuple(pq.read_schema(f).names) for kind in ("samples", "rejected") for f in (out / kind).glob("*.parquet")}
    assert len(schemas) == 1  # every part file with the score columns
    quality = RunOutput(str(out)).manifest()["quality"]
    assert (quality["min"], quality["action"]) == ({"canny": threshold}, "drop")


def test_the_clip_model_is_fetched_listed_and_checked_by_its_role(tiny_models, photos_dir, clip_dir, tmp_path):
    import shutil

    from pipeline.fetch import fetch
    from pipeline.job import model_roles, resolve_models
    from pipeline.models import ModelUnavailable

    cfg = load_config(data=quality_job(photos_dir, tmp_path / "out", tiny_models, clip_dir, min={"clip": 0.1}))
    fetched = {f.role: f for f in fetch(cfg, tmp_path / "models")}
    assert fetched["scorer clip"].path == clip_dir and not fetched["scorer clip"].downloaded
    assert dict(model_roles(cfg, resolve_models(cfg)))["quality clip_model"].local_dir == str(Path(clip_dir).resolve())
    shutil.copytree(clip_dir, tmp_path / "clip")
    (tmp_path / "clip" / "model.safetensors").unlink()
    damaged = load_config(data=quality_job(photos_dir, tmp_path / "out", tiny_models, str(tmp_path / "clip")))
    with pytest.raises(ModelUnavailable, match=r"^quality clip_model: model .* cannot load: the directory has a "
                                               r"config.json but no weights \(model.safetensors\)"):
        resolve_models(damaged)
    shutil.copy(Path(clip_dir) / "model.safetensors", tmp_path / "clip")
    for name in ("tokenizer.json", "vocab.json"):  # transformers would make a tokenizer that knows no word
        (tmp_path / "clip" / name).unlink(missing_ok=True)
    with pytest.raises(ModelUnavailable, match=r"^quality clip_model: .* the directory holds no tokenizer vocabulary"):
        resolve_models(damaged)
    for name in ("tokenizer.json", "vocab.json"):
        shutil.copy(Path(clip_dir) / name, tmp_path / "clip")
    for name in ("preprocessor_config.json", "processor_config.json"):  # CLIPProcessor cannot load
        (tmp_path / "clip" / name).unlink(missing_ok=True)
    with pytest.raises(ModelUnavailable, match=r"^quality clip_model: .* the directory has no image processor config"):
        resolve_models(damaged)


def test_score_command_scores_an_output_written_before_the_gate_existed(flagged, tmp_path, capsys):
    import shutil

    import pyarrow.parquet as pq

    from pipeline.cli import main

    source, _, _ = flagged
    out = tmp_path / "old"
    shutil.copytree(source, out)
    gate = ["score_canny", "score_hed", "clip_score", "sharpness_score", "passed", "score_provenance"]
    for path in (out / "samples").glob("*.parquet"):  # as a run without a quality section wrote them
        pq.write_table(pq.read_table(path).drop_columns(gate), path)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["quality"]
    manifest["config"]["quality"] = None  # as a run without a quality section writes its config
    (out / "manifest.json").write_text(json.dumps(manifest))
    before = {r["sample_id"]: r["score_canny"] for r in scores_of(source)}

    assert main(["score", str(out)]) == 2
    assert "the run has no quality section: give one with --set" in capsys.readouterr().err
    assert main(["score", str(out), "--set", "quality.min.hed=0.0"]) == 0
    table = pq.read_table(next((out / "samples").glob("*.parquet")))
    assert [c for c in table.schema.names if c in gate] == ["score_canny", "score_hed", "passed", "score_provenance"]
    assert {r["sample_id"]: r["score_canny"] for r in scores_of(out)} == pytest.approx(before)
    assert all(r["passed"] for r in scores_of(out))
