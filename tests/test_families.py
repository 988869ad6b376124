"""Generator families and modes against diffusers itself: for every family and mode, the rows equal diffusers'
own pipeline called directly with the row's recorded inputs; config refusals; one end-to-end job per family.
Tiny models (64 px, 2 steps) are written once per session."""

import io
import json
import shutil
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.annotators import ANNOTATORS
from pipeline.config import ConfigError, load_config
from pipeline.generators import generator_class
from pipeline.generators._controlnet import make_scheduler
from pipeline.ids import sample_identity
from pipeline.io.images import array_to_png, png_to_array
from pipeline.job import resolve_models
from pipeline.models import ModelUnavailable, resolve_model
from tests.helpers import photo, read_parquet_dir

MODES = ("text2img", "img2img", "inpaint")
FAMILY_MODES = [(f, m) for f in ("sd15", "sdxl", "sdxl_union", "flux") for m in MODES] + [("sd3", "text2img")]
ADE_PERSON = 12


@pytest.fixture(scope="session")
def family_models(tmp_path_factory) -> dict[str, str]:
    from pipeline.testing import make_tiny

    return make_tiny(tmp_path_factory.mktemp("family-models"), conditions=("canny", "scribble_xdog"), seed=0,
                     annotators=["seg_ade20k"], families="all")


def base_and_controlnets(models: dict[str, str], family: str, union: bool = False) -> tuple[str, list[str]]:
    """The tiny base model and the two conditions' ControlNets (one shared Union network with `union`)."""
    if family == "sd15":
        return models["base_model"], [models["controlnet/canny"], models["controlnet/scribble_xdog"]]
    if family == "sdxl_union" or union:
        return models[f"{family}/base_model"], [models[f"{family}/controlnet"]] * 2
    return models[f"{family}/base_model"], [models[f"{family}/controlnet/{c}"] for c in ("canny", "scribble_xdog")]


def job(models, family: str, source="/unused", output="/unused", union=False, **generation) -> dict:
    base, (cn1, cn2) = base_and_controlnets(models, family, union)
    return {
        "seed": 3,
        "source": {"type": "images", "path": source},
        "image": {"resolution": 64, "multiple_of": 16 if family == "flux" else 8},
        "annotators": [{"name": "canny"}, {"name": "scribble_xdog"}, {"name": "openpose"}],
        "generation": {
            "family": family, "base_model": base, "steps": 2, "batch_size": 4,
            "controlnets": [{"condition": "canny", "model": cn1},
                            {"condition": "scribble_xdog", "model": cn2, "conditioning_scale": 0.5, "guidance_end": 0.8}],
            **generation,
        },
        "output": {"path": output},
    }


def generator(models, family, union=False, **generation):
    cfg = load_config(data=job(models, family, union=union, **generation))
    refs = generator_class(family).model_refs(cfg.generation)
    resolve = lambda r: resolve_model(r.model, r.revision, r.probe, True)
    resolved = {k: [resolve(r) for r in v] if isinstance(v, list) else resolve(v) for k, v in refs.items()}
    return generator_class(family)(cfg.generation, resolved)


def make_rows() -> list[dict]:
    """Rows as they reach the generator: 64 px, two conditions, keypoints, and two different original sizes."""
    canny, xdog = ANNOTATORS["canny"]({}), ANNOTATORS["scribble_xdog"]({})
    rows = []
    for i, (name, original) in enumerate([("astronaut", [512, 512]), ("coffee", [400, 300]), ("chelsea", [451, 300])]):
        image = photo(name, (64, 64))
        _, seed = sample_identity(0, name, i)
        people = [{"pose_keypoints_2d": [20.0, 10.0, 0.9, 40.0, 50.0, 0.8, 0, 0, 0], "hand_left_keypoints_2d": []}]
        rows.append({
            "width": 64, "height": 64, "image": array_to_png(image), "seed": seed, "sample_id": f"s{i}",
            "prompt": f"a photo of {name}", "negative_prompt": "blurry",
            "transform": json.dumps({"original_size": original, "exif_orientation": 1, "size": [64, 64]}),
            "control_canny": array_to_png(canny.annotate([image])[0]),
            "control_scribble_xdog": array_to_png(xdog.annotate([image])[0]),
            "keypoints_openpose": json.dumps({"people": people, "canvas_width": 64, "canvas_height": 64}),
        })
    return rows


def pil(png: bytes) -> Image.Image:
    return Image.open(io.BytesIO(png)).convert("RGB")


NETS = {"sd15": ("ControlNetModel", "MultiControlNetModel"), "sdxl": ("ControlNetModel", "MultiControlNetModel"),
        "flux": ("FluxControlNetModel", "FluxMultiControlNetModel"), "sd3": ("SD3ControlNetModel", "SD3MultiControlNetModel")}


def diffusers_images(models, family: str, mode: str, out: list[dict], union: bool = False) -> list[np.ndarray]:
    """diffusers' own pipeline, loaded from the same directories and called the way its docs show, one call
    per row, with that row's recorded inputs (sizes, control modes, mask, strength, scheduler)."""
    base, nets = base_and_controlnets(models, family, union)
    cls = getattr(diffusers, out[0]["pipeline_class"])
    if family == "sdxl_union":
        controlnet = diffusers.ControlNetUnionModel.from_pretrained(nets[0])
    elif union:  # Flux Union: one network for both conditions
        controlnet = diffusers.FluxMultiControlNetModel([diffusers.FluxControlNetModel.from_pretrained(nets[0])])
    else:
        net, multi = NETS[family]
        controlnet = getattr(diffusers, multi)([getattr(diffusers, net).from_pretrained(n) for n in nets])
    extra = {"sd15": {"safety_checker": None}, "sdxl": {"add_watermarker": False},
             "sdxl_union": {"add_watermarker": False}}.get(family, {})
    pipe = cls.from_pretrained(base, controlnet=controlnet, **extra)
    if out[0]["scheduler"] == "unipc":
        pipe.scheduler = make_scheduler("unipc", pipe.scheduler.config)
    assert type(pipe.scheduler).__name__ == out[0]["scheduler_class"]
    pipe.set_progress_bar_config(disable=True)
    images = []
    for row in out:
        controls = [pil(row["control_canny"]), pil(row["control_scribble_xdog"])]
        kw = {"prompt": row["prompt"], "width": 64, "height": 64,
                  "num_inference_steps": row["num_inference_steps"], "guidance_scale": row["guidance_scale"],
                  "controlnet_conditioning_scale": row["controlnet_conditioning_scale"],
                  "control_guidance_start": row["control_guidance_start"], "control_guidance_end": row["control_guidance_end"],
                  "generator": torch.Generator().manual_seed(row["seed"]), "output_type": "pil"}
        if not (family == "flux" and mode != "text2img"):  # Flux img2img/inpaint take no negative prompt
            kw["negative_prompt"] = row["negative_prompt"]
        if family in ("sd15", "sdxl") and mode == "text2img":
            kw["image"] = controls
        else:
            kw["control_image"] = controls
        if row.get("control_modes") is not None:
            kw["control_mode"] = row["control_modes"]
        elif family == "flux":  # several non-Union Flux nets: diffusers' img2img/inpaint need one None per net
            kw["control_mode"] = [None, None]
        if family in ("sdxl", "sdxl_union"):
            kw |= {k: tuple(row[k]) for k in ("original_size", "target_size", "crops_coords_top_left")}
        if family == "flux" and mode == "text2img":
            kw["true_cfg_scale"] = row["true_cfg_scale"]
        if mode != "text2img":
            kw |= {"image": pil(row["image"]), "strength": row["strength"]}
        if mode == "inpaint":
            kw["mask_image"] = Image.open(io.BytesIO(row["inpaint_mask"]))
        if family == "sd3":  # its pipeline samples the control latent from the global RNG: seeded per row
            torch.manual_seed(row["seed"])
        images.append(np.asarray(pipe(**kw).images[0]))
    return images


MASK = {"annotator": "openpose", "repaint": "outside"}


@pytest.mark.parametrize("family, mode", FAMILY_MODES)
def test_rows_equal_diffusers_called_directly(family_models, family, mode):
    extra = {"mode": mode} | ({"strength": 0.7} if mode != "text2img" else {}) | ({"mask": MASK} if mode == "inpaint" else {})
    gen = generator(family_models, family, **extra)
    rows = make_rows()
    out = gen.generate(rows)
    assert all(r["generator_family"] == family and r["generation_mode"] == mode for r in out)
    assert out[0]["pipeline_class"] == generator_class(family).pipelines[mode]
    theirs = diffusers_images(family_models, family, mode, out)
    for row, want in zip(out, theirs):
        got = png_to_array(row["generated"]).astype(int)
        assert np.abs(got - want.astype(int)).max() <= 1
    assert np.abs(png_to_array(out[0]["generated"]).astype(int) - png_to_array(out[1]["generated"])).mean() > 3
    if mode != "text2img":
        assert out[0]["strength"] == 0.7
    if mode == "inpaint":  # outside the person's box is repainted: the box (x 20..40, y 10..50) is black
        mask = np.asarray(Image.open(io.BytesIO(out[0]["inpaint_mask"])))
        assert mask[30, 30] == 0 and mask[5, 5] == 255 and mask[60, 60] == 255
        assert json.loads(out[0]["inpaint_mask_source"])["annotator"] == "openpose"
    else:
        assert out[0]["inpaint_mask"] is None


def test_sdxl_micro_conditioning_comes_from_each_rows_real_sizes(family_models):
    gen = generator(family_models, "sdxl")
    out = gen.generate(make_rows())
    assert [r["original_size"] for r in out] == [[512, 512], [300, 400], [300, 451]]  # (height, width)
    assert all(r["target_size"] == [64, 64] and r["crops_coords_top_left"] == [0, 0] for r in out)
    assert len(gen.call_groups(make_rows())) == 3  # diffusers takes one original_size per call
    rotated = dict(make_rows()[1], transform=json.dumps({"original_size": [400, 300], "exif_orientation": 6}))
    assert gen.row_fields(rotated)["original_size"] == [400, 300]


def test_union_control_modes_come_from_the_annotators_and_are_recorded(family_models):
    gen = generator(family_models, "sdxl_union")
    assert [cn.control_mode for cn in gen.gen.controlnets] == [3, 2]  # canny, scribble (xinsir's table)
    row = gen.generate(make_rows()[:1])[0]
    assert row["control_modes"] == [3, 2] and row["controlnet_conditions"] == ["canny", "scribble_xdog"]
    assert row["controlnet_models"] == [family_models["sdxl_union/controlnet"]] * 2
    named = load_config(data=job(family_models, "sdxl_union", controlnets=[
        {"condition": "canny", "model": family_models["sdxl_union/controlnet"], "control_mode": "tile"}]))
    assert named.generation.controlnets[0].control_mode == 6


def test_noise_is_drawn_on_cpu_and_the_worker_is_recorded(family_models):
    gen = generator(family_models, "sdxl")
    kwargs = gen.call_kwargs(make_rows(), 64, 64)
    assert all(g.device.type == "cpu" for g in kwargs["generator"])
    row = gen.generate(make_rows()[:1])[0]
    assert row["generator_device"] == "cpu" and row["dtype"] == "float32"
    assert row["torch_version"] == torch.__version__ and row["diffusers_version"] == diffusers.__version__
    assert json.loads(row["scheduler_config"])["_class_name"] == "UniPCMultistepScheduler"
    assert row["guess_mode"] is False


def test_guess_mode_changes_the_pixels_and_is_recorded(family_models):
    plain = generator(family_models, "sd15").generate(make_rows()[:1])[0]
    guess = generator(family_models, "sd15", guess_mode=True, guidance_scale=4.0).generate(make_rows()[:1])[0]
    assert guess["guess_mode"] is True and plain["guess_mode"] is False
    assert guess["generated"] != plain["generated"]


@pytest.mark.parametrize("change, message", [
    ({"family": "sdxl", "true_cfg_scale": 2.0}, "generation.true_cfg_scale: only flux text2img"),
    ({"family": "sdxl_union", "mode": "inpaint"}, "generation.mask: inpaint needs a mask"),
    ({"mode": "img2img", "mask": MASK}, "generation.mask: only inpaint uses a mask"),
    ({"strength": 0.5}, "generation.strength: only img2img and inpaint"),
    ({"mode": "inpaint", "mask": {"annotator": "canny"}}, "generation.mask.annotator: canny gives neither"),
    ({"mode": "inpaint", "mask": {"annotator": "openpose", "classes": [ADE_PERSON]}},
     "generation.mask.classes: only a seg_ade20k annotator"),
    ({"mode": "inpaint", "mask": {"annotator": "nope"}}, "generation.mask.annotator: 'nope' is not an annotator id"),
    ({"family": "sdxl", "scheduler": "flow_match_euler"}, "generation.scheduler: 'flow_match_euler' is not a sdxl"),
    ({"family": "sdxl_union", "controlnets": [{"condition": "canny", "model": "a"}, {"condition": "openpose", "model": "b"}]},
     "generation.controlnets: sdxl_union runs every condition through one Union ControlNet"),
    ({"family": "sdxl_union", "controlnets": [{"condition": "canny", "model": "a", "control_mode": "colour"}]},
     "generation.controlnets.0.control_mode: 'colour' is not one of"),
    ({"family": "sdxl_union", "controlnets": [{"condition": "canny", "model": "a", "control_mode": 9}]},
     "generation.controlnets.0.control_mode: 9 is out of range 0..7"),
    ({"mode": "outpaint"}, "generation.mode: Input should be"),
])
def test_config_refusals_are_one_line(family_models, change, message):
    data = job(family_models, "sd15")
    data["generation"] |= change
    with pytest.raises(ConfigError) as e:
        load_config(data=data)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_union_condition_without_a_table_entry_is_refused(family_models):
    data = job(family_models, "sdxl_union")
    data["annotators"].append({"name": "shuffle"})
    data["generation"]["controlnets"].append({"condition": "shuffle", "model": family_models["sdxl_union/controlnet"]})
    with pytest.raises(ConfigError, match="generation.controlnets.2.control_mode: annotator 'shuffle' has no sdxl_union"):
        load_config(data=data)


@pytest.mark.parametrize("family, mode", [("sdxl", "img2img"), ("sdxl_union", "text2img"), ("flux", "inpaint"),
                                          ("sd3", "text2img")])
def test_end_to_end_job(ray_session, family_models, photos_dir, tmp_path, family, mode):
    from pipeline.job import run

    data = job(family_models, family, source=str(photos_dir), output=str(tmp_path / "out"), mode=mode)
    data["annotators"][2] = {"name": "seg_ade20k", "model": family_models["annotator/seg_ade20k"]}
    if mode == "inpaint":  # repaint all but the people (random tiny weights: whatever they call a person)
        data["generation"] |= {"mask": {"annotator": "seg_ade20k", "classes": [ADE_PERSON]}, "strength": 0.9}
    data["source"]["limit"] = 2
    result = run(load_config(data=data), echo=lambda _: None)
    table = read_parquet_dir(tmp_path / "out" / "samples")
    assert result.samples == 2 == table.num_rows
    rows = table.to_pylist()
    assert {r["generator_family"] for r in rows} == {family} and {r["generation_mode"] for r in rows} == {mode}
    assert all(r["generated"]["bytes"] for r in rows)
    if family.startswith("sdxl"):
        assert all(len(r["original_size"]) == 2 for r in rows)
    if mode == "inpaint":
        assert all(r["inpaint_mask"] and json.loads(r["inpaint_mask_source"])["classes"] == [ADE_PERSON] for r in rows)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["config"]["generation"]["family"] == family


def test_models_fetch_takes_only_what_from_pretrained_loads():
    """The files of real hub repos (as listed on the hub): the diffusers layout without variants, never the
    single-file checkpoint beside it."""
    from huggingface_hub.utils import filter_repo_objects

    sdxl_base = ["model_index.json", "sd_xl_base_1.0.safetensors", "sd_xl_offset_example-lora_1.0.safetensors",
                 "scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/model.safetensors",
                 "text_encoder/model.fp16.safetensors", "text_encoder/openvino_model.bin",
                 "tokenizer/merges.txt", "tokenizer/vocab.json", "tokenizer/special_tokens_map.json",
                 "tokenizer/tokenizer_config.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                 "unet/diffusion_pytorch_model.fp16.safetensors", "unet/model.onnx", "vae/config.json",
                 "vae/diffusion_pytorch_model.safetensors", "vae_1_0/diffusion_pytorch_model.fp16.safetensors",
                 "text_encoder_2/model-00001-of-00002.safetensors", "text_encoder_2/model.safetensors.index.json"]
    union = ["config.json", "config_promax.json", "diffusion_pytorch_model.safetensors",
             "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model_promax.safetensors"]
    refs = generator_class("sdxl_union").model_refs(load_config(data=job({"sdxl_union/base_model": "stabilityai/x",
                                                                          "sdxl_union/controlnet": "xinsir/u"},
                                                                         "sdxl_union")).generation)
    base = set(filter_repo_objects(sdxl_base, allow_patterns=list(refs["base_model"].patterns)))
    assert base == {"model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
                    "text_encoder/model.safetensors", "tokenizer/merges.txt", "tokenizer/vocab.json",
                    "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "unet/config.json",
                    "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                    "vae/diffusion_pytorch_model.safetensors", "text_encoder_2/model-00001-of-00002.safetensors",
                    "text_encoder_2/model.safetensors.index.json"}
    assert len(refs["controlnets"]) == 1  # one Union network for both conditions
    assert set(filter_repo_objects(union, allow_patterns=list(refs["controlnets"][0].patterns))) == {
        "config.json", "diffusion_pytorch_model.safetensors"}


def test_flux_union_shares_one_network_with_a_mode_per_condition_and_true_cfg(family_models):
    """Two conditions through one Flux Union ControlNet (modes from the table or explicit), true CFG on."""
    gen = generator(family_models, "flux", union=True, true_cfg_scale=2.0, controlnets=[
        {"condition": "canny", "model": family_models["flux/controlnet"]},
        {"condition": "scribble_xdog", "model": family_models["flux/controlnet"], "control_mode": "blur",
         "conditioning_scale": 0.5}])
    assert type(gen.pipe.controlnet).__name__ == "FluxMultiControlNetModel" and len(gen.pipe.controlnet.nets) == 1
    out = gen.generate(make_rows()[:2])
    assert out[0]["control_modes"] == [0, 3] and out[0]["true_cfg_scale"] == 2.0
    theirs = diffusers_images(family_models, "flux", "text2img", out, union=True)
    for row, want in zip(out, theirs):
        assert np.abs(png_to_array(row["generated"]).astype(int) - want.astype(int)).max() <= 1
    plain = generator(family_models, "flux", union=True, controlnets=[
        {"condition": "canny", "model": family_models["flux/controlnet"]}]).generate(make_rows()[:1])[0]
    assert plain["control_modes"] == [0] and plain["true_cfg_scale"] == 1.0


def resolved(models, family, union=False, base=None, net=None):
    """resolve_models of the test job (its openpose annotator left out: its weights are not here), with the
    base model or the first ControlNet replaced by another family's."""
    data = job(models, family, union=union)
    data["annotators"] = data["annotators"][:2]
    if base:
        data["generation"]["base_model"] = models[base]
    if net:
        data["generation"]["controlnets"][0]["model"] = models[net]
    return resolve_models(load_config(data=data))


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sdxl_union", "flux", "sd3"])
def test_each_familys_own_models_fit(family_models, family):
    assert resolved(family_models, family).generation["base_model"].local_dir


@pytest.mark.parametrize("family, base, net, message", [
    ("sdxl", "base_model", None, ("generation.base_model: {base_model} is a model of StableDiffusionPipeline; family "
                                  "sdxl runs StableDiffusionXL models (family sd15 takes this one)")),
    ("sd15", "sdxl/base_model", None, ("generation.base_model: {sdxl/base_model} is a model of "
                                       "StableDiffusionXLPipeline; family sd15 runs StableDiffusion models (families "
                                       "sdxl / sdxl_union take this one)")),
    ("sdxl", None, "controlnet/canny", ("generation.controlnets.0.model: {controlnet/canny} was made for another "
                                        "base model than {sdxl/base_model}: its cross_attention_dim is 32, the base "
                                        "model's unet has 64")),
    ("flux", None, "sdxl/controlnet/canny", ("generation.controlnets.0.model: {sdxl/controlnet/canny} is a ControlNet "
                                             "of class ControlNetModel; family flux loads class FluxControlNetModel "
                                             "(families sd15 / sdxl take this one)")),
    ("sdxl", None, "sdxl_union/controlnet", ("generation.controlnets.0.model: {sdxl_union/controlnet} is a ControlNet "
                                             "of class ControlNetUnionModel; family sdxl loads class ControlNetModel "
                                             "(family sdxl_union takes this one)")),
    ("sd3", None, "flux/controlnet/canny", ("generation.controlnets.0.model: {flux/controlnet/canny} is a ControlNet "
                                            "of class FluxControlNetModel; family sd3 loads class SD3ControlNetModel "
                                            "(family flux takes this one)")),
    ("flux", None, "flux/controlnet", ("generation.controlnets: Union ControlNets (0) and single-condition ones (1) "
                                       "cannot be mixed in one flux job")),
])
def test_a_model_of_another_family_is_refused_before_the_run(family_models, family, base, net, message):
    """Without the check, the generator actors fail to load (a Ray traceback) or every sample is an error row."""
    with pytest.raises(ModelUnavailable) as e:
        resolved(family_models, family, base=base, net=net)
    assert str(e.value) == message.format(**family_models)


def test_what_the_fit_check_cannot_judge_is_left_to_diffusers(family_models, tmp_path):
    """A pipeline or ControlNet class no family names (a community one), a per-block list of dims, an unreadable
    config, a null `num_control_type`."""
    base, net = tmp_path / "base", tmp_path / "net"
    shutil.copytree(family_models["base_model"], base)
    shutil.copytree(family_models["controlnet/canny"], net)
    index = json.loads((base / "model_index.json").read_text())
    (base / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionLongPromptPipeline"}))
    unet = json.loads((base / "unet" / "config.json").read_text())
    (base / "unet" / "config.json").write_text(json.dumps({**unet, "cross_attention_dim": [64, 64]}))
    (net / "config.json").write_text("{not json")
    models = {**family_models, "base_model": str(base), "controlnet/canny": str(net)}
    assert resolved(models, "sd15").generation["base_model"].local_dir == str(base)
    config = json.loads((Path(family_models["controlnet/canny"]) / "config.json").read_text())
    (net / "config.json").write_text(json.dumps({**config, "_class_name": "MyControlNet", "num_control_type": None}))
    assert resolved(models, "sd15").generation["controlnets"][0].local_dir == str(net)


def test_flux_union_without_a_mode_is_refused_before_the_run(family_models):
    with pytest.raises(ModelUnavailable, match="generation.controlnets.1.control_mode: .* is a Union ControlNet"):
        resolved(family_models, "flux", union=True)  # scribble has no Flux Union mode


@pytest.mark.parametrize("family, change, message", [
    ("sd3", {"mode": "img2img", "strength": 0.5}, "generation.mode: sd3 has no img2img mode"),
    ("sd3", {"mode": "inpaint", "mask": MASK}, "inpainting ControlNet"),
    ("flux", {"mode": "img2img", "true_cfg_scale": 3.0}, "generation.true_cfg_scale: only flux text2img"),
    ("flux", {"guess_mode": True}, "generation.guess_mode: flux pipelines have no guess mode"),
    ("flux", {"scheduler": "unipc"}, "generation.scheduler: 'unipc' is not a flux scheduler"),
])
def test_flux_and_sd3_refusals(family_models, family, change, message):
    with pytest.raises(ConfigError) as e:
        load_config(data=job(family_models, family, **change))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_flux_needs_sides_in_multiples_of_16(family_models):
    data = job(family_models, "flux")
    data["image"]["multiple_of"] = 8  # the default, for the UNet families
    with pytest.raises(ConfigError, match=r"image\.multiple_of: flux generates images whose sides are multiples of 16; "
                                          r"8 is not one"):
        load_config(data=data)


def test_flow_families_default_to_their_own_scheduler(family_models):
    assert load_config(data=job(family_models, "sd3")).generation.scheduler == "flow_match_euler"
    assert load_config(data=job(family_models, "flux")).generation.scheduler == "flow_match_euler"
    assert load_config(data=job(family_models, "sdxl")).generation.scheduler == "unipc"


@pytest.mark.parametrize("name, family, mode, modes", [
    ("sdxl", "sdxl", "img2img", [None, None]), ("sdxl_union", "sdxl_union", "inpaint", [0, 1]),
    ("flux", "flux", "text2img", [0, 2]), ("sd3", "sd3", "text2img", [None]),
])
def test_example_configs_are_valid(name, family, mode, modes):
    from pathlib import Path

    cfg = load_config(Path(__file__).parent.parent / "jobs" / "configs" / f"{name}.yaml")
    assert (cfg.generation.family, cfg.generation.mode) == (family, mode)
    assert [cn.control_mode for cn in cfg.generation.controlnets] == modes


def test_inpaint_masks_from_segmentation_classes_and_pose_boxes():
    from controlnet_aux.util import ade_palette

    from pipeline.config import MaskConfig
    from pipeline.generators._controlnet import inpaint_mask

    palette = np.array(ade_palette(), dtype=np.uint8)
    seg = np.broadcast_to(palette[2], (64, 64, 3)).copy()  # sky everywhere
    seg[20:40, 10:30] = palette[ADE_PERSON]
    seg[0:5, 60:64] = palette[ADE_PERSON + 1]
    row = {"width": 64, "height": 64, "control_seg": array_to_png(seg)}
    as_array = lambda png: np.asarray(Image.open(io.BytesIO(png))) > 0
    outside = as_array(inpaint_mask(row, MaskConfig(annotator="seg", classes=[ADE_PERSON])))
    person = np.zeros((64, 64), bool)
    person[20:40, 10:30] = True
    assert np.array_equal(outside, ~person)  # everything but the person is repainted
    inside = as_array(inpaint_mask(row, MaskConfig(annotator="seg", classes=[ADE_PERSON], repaint="inside", margin=2)))
    assert inside[18:42, 10:30].all() and inside[20:40, 8:32].all() and not inside[17, 20] and not inside[0, 0]
    two = as_array(inpaint_mask(row, MaskConfig(annotator="seg", classes=[ADE_PERSON, ADE_PERSON + 1], repaint="inside")))
    assert two[0:5, 60:64].all() and two.sum() == 20 * 20 + 5 * 4
    nobody = dict(row, keypoints_pose=json.dumps({"people": [], "canvas_width": 64, "canvas_height": 64}))
    assert as_array(inpaint_mask(nobody, MaskConfig(annotator="pose"))).all()  # no person: repaint all


def test_auto_dtype_is_bfloat16_on_gpu_for_flow_families():
    from pipeline.generators.base import torch_dtype

    assert torch_dtype("auto", "cuda", generator_class("flux").auto_gpu_dtype) == torch.bfloat16
    assert torch_dtype("auto", "cuda", generator_class("sdxl").auto_gpu_dtype) == torch.float16
    assert torch_dtype("auto", "cpu", generator_class("sd3").auto_gpu_dtype) == torch.float32


def test_inpaint_with_masks_from_a_parquet_column_end_to_end(ray_session, family_models, tmp_path):
    """source.mask_column: each input's own mask, resized with the image, repaints its white part."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.job import run

    def encoded(array, fmt):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format=fmt)
        return buf.getvalue()

    mask = np.zeros((96, 128), np.uint8)
    mask[:, :64] = 255  # repaint the left half
    images = [encoded(photo(n, (128, 96)), "JPEG") for n in ("astronaut", "coffee")]
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"image": images, "mask": [encoded(mask, "PNG"), None]}), tmp_path / "in" / "a.parquet")
    data = job(family_models, "sd15", source=str(tmp_path / "in"), output=str(tmp_path / "out"), mode="inpaint",
               mask={"source": True}, strength=0.9)
    data["source"] |= {"type": "parquet", "mask_column": "mask"}
    data["annotators"] = data["annotators"][:2]
    result = run(load_config(data=data), echo=lambda _: None)
    assert result.samples == 1 and result.errors == 1  # the row without a mask is a generate error row
    row = read_parquet_dir(tmp_path / "out" / "samples").to_pylist()[0]
    got = np.asarray(Image.open(io.BytesIO(row["inpaint_mask"])))
    assert got.shape == (64, 88) and got[:, :43].all() and not got[:, 45:].any()  # 128x96 -> 88x64
    errors = read_parquet_dir(tmp_path / "out" / "errors").to_pylist()
    assert "no mask in source.mask_column" in errors[0]["error_message"]


@pytest.mark.parametrize("change, source, message", [
    ({"mask": {"source": True}}, {}, "generation.mask.source: set source.mask_column"),
    ({"mask": {"source": True, "annotator": "openpose"}}, {}, "generation.mask: give either annotator"),
    ({"mask": {}}, {}, "generation.mask: give either annotator"),
    ({"mask": {"source": True}}, {"mask_column": "mask"}, "source: mask_column: only a parquet source has columns"),
])
def test_source_mask_refusals(family_models, change, source, message):
    data = job(family_models, "sd15", mode="inpaint", **change)
    data["source"] |= source
    with pytest.raises(ConfigError) as e:
        load_config(data=data)
    assert message in str(e.value) and "\n" not in str(e.value)
