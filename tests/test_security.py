"""Security: pickle weights refused unless allowed, output names that no input name can steer."""

import io
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import load_config
from pipeline.generators.sd15 import load_pipeline
from pipeline.job import resolve_models, run
from pipeline.models import ModelUnavailable
from tests.helpers import canny_job, job_dict, lacking_weight

OUTPUT_NAMES = re.compile(r"^((samples|errors)/part-[0-9a-f]{32}\.parquet|manifest\.json|stats\.txt|report\.html|README\.md|croissant\.json)$")


@pytest.fixture(scope="module")
def pickled_base(tiny_models, tmp_path_factory) -> Path:
    """The tiny base model with its UNet saved as a pickle checkpoint only."""
    from diffusers import UNet2DConditionModel

    base = tmp_path_factory.mktemp("pickled") / "base"
    shutil.copytree(tiny_models["base_model"], base)
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    shutil.rmtree(base / "unet")
    unet.save_pretrained(base / "unet", safe_serialization=False)
    assert (base / "unet" / "diffusion_pytorch_model.bin").is_file()
    return base


def test_pickle_weights_are_refused_at_start_unless_allowed(tiny_models, pickled_base, tmp_path):
    data = job_dict("/nowhere", str(tmp_path / "out"), tiny_models)
    data["generation"]["base_model"] = str(pickled_base)
    with pytest.raises(ModelUnavailable, match=r"^generation base_model: model '.*' has pickle weights only "
                                               r"\(unet/diffusion_pytorch_model.bin\).*allow_pickle=true"):
        resolve_models(load_config(data=data))
    cfg = load_config(data=data)
    allowed = cfg.model_copy(update={"generation": cfg.generation.model_copy(update={"allow_pickle": True})})
    assert resolve_models(allowed).generation["base_model"].local_dir == str(pickled_base)
    cut = tmp_path / "cut"
    shutil.copytree(pickled_base, cut)
    weights = cut / "unet" / "diffusion_pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[:-1000])  # an interrupted copy: torch's zip lacks its directory
    with pytest.raises(ModelUnavailable, match=r"^generation base_model: .* unet/diffusion_pytorch_model.bin is cut short"):
        resolve_models(allowed.model_copy(update={"generation": allowed.generation.model_copy(update={"base_model": str(cut)})}))


def test_the_loader_itself_refuses_pickle_and_loads_it_when_allowed(tiny_models, pickled_base):
    data = job_dict("/nowhere", "/nowhere", tiny_models)
    data["generation"]["base_model"] = str(pickled_base)
    cfg = load_config(data=data)
    data["generation"]["allow_pickle"] = True
    allowed = load_config(data=data)
    base = resolve_models(allowed).generation["base_model"]
    controlnets = resolve_models(allowed).generation["controlnets"]
    with pytest.raises(EnvironmentError, match="safetensors"):
        load_pipeline(cfg.generation, base, controlnets, "cpu")  # defence in depth, past the start-up check
    pipe = load_pipeline(allowed.generation, base, controlnets, "cpu")
    from diffusers import UNet2DConditionModel

    reference = UNet2DConditionModel.from_pretrained(Path(tiny_models["base_model"]) / "unet")
    for (name, a), (_, b) in zip(pipe.unet.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name


HOSTILE = ["../../../escape.png", "/tmp/absolute.png", "a/b/../../../up.png", "line\nbreak.png", "ünïcødé 写真.png",
           "%2e%2e%2fencoded.png", "..", "samples/part-00.parquet"]


def test_output_names_cannot_be_steered_by_input_names(ray_session, photos_dir, tmp_path):
    photo = (photos_dir / "chelsea.jpg").read_bytes()
    images = []
    for i, name in enumerate(HOSTILE):
        buf = io.BytesIO()
        from PIL import Image

        Image.open(io.BytesIO(photo)).rotate(i * 7).save(buf, format="PNG")
        images.append({"bytes": buf.getvalue(), "path": name})
    images.append({"bytes": b"not an image", "path": "../../error-escape.png"})
    source = tmp_path / "in" / "shard.parquet"
    source.parent.mkdir()
    pq.write_table(pa.table({"image": images}), source)
    folder = tmp_path / "in" / "folder"
    folder.mkdir()
    (folder / "ünïcødé 写真 photo.jpg").write_bytes(photo)
    (folder / "with spaces & $(touch pwned).jpg").write_bytes(images[1]["bytes"])  # other content: not a duplicate

    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    data = canny_job(str(source), str(out))  # generation adds no file names
    data["source"] = {"type": "parquet", "path": str(source), "image_column": "image"}
    before = {p for p in tmp_path.rglob("*")}
    result = run(load_config(data=data))
    assert (result.samples, result.errors) == (len(HOSTILE), 1)
    assert run(load_config(data=canny_job(str(folder), str(work / "out-folder")))).samples == 2

    created = {p for p in tmp_path.rglob("*") if p.is_file()} - before
    for p in created:
        rel = p.relative_to(work)
        assert rel.parts[0] in ("out", "out-folder"), f"written outside the output directory: {p}"
        assert OUTPUT_NAMES.match(str(Path(*rel.parts[1:]))), f"unexpected output file name: {rel}"
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()
    uris = sorted(r["source_uri"] for f in out.glob("samples/*.parquet") for r in pq.read_table(f, columns=["source_uri"]).to_pylist())
    assert uris == sorted(f"{source}#row={i}/{name}" for i, name in enumerate(HOSTILE))  # names kept as data, verbatim


def test_a_checkpoint_that_lacks_weights_is_refused_not_loaded_at_random(tiny_models, tmp_path):
    """diffusers only warns when a checkpoint lacks some of a model's weights, and starts those at random: every
    image of the run would come from random numbers. The generator's load raises instead, naming model and weight."""
    net = lacking_weight(tiny_models["controlnet/hed"], tmp_path / "controlnet")  # the start-up checks pass it
    data = job_dict("/nowhere", str(tmp_path / "out"), tiny_models)
    data["generation"]["controlnets"][1]["model"] = str(net)
    cfg = load_config(data=data)
    models = resolve_models(cfg).generation
    with pytest.raises(OSError, match=rf"^{re.escape(str(net))}: its checkpoint lacks 1 of the ControlNetModel's "
                                      r"weights \(controlnet_mid_block.weight, \.\.\.\), which diffusers would start at "
                                      r"random"):
        load_pipeline(cfg.generation, models["base_model"], models["controlnets"], "cpu")
