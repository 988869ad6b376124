"""schemas/ is generated from the code: this fails when the two drift (fix: `python -m pipeline schemas`)."""

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from pipeline.schema import schema_documents

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"
JOBS = Path(__file__).resolve().parent.parent / "jobs" / "configs"


def test_schema_files_match_the_code():
    docs = schema_documents()
    assert sorted(p.name for p in SCHEMAS.glob("*.json")) == sorted(docs)
    for name, doc in docs.items():
        assert json.loads((SCHEMAS / name).read_text()) == json.loads(json.dumps(doc)), f"{name} is stale"


def test_example_configs_validate_against_the_json_schema():
    schema = json.loads((SCHEMAS / "job_config.schema.json").read_text())
    configs = sorted(p for p in JOBS.glob("*.yaml") if p.name != "train.yaml")
    assert configs
    for path in configs:
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)
    train = json.loads((SCHEMAS / "train_config.schema.json").read_text())
    jsonschema.validate(yaml.safe_load((JOBS / "train.yaml").read_text()), train)
    for path in configs:  # a job config is not a training config
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(yaml.safe_load(path.read_text()), train)
    bad = yaml.safe_load(configs[0].read_text()) | {"sead": 1}
    try:
        jsonschema.validate(bad, schema)
    except jsonschema.ValidationError as e:
        assert "sead" in str(e)
    else:
        raise AssertionError("a misspelled key passed the JSON Schema")
