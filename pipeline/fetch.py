"""Fetch every model file a job needs into one local directory, for air-gapped runs.

`fetch(cfg, directory)` downloads, for each hub model of the config, the files its loader reads
into `directory/<repo id>/` (the repo's own layout), so that the config can name
`directory/<repo id>` instead of the repo id: annotators get their weight files, the base model
and the ControlNets a diffusers snapshot. Models already given as local directories are checked
for their files and left where they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.annotators import ANNOTATORS
from pipeline.config import JobConfig
from pipeline.models import ModelUnavailable

# diffusers snapshots: configs, tokenizer files and safetensors weights (no .ckpt/.bin/flax/onnx copies)
DIFFUSERS_FILES = ["*.json", "*.txt", "*.model", "*.safetensors"]


@dataclass(frozen=True)
class Fetched:
    role: str  # "annotator <id>", "base_model", "controlnet <condition>"
    model: str  # as configured
    path: str  # local directory to put in the config
    files: tuple[str, ...]
    downloaded: bool


def _is_local(model: str) -> bool:
    return Path(model).expanduser().is_dir() or model.startswith((".", "/", "~")) or model.count("/") > 1


def _local(role: str, model: str, files: tuple[str, ...]) -> Fetched:
    path = Path(model).expanduser()
    missing = [f for f in files if not (path / f).is_file()]
    if not path.is_dir() or missing:
        raise ModelUnavailable(f"{role}: model directory {model} " +
                               ("does not exist" if not path.is_dir() else f"has no {', '.join(missing)}"))
    return Fetched(role, model, str(path), files, False)


def _error(role: str, model: str, what: str, e: Exception) -> ModelUnavailable:
    reason = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__
    return ModelUnavailable(f"{role}: could not fetch {what} of model {model!r}: {reason}")


def fetch(cfg: JobConfig, directory: str | Path) -> list[Fetched]:
    from huggingface_hub import hf_hub_download, snapshot_download

    root = Path(directory)
    out = []
    for a in cfg.annotators:
        cls = ANNOTATORS[a.name]
        if not cls.default_model:
            continue
        model, files, role = a.model or cls.default_model, cls.files(), f"annotator {a.key}"
        if _is_local(model):
            out.append(_local(role, model, files))
            continue
        target = root / model
        for f in files:
            try:
                hf_hub_download(model, f, revision=a.revision, local_dir=target)
            except Exception as e:  # noqa: BLE001 - any failure (HTTP, DNS, missing file) is one line
                raise _error(role, model, f, e) from None
        out.append(Fetched(role, model, str(target), files, True))

    gen = cfg.generation  # None: an annotate-only job needs the annotators' weights only
    diffusers_models = [("base_model", gen.base_model, gen.revision, "model_index.json")] if gen else []
    diffusers_models += [(f"controlnet {cn.condition}", cn.model, cn.revision, "config.json") for cn in gen.controlnets] if gen else []
    for role, model, revision, probe in diffusers_models:
        if _is_local(model):
            out.append(_local(role, model, (probe,)))
            continue
        target = root / model
        try:
            snapshot_download(model, revision=revision, local_dir=target, allow_patterns=DIFFUSERS_FILES)
        except Exception as e:  # noqa: BLE001
            raise _error(role, model, "a snapshot", e) from None
        out.append(Fetched(role, model, str(target), (probe,), True))
    return out
