"""Fetch every model file a job needs into one local directory, for air-gapped runs.

`fetch(cfg, directory)` downloads, for each hub model of the config, the files its loader reads
into `directory/<repo id>/` (the repo's own layout), so that the config can name
`directory/<repo id>` instead of the repo id: annotators get their weight files, the generator's
models (as its family lists them: `Generator.model_refs`) the files of a diffusers snapshot. Models
already given as local directories are checked for their files and left where they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.annotators import ANNOTATORS
from pipeline.captioners import CAPTIONERS
from pipeline.config import JobConfig
from pipeline.generators import flat, generator_class
from pipeline.models import ModelUnavailable


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
        model, files, role = a.model or cls.default_model, cls.files, f"annotator {a.key}"
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

    if (c := cfg.captioner) is not None:  # a transformers model and its processor, safetensors only
        cls, role = CAPTIONERS[c.kind], f"captioner {c.kind}"
        if _is_local(c.model):
            out.append(_local(role, c.model, (cls.probe,)))
        else:
            target = root / c.model
            try:
                snapshot_download(c.model, revision=c.revision, local_dir=target, allow_patterns=list(cls.files))
            except Exception as e:  # noqa: BLE001
                raise _error(role, c.model, "a snapshot", e) from None
            out.append(Fetched(role, c.model, str(target), (cls.probe,), True))

    gen = cfg.generation  # None: an annotate-only job needs the annotators' weights only
    refs = generator_class(gen.family).model_refs(gen) if gen else {}
    for ref in flat(refs):
        if _is_local(ref.model):
            out.append(_local(ref.role, ref.model, (ref.probe,)))
            continue
        target = root / ref.model
        try:
            snapshot_download(ref.model, revision=ref.revision, local_dir=target, allow_patterns=list(ref.patterns))
        except Exception as e:  # noqa: BLE001
            raise _error(ref.role, ref.model, "a snapshot", e) from None
        out.append(Fetched(ref.role, ref.model, str(target), (ref.probe,), True))

    if (q := cfg.quality) is not None and q.clip_model:  # the quality gate's CLIP model (its annotators are above)
        from pipeline.scorers.clip import FILES, PROBE

        if _is_local(q.clip_model):
            out.append(_local("scorer clip", q.clip_model, (PROBE,)))
        else:
            target = root / q.clip_model
            try:
                snapshot_download(q.clip_model, revision=q.clip_revision, local_dir=target, allow_patterns=list(FILES))
            except Exception as e:  # noqa: BLE001
                raise _error("scorer clip", q.clip_model, "a snapshot", e) from None
            out.append(Fetched("scorer clip", q.clip_model, str(target), (PROBE,), True))
    return out
