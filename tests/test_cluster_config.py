"""Validate ray_cluster.yaml against Ray's own cluster-launcher schema.

Validation goes through the same offline steps `ray up` runs before it
touches the cloud (ray.autoscaler._private.commands._bootstrap_config):

  * ``prepare_config``  - merge with Ray's aws/defaults.yaml, merge
    setup_commands into head/worker setup commands, check docker config,
    fill per-node-type min/max workers;
  * ``validate_config`` - jsonschema validation against the
    ``ray/autoscaler/ray-schema.json`` shipped in the Ray wheel, plus Ray's
    cross-field checks (head_node_type exists, sum(min_workers) <= max_workers).

The raw file is also validated directly against ray-schema.json, so the file
as written (not only after defaults are merged in) conforms.

No network or AWS credentials are needed.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")  # a hard dependency of ray
ray_autoscaler = pytest.importorskip("ray.autoscaler")

from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO_ROOT / "ray_cluster.yaml"
RAY_SCHEMA = Path(ray_autoscaler.__file__).parent / "ray-schema.json"


def _load() -> dict:
    with CLUSTER_YAML.open() as f:
        return yaml.safe_load(f)


def _schema() -> dict:
    with RAY_SCHEMA.open() as f:
        return json.load(f)


def _ray_validate(config: dict) -> dict:
    """What `ray up` does offline: fill defaults, then validate."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def config() -> dict:
    assert CLUSTER_YAML.is_file(), f"missing {CLUSTER_YAML}"
    return _load()


@pytest.fixture(scope="module")
def prepared(config) -> dict:
    return _ray_validate(config)


# --------------------------------------------------------------------------
# schema validity
# --------------------------------------------------------------------------


def test_ray_schema_is_shipped_with_ray():
    assert RAY_SCHEMA.is_file()
    schema = _schema()
    # Ray's schema rejects unknown top-level keys; the negative tests rely on it.
    assert schema.get("additionalProperties") is False


def test_raw_file_matches_ray_schema(config):
    jsonschema.validate(config, _schema())


def test_config_passes_ray_validate_config(prepared):
    assert prepared["cluster_name"] == "controlnet-pipeline"
    assert prepared["provider"]["type"] == "aws"
    assert prepared["provider"]["region"] == "us-west-2"
    assert prepared["provider"]["cache_stopped_nodes"] is False


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda c: c.update(max_worker=c.pop("max_workers")), id="misspelled-top-level-key"),
        pytest.param(lambda c: c.update(idle_timeout_minutes="ten"), id="wrong-type-top-level"),
        pytest.param(lambda c: c.update(setup_commands="pip install -e ."), id="commands-not-a-list"),
        pytest.param(
            lambda c: c["available_node_types"]["gpu_workers"].update(
                min_worker=c["available_node_types"]["gpu_workers"].pop("min_workers")
            ),
            id="misspelled-node-type-key",
        ),
        pytest.param(
            lambda c: c["available_node_types"]["gpu_workers"]["resources"].update(GPU=0.5),
            id="fractional-gpu-resource",
        ),
        pytest.param(lambda c: c["provider"].pop("type"), id="provider-without-type"),
    ],
)
def test_invalid_variants_fail_validation(config, mutate):
    broken = copy.deepcopy(config)
    mutate(broken)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, _schema())
    # Ray's own pipeline rejects it too (prepare_config may trip before the
    # schema check, e.g. TypeError when merging non-list setup_commands).
    with pytest.raises((jsonschema.ValidationError, KeyError, ValueError, TypeError, AssertionError)):
        _ray_validate(broken)


def test_ray_cross_field_checks_are_active(config):
    # sum(min_workers) > max_workers is valid JSON-schema-wise but must be
    # rejected by validate_config -- proves we use Ray's function, not only
    # the schema.
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_workers"]["min_workers"] = broken["max_workers"] + 1
    broken["available_node_types"]["gpu_workers"]["max_workers"] = broken["max_workers"] + 1
    jsonschema.validate(broken, _schema())
    with pytest.raises(ValueError, match="max_workers"):
        _ray_validate(broken)

    broken = copy.deepcopy(config)
    broken["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match="head_node_type"):
        _ray_validate(broken)


# --------------------------------------------------------------------------
# node types: CPU head, autoscaling GPU workers
# --------------------------------------------------------------------------


def _gpu_worker_types(cfg: dict) -> dict:
    head = cfg["head_node_type"]
    return {
        name: nt
        for name, nt in cfg["available_node_types"].items()
        if name != head and nt.get("resources", {}).get("GPU", 0) >= 1
    }


def test_has_autoscaling_gpu_worker_type(config, prepared):
    gpu_types = _gpu_worker_types(config)
    assert gpu_types, "no worker node type declares a GPU resource"
    assert "gpu_workers" in gpu_types
    for name, nt in gpu_types.items():
        min_w, max_w = nt.get("min_workers", 0), nt.get("max_workers")
        assert max_w is not None, f"{name}: set max_workers explicitly"
        assert min_w == 0, f"{name}: GPU workers should scale to zero"
        assert min_w < max_w, f"{name}: min_workers < max_workers for autoscaling"
        assert max_w <= config["max_workers"]
    gw = config["available_node_types"]["gpu_workers"]
    assert gw["node_config"]["InstanceType"] == "g5.xlarge"
    assert gw["resources"]["GPU"] == 1
    assert config["max_workers"] == gw["max_workers"] == 8
    # After Ray fills defaults the GPU group is still autoscaling.
    pgw = prepared["available_node_types"]["gpu_workers"]
    assert pgw["min_workers"] == 0 < pgw["max_workers"]


def test_head_is_cpu_only(config, prepared):
    head_name = config["head_node_type"]
    head = config["available_node_types"][head_name]
    assert head["resources"].get("GPU", 0) == 0, "head must not advertise GPUs"
    assert head["resources"].get("CPU", 0) > 0, "head CPUs are kept for Ray Data tasks"
    instance = head["node_config"]["InstanceType"]
    assert not re.match(r"^(g|p|inf|trn|dl)\d", instance), f"head {instance} is a GPU/accelerator type"
    # Ray never launches extra copies of the head type.
    assert prepared["available_node_types"][head_name]["max_workers"] == 0


def test_image_id_is_valid_ami_syntax(config):
    for name, nt in config["available_node_types"].items():
        ami = nt["node_config"]["ImageId"]
        assert re.fullmatch(r"ami-[0-9a-f]{8}([0-9a-f]{9})?", ami), f"{name}: bad ImageId {ami!r}"


def test_idle_timeout_set(config):
    assert isinstance(config["idle_timeout_minutes"], (int, float))
    assert config["idle_timeout_minutes"] > 0


# --------------------------------------------------------------------------
# the project is synced and installed on every node
# --------------------------------------------------------------------------


def _pip_install_targets(commands: list[str]) -> list[str]:
    """Paths passed to `pip install [-e] PATH` in a list of shell commands."""
    targets = []
    for cmd in commands:
        for part in re.split(r"&&|;|\|\|", cmd):
            tokens = shlex.split(part)
            if len(tokens) < 3:
                continue
            # pip / pip3 / python -m pip
            if tokens[0] in ("pip", "pip3"):
                args = tokens[1:]
            elif len(tokens) > 3 and tokens[1:3] == ["-m", "pip"]:
                args = tokens[3:]
            else:
                continue
            if not args or args[0] != "install":
                continue
            for tok in args[1:]:
                if tok.startswith("/") or tok.startswith("~") or tok.startswith("."):
                    targets.append(tok.rstrip("/"))
    return targets


def test_pip_install_parser_sanity():
    assert _pip_install_targets(["pip install -e /home/ray/x"]) == ["/home/ray/x"]
    assert _pip_install_targets(["cd /tmp && python -m pip install -U /a/b/"]) == ["/a/b"]
    assert _pip_install_targets(["pip install torch"]) == []


def test_setup_commands_install_the_mounted_repo(config, prepared):
    mounts = config["file_mounts"]
    targets = _pip_install_targets(config["setup_commands"])
    assert targets, "setup_commands must pip install the project"
    installed = [t for t in targets if t in {m.rstrip("/") for m in mounts}]
    assert installed, f"pip install targets {targets} are not file_mounts destinations {list(mounts)}"
    remote = installed[0]
    assert remote == "/home/ray/controlnet-pipeline"
    # The mount's local side is the repository root (ray up is run from it).
    local = mounts[remote]
    assert (REPO_ROOT / local).resolve() == REPO_ROOT
    assert (REPO_ROOT / local / "pyproject.toml").is_file()
    # Installed on head AND workers (setup_commands is merged into both) and
    # no node type overrides worker_setup_commands without it.
    assert remote in _pip_install_targets(prepared["head_setup_commands"])
    assert remote in _pip_install_targets(prepared["worker_setup_commands"])
    for name, nt in config["available_node_types"].items():
        if "worker_setup_commands" in nt:
            assert remote in _pip_install_targets(nt["worker_setup_commands"]), name


def test_standard_start_commands(config):
    head = " ".join(config["head_start_ray_commands"])
    worker = " ".join(config["worker_start_ray_commands"])
    assert "ray start --head" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "--dashboard-host=0.0.0.0" in head
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker


def test_usage_comments_present():
    text = CLUSTER_YAML.read_text()
    for snippet in (
        "ray up ray_cluster.yaml",
        "ray dashboard ray_cluster.yaml",
        "ray job submit --address http://127.0.0.1:8265 --working-dir .",
        "python -m jobs.run jobs/configs/example.yaml",
        "s3://",
        "IamInstanceProfile",
    ):
        assert snippet in text, f"usage comment missing: {snippet!r}"
