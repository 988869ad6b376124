"""Job config validation: key paths in messages, --set overrides, safe prompt templates."""

import pytest
import yaml

from pipeline.config import ConfigError, load_config
from tests.conftest import job_dict

TINY = {"annotators": "/m/annotators", "base_model": "/m/sd", "controlnet/canny": "/m/c", "controlnet/hed": "/m/h"}


def config(**changes) -> dict:
    data = job_dict("/photos", "/out", TINY)
    data.update(changes)
    return data


def test_valid_config_loads_with_defaults():
    cfg = load_config(data=config())
    assert cfg.generation.scheduler == "unipc"
    assert cfg.image.multiple_of == 8
    assert [a.key for a in cfg.annotators] == ["canny", "hed"]


def test_unknown_key_is_rejected_with_its_path():
    data = config()
    data["generation"]["controlnets"][1]["scale"] = 2.0
    with pytest.raises(ConfigError, match=r"generation\.controlnets\.1\.scale: unknown key"):
        load_config(data=data)


def test_wrong_type_is_rejected_with_its_path():
    data = config()
    data["generation"]["steps"] = "many"
    with pytest.raises(ConfigError, match=r"generation\.steps: .*integer"):
        load_config(data=data)


def test_unknown_annotator_and_bad_params_are_named():
    data = config(annotators=[{"name": "sobel"}])
    with pytest.raises(ConfigError, match=r"annotators\.0\.name: unknown annotator 'sobel'"):
        load_config(data=data)
    data = config(annotators=[{"name": "canny", "params": {"low_threshold": 200, "high_threshold": 100}}])
    with pytest.raises(ConfigError, match=r"annotators\.0\.params: .*low_threshold must not exceed"):
        load_config(data=data)
    data = config(annotators=[{"name": "canny", "params": {"sigma": 1}}])
    with pytest.raises(ConfigError, match=r"annotators\.0\.params: sigma: Extra inputs"):
        load_config(data=data)


def test_controlnet_condition_must_name_an_annotator():
    data = config()
    data["generation"]["controlnets"][0]["condition"] = "depth"
    with pytest.raises(ConfigError, match=r"generation\.controlnets\.0\.condition: 'depth'"):
        load_config(data=data)


def test_unsupported_scheduler_is_rejected():
    data = config()
    data["generation"]["scheduler"] = "pndm"
    with pytest.raises(ConfigError, match=r"generation\.scheduler"):
        load_config(data=data)


def test_set_overrides_any_key(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config()))
    cfg = load_config(path, ["generation.steps=9", "generation.controlnets.1.conditioning_scale=0.25",
                             "output.path=s3://bucket/run", "generation.prompt.prompts=[a, b, c]", "seed=3"])
    assert cfg.generation.steps == 9
    assert cfg.generation.controlnets[1].conditioning_scale == 0.25
    assert cfg.output.path == "s3://bucket/run"
    assert cfg.generation.prompt.prompts == ["a", "b", "c"]
    assert cfg.seed == 3


def test_set_errors_are_clear(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config()))
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(path, ["generation.steps"])
    with pytest.raises(ConfigError, match=r"list index '5' out of range"):
        load_config(path, ["generation.controlnets.5.model=x"])
    with pytest.raises(ConfigError, match=r"generation\.typo: unknown key"):
        load_config(path, ["generation.typo=1"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("source: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("template", ["{prompt.__class__}", "{caption[0]}", "{os}", "{prompt!r}", "{prompt:>10}"])
def test_prompt_templates_cannot_reach_beyond_row_fields(template):
    data = config()
    data["generation"]["prompt"]["template"] = template
    with pytest.raises(ConfigError, match=r"generation\.prompt\.template"):
        load_config(data=data)


def test_guidance_window_must_be_ordered():
    data = config()
    data["generation"]["controlnets"][0].update(guidance_start=0.9, guidance_end=0.2)
    with pytest.raises(ConfigError, match="guidance_start must be smaller"):
        load_config(data=data)


def test_output_policies_and_annotate_only_jobs():
    data = config()
    data["output"].update(overwrite=True, new_version=True)
    with pytest.raises(ConfigError, match="output: set at most one of overwrite and new_version"):
        load_config(data=data)
    data = config()
    del data["generation"]
    cfg = load_config(data=data)
    assert cfg.generation is None and [a.key for a in cfg.annotators] == ["canny", "hed"]
    with pytest.raises(ConfigError, match=r"image\.max_aspect_ratio: .*greater than or equal to 1"):
        load_config(data=config(image={"max_aspect_ratio": 0.5}))
    assert load_config(data=config()).generation.allow_pickle is False
