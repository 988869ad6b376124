"""Job config validation: key paths in messages, --set overrides, safe prompt templates."""

import re

import pytest
import yaml

from pipeline.config import ConfigError, load_config
from tests.helpers import job_dict

TINY = {"annotators": "/m/annotators", "base_model": "/m/sd", "controlnet/canny": "/m/c", "controlnet/hed": "/m/h"}


def config(**changes) -> dict:
    data = job_dict("/photos", "/out", TINY)
    data.update(changes)
    return data


def test_a_control_mode_number_given_by_set_is_a_number():
    """--set gives '3' as text (the field also takes names such as 'canny'): the same number as YAML's 3."""
    from pipeline.config import ControlNetConfig

    assert ControlNetConfig(condition="canny", model="m", control_mode="3").control_mode == 3
    assert ControlNetConfig(condition="canny", model="m", control_mode="canny").control_mode == "canny"


def test_valid_config_loads_with_defaults():
    cfg = load_config(data=config())
    assert cfg.generation.scheduler == "unipc"
    assert cfg.image.multiple_of == 8
    assert [a.key for a in cfg.annotators] == ["canny", "hed"]


def test_a_template_without_prompt_is_the_prompt_when_no_prompts_are_given():
    data = config()
    data["generation"]["prompt"] = {"template": "{caption}"}  # the README's "or {caption} alone"
    assert load_config(data=data).generation.prompt.template == "{caption}"
    data["source"].update(type="parquet", prompt_column="text")  # the column's prompts would go unused
    with pytest.raises(ConfigError, match=re.escape("has no {prompt} field: source.prompt_column would not be used")):
        load_config(data=data)


class SetArgs(tuple):
    """A mutation given as `--set KEY=VALUE` arguments to load_config."""

    def __new__(cls, *assignments: str):
        return super().__new__(cls, assignments)


def set_path(data: dict, path: str, value) -> None:
    """Set the value at a dotted key path ("generation.controlnets.0.condition"; list items by index)."""
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


# prompt templates that would reach beyond the row's fields: (template, the message, verbatim)
TEMPLATE_ERRORS = [
    ("{prompt.__class__}", "template field {prompt.__class__} is not one of ['caption', 'prompt', 'variant']"),
    ("{caption[0]}", "template field {caption[0]} is not one of ['caption', 'prompt', 'variant']"),
    ("{os}", "template field {os} is not one of ['caption', 'prompt', 'variant']"),
    ("{prompt!r}", "template field {prompt} may not carry a format spec or conversion"),
    ("{prompt:>10}", "template field {prompt} may not carry a format spec or conversion"),
]

# (id, mutation of the valid config(), regex the ConfigError must match). A mutation is a dict of
# dotted key path -> new value, a function that changes the config in place, or SetArgs.
CONFIG_ERRORS = [
    ("unknown-key", {"generation.controlnets.1.scale": 2.0}, r"generation\.controlnets\.1\.scale: unknown key"),
    ("wrong-type", {"generation.steps": "many"}, r"generation\.steps: .*integer"),
    ("unknown-annotator", {"annotators": [{"name": "sobel"}]}, r"annotators\.0\.name: unknown annotator 'sobel'"),
    ("annotator-params-invalid",
     {"annotators": [{"name": "canny", "params": {"low_threshold": 200, "high_threshold": 100}}]},
     r"annotators\.0\.params: low_threshold must not exceed"),  # without pydantic's "Value error, "
    ("annotator-param-unknown", {"annotators": [{"name": "canny", "params": {"sigma": 1}}]},
     r"annotators\.0\.params: sigma: unknown key"),
    ("multiple-of-not-the-vaes", {"image.multiple_of": 12},  # sd15 would make 128-px images from 132-px maps
     r"image\.multiple_of: sd15 generates images whose sides are multiples of 8; 12 is not one"),
    ("annotator-model-without-weights", {"annotators.0.model": "some/repo"},
     r"annotators\.0\.model: canny has no model weights to choose"),
    ("controlnet-condition-not-an-annotator", {"generation.controlnets.0.condition": "depth"},
     r"generation\.controlnets\.0\.condition: 'depth' is not an annotator id \['canny', 'hed'\]"),
    ("unsupported-scheduler", {"generation.scheduler": "pndm"},
     r"generation\.scheduler: Input should be 'unipc', 'dpmpp_2m', 'ddim', 'euler_a' or 'flow_match_euler'"),
    *[(f"template-{template}", {"generation.prompt.template": template},
       re.escape(f"generation.prompt.template: {error}")) for template, error in TEMPLATE_ERRORS],
    # a template without {prompt}: prompts given anywhere would be left unused, silently
    ("template-without-prompt", {"generation.prompt.template": "{caption}, variant {variant}"},
     re.escape("generation.prompt.template '{caption}, variant {variant}' has no {prompt} field: "
               "generation.prompt.prompts would not be used")),
    ("template-without-prompt-file",
     lambda data: data["generation"]["prompt"].update(template="{caption}", file="prompts.jsonl"),
     re.escape("generation.prompt.prompts and generation.prompt.file would not be used")),
    ("guidance-window-reversed",
     lambda data: data["generation"]["controlnets"][0].update(guidance_start=0.9, guidance_end=0.2),
     r"generation\.controlnets\.0: guidance_start must be smaller"),
    ("empty-output-path", SetArgs("output.path="), r"output\.path: String should have at least 1 character"),
    ("empty-source-path", SetArgs("source.path="), r"source\.path: .*an empty path; give the directory"),
    ("overwrite-and-new-version", {"output.overwrite": True, "output.new_version": True},
     "output: set at most one of overwrite and new_version"),
    ("aspect-ratio-below-1", {"image": {"max_aspect_ratio": 0.5}},
     r"image\.max_aspect_ratio: .*greater than or equal to 1"),
    ("prompts-beside-a-file", {"generation.prompt.file": "prompts.jsonl"},  # the file gives every image's prompt
     re.escape("generation.prompt.prompts would not be used: each image's prompt comes from generation.prompt.file")),
    ("annotator-revision-without-weights", {"annotators.0.revision": "main"},
     r"annotators\.0\.revision: canny has no model weights to choose"),
    ("control-mode-without-union", {"generation.controlnets.0.control_mode": 3},
     r"generation\.controlnets\.0\.control_mode: sd15 ControlNets have no control modes"),
    ("batch-size-fits-no-type", {"generation.batch_size": 0},  # a number or 'auto': one line, no union internals
     re.escape("generation.batch_size: Input should be greater than or equal to 1 or Input should be 'auto'")),
    ("set-without-value", SetArgs("generation.steps"), "expected KEY=VALUE"),
    ("set-index-out-of-range", SetArgs("generation.controlnets.5.model=x"), r"list index '5' out of range"),
    ("set-unknown-key", SetArgs("generation.typo=1"), r"generation\.typo: unknown key"),
    # YAML's yes/no are booleans, which pydantic would take as 1 and 0
    ("yes-for-a-number", SetArgs("generation.steps=yes"), r"generation\.steps: true is a yes/no value, not a number"),
    ("no-for-an-optional-number", {"source.limit": False}, r"source\.limit: false is a yes/no value, not a number"),
    # keys of another source type were ignored
    ("caption-column-of-a-folder", {"source.caption_column": "text"},
     re.escape("source: caption_column: only a parquet source has columns (this one is images)")),
    ("extension-not-decoded", {"source.extensions": ["JPG", ".gif"]},  # each .gif file was an error row
     re.escape("source.extensions: '.gif' is not an image format the pipeline decodes (jpg, jpeg, png, webp, bmp, "
               "tif, tiff)")),
    ("caption-key-of-a-folder", {"source.caption_key": "txt"},
     re.escape("source: caption_key: only a webdataset source reads caption_key (this one is images)")),
]


@pytest.mark.parametrize("mutation, message", [pytest.param(m, msg, id=i) for i, m, msg in CONFIG_ERRORS])
def test_invalid_config_is_rejected_naming_the_key(mutation, message):
    data, overrides = config(), []
    if isinstance(mutation, SetArgs):
        overrides = list(mutation)
    elif isinstance(mutation, dict):
        for path, value in mutation.items():
            set_path(data, path, value)
    else:
        mutation(data)
    with pytest.raises(ConfigError, match=message):
        load_config(data=data, overrides=overrides)


def test_set_overrides_any_key(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config() | {"image": None}))  # a null section takes keys as an absent one
    cfg = load_config(path, ["generation.steps=9", "generation.controlnets.1.conditioning_scale=0.25",
                             "output.path=s3://bucket/run", "generation.prompt.prompts=[a, b, c]", "seed=3",
                             "image.max_pixels=4096"])
    assert cfg.generation.steps == 9
    assert cfg.generation.controlnets[1].conditioning_scale == 0.25
    assert cfg.output.path == "s3://bucket/run"
    assert cfg.generation.prompt.prompts == ["a", "b", "c"]
    assert cfg.seed == 3
    assert cfg.image.max_pixels == 4096


@pytest.mark.parametrize("text, message", [pytest.param(None, "cannot read config", id="missing-file"),
                                           pytest.param("source: [unclosed", "not valid YAML", id="bad-yaml"),
                                           pytest.param("seed: 1\nimage: {}\nseed: 2\n",
                                                        re.escape("not valid YAML: the key 'seed' is given twice "
                                                                  "(again on line 3)"), id="repeated-key")])
def test_unreadable_config_file(tmp_path, text, message):
    path = tmp_path / "job.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_annotate_only_jobs_and_pickle_off_by_default():
    data = config()
    del data["generation"]
    cfg = load_config(data=data)
    assert cfg.generation is None and [a.key for a in cfg.annotators] == ["canny", "hed"]
    assert load_config(data=config()).generation.allow_pickle is False


@pytest.mark.parametrize("prompt", [{"template": "{caption}"}, {"file": "prompts.jsonl"}])
def test_a_config_with_every_default_written_out_loads_as_the_same_job(prompt):
    """A run's manifest holds its config with every default written out (`model_dump`); loaded again it is the
    same job, not one that sets defaults the checks would refuse (prompts beside a file, unused by a template)."""
    data = config()
    data["generation"]["prompt"] = prompt
    cfg = load_config(data=data)
    dumped = cfg.model_dump(mode="json")
    assert dumped["generation"]["prompt"]["prompts"] and dumped["generation"]["strength"]  # the defaults, written out
    assert load_config(data=dumped).model_dump(mode="json") == dumped
