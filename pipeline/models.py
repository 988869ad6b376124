"""Model references: resolve a hub id or a local directory to something reproducible.

One path for both: `resolve_model` runs once in the driver before any data moves, so a model that
cannot be had fails the job at start with a message that says how to make it available offline.
Hub models resolve to their commit hash (the workers then load exactly that commit); local
directories resolve to a sha256 fingerprint of their files.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import huggingface_hub
from huggingface_hub.errors import LocalEntryNotFoundError


class ModelUnavailable(RuntimeError):
    """A configured model that cannot be found locally or on the hub."""


@dataclass(frozen=True)
class ResolvedModel:
    model: str  # as configured: hub repo id or local directory
    revision: str | None  # as configured
    commit: str  # hub commit hash, or "sha256:<fingerprint>" for a local directory
    local_dir: str | None  # absolute path when the model is a local directory

    @property
    def load_path(self) -> str:
        return self.local_dir or self.model

    @property
    def load_revision(self) -> str | None:
        return None if self.local_dir else self.commit

    def provenance(self) -> dict:
        return asdict(self)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def resolve_model(model: str, revision: str | None, probe_file: str, local_files_only: bool = False,
                  files: Sequence[str] = ("*",)) -> ResolvedModel:
    """Resolve `model` (a hub repo id or a local directory) holding `probe_file`. A local directory's
    revision is a fingerprint of the `files` (glob patterns) its loader reads, not of everything in it."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / probe_file).is_file():
            raise ModelUnavailable(f"model directory {model} has no {probe_file}: it is not in the expected layout")
        return ResolvedModel(model, revision, "sha256:" + fingerprint(path, files), str(path.resolve()))
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelUnavailable(f"model directory {model} does not exist")
    try:
        if local_files_only or offline():
            cached = huggingface_hub.try_to_load_from_cache(model, probe_file, revision=revision)
            if not isinstance(cached, str):
                raise LocalEntryNotFoundError(f"{model} is not in the local Hugging Face cache")
            commit = Path(cached).parent.name
        else:
            commit = huggingface_hub.HfApi().model_info(model, revision=revision).sha
    except Exception as e:  # noqa: BLE001 - any failure here (cache miss, HTTP, DNS) means "not available"
        reason = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__
        raise ModelUnavailable(
            f"model {model!r} (revision {revision or 'main'}) is not available: {reason}. "
            f"To run offline, fetch the files the job needs first (`python -m pipeline models fetch CONFIG --dir DIR`) "
            f"and put the directory it prints in the config instead of the repo id"
        ) from None
    return ResolvedModel(model, revision, commit, None)


PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


def pickle_only_weights(model: ResolvedModel) -> list[str]:
    """Weight files of a diffusers/transformers model that exist only as pickle (no .safetensors
    next to them): loading those can run arbitrary code."""
    if model.local_dir:
        files = [str(p.relative_to(model.local_dir)) for p in Path(model.local_dir).rglob("*") if p.is_file()]
    else:
        try:
            files = huggingface_hub.HfApi().list_repo_files(model.model, revision=model.commit)
        except Exception:  # noqa: BLE001 - offline: judge by what the cache holds
            cached = [huggingface_hub.try_to_load_from_cache(model.model, probe, revision=model.commit)
                      for probe in ("model_index.json", "config.json")]
            root = next((Path(c).parent for c in cached if isinstance(c, str)), None)
            files = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()] if root else []
    folders: dict[str, list[str]] = {}
    for f in files:
        folders.setdefault(os.path.dirname(f), []).append(f)
    return sorted(f for group in folders.values() if not any(g.endswith(".safetensors") for g in group)
                  for f in group if f.endswith(PICKLE_SUFFIXES))


# The files `from_pretrained` reads in a model folder (without a variant), in the order it looks for them: the
# safetensors weights (diffusers looks for a shard index before one file, transformers for one file first), then,
# where pickle is allowed, the pickle ones
WEIGHT_NAMES = {
    "diffusers": (("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors"),
                  ("diffusion_pytorch_model.bin",)),
    "transformers": (("model.safetensors", "model.safetensors.index.json"),
                     ("pytorch_model.bin", "pytorch_model.bin.index.json")),
}
# A tokenizer's vocabulary, as transformers' tokenizers read it (one of these sets of files): without one they build
# an almost empty tokenizer, and every prompt of the run becomes unknown tokens
VOCABULARIES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("vocab.txt",), ("spiece.model",),
                ("tokenizer.model",), ("sentencepiece.bpe.model",))
VOCABULARY_NAMES = "tokenizer.json, vocab.json with merges.txt, vocab.txt or a sentencepiece model"
# The tokenizer classes of the pipelines' model_index.json whose vocabulary is of one kind (with or without Fast)
CLASS_VOCABULARIES = {"CLIPTokenizer": (("tokenizer.json",), ("vocab.json", "merges.txt")),
                      "T5Tokenizer": (("tokenizer.json",), ("spiece.model",))}
MAX_HEADER = 100_000_000  # the safetensors format's bound on its JSON header


def weights_problem(model: ResolvedModel, allow_pickle: bool = False, passed: Sequence[str] = (),
                    processor: bool = False) -> str | None:
    """Why a local model directory cannot load, or None. A pipeline's directory (model_index.json): a component it
    names (but those in `passed`, which the loader is given instead) whose folder is not there, a tokenizer without
    a vocabulary, a scheduler without its config, a model folder as below. A model folder (a config.json; with
    `processor`, one whose loader reads a processor from it too, which needs a tokenizer vocabulary and an image
    processor config): no weights under the names its library's `from_pretrained` reads, a shard its index names
    that is not there, a weight file that is a Git LFS pointer or cut short (an interrupted copy); weights without
    a config.json. Judged from names, sizes and headers, before any data moves, where the loader would fail (or,
    for a tokenizer, quietly go wrong) in every worker."""
    if not model.local_dir:
        return None
    root = Path(model.local_dir)
    index = read_json(root / "model_index.json")
    if not isinstance(index, dict):
        if (root / "model_index.json").exists():
            return "its model_index.json is not readable JSON: copy it again"
        if processor and not has_vocabulary(root):
            return f"the directory holds no tokenizer vocabulary ({VOCABULARY_NAMES})"
        if processor and not any((root / n).is_file() for n in ("preprocessor_config.json", "processor_config.json")):
            return "the directory has no image processor config (preprocessor_config.json or processor_config.json)"
        return folder_problem(root, root, None, allow_pickle)
    for name, value in index.items():
        if name.startswith("_") or name in passed or not (isinstance(value, list) and len(value) == 2 and all(value)):
            continue
        if problem := component_problem(root, name, *map(str, value), allow_pickle):
            return problem
    return None


def component_problem(root: Path, name: str, library: str, cls: str, allow_pickle: bool) -> str | None:
    """What keeps a pipeline's component (`name`, of `library`'s class `cls`) from loading (`weights_problem`)."""
    folder = root / name
    if not folder.is_dir():
        return f"its model_index.json names a {name} ({cls}), but there is no {name}/ folder"
    if "Tokenizer" in cls:
        kinds = CLASS_VOCABULARIES.get(cls.removesuffix("Fast"), VOCABULARIES)
        names = VOCABULARY_NAMES if kinds is VOCABULARIES else " or ".join(" with ".join(k) for k in kinds)
        return None if has_vocabulary(folder, kinds) else f"{name}/ holds no vocabulary ({names}), which its {cls} reads"
    if cls.endswith("Scheduler"):
        return None if (folder / "scheduler_config.json").is_file() else \
            f"{name}/ has no scheduler_config.json, which its {cls} reads"
    if "Processor" in cls or "FeatureExtractor" in cls:
        return None
    if library in WEIGHT_NAMES and not (folder / "config.json").is_file():  # a model
        return f"{name}/ has no config.json, which its {cls} reads"
    return folder_problem(root, folder, library, allow_pickle)


def has_vocabulary(folder: Path, kinds: tuple[tuple[str, ...], ...] = VOCABULARIES) -> bool:
    return any(all((folder / name).is_file() for name in names) for names in kinds)


def folder_problem(root: Path, folder: Path, library: str | None, allow_pickle: bool) -> str | None:
    """What keeps one model folder's weights from loading (`weights_problem`), by its library's names (read from
    its config.json where the caller does not say)."""
    where = f"{folder.relative_to(root).as_posix()}/" if folder != root else "the directory"
    config = read_json(folder / "config.json")
    if library not in WEIGHT_NAMES:
        library = "diffusers" if isinstance(config, dict) and ("_diffusers_version" in config or "_class_name" in config) \
            else "transformers"
    safe, pickled = WEIGHT_NAMES[library]
    names = safe + (pickled if allow_pickle else ())
    found = next((folder / n for n in names if (folder / n).is_file()), None)
    if config is None:
        return f"{where} has weights ({found.name}) but no readable config.json" if found else None  # another library's
    if found is None:
        return f"{where} has a config.json but no weights ({' or '.join(n for n in names if '.index' not in n)})"
    files = [found]
    if found.name.endswith(".index.json"):
        index = read_json(found)
        shards = index.get("weight_map") if isinstance(index, dict) else None
        if not (isinstance(shards, dict) and isinstance(index.get("metadata"), dict) and all(
                isinstance(s, str) and s and (library != "diffusers" or os.path.basename(s) == s)
                for s in shards.values())):  # what the loaders read of it (diffusers: file names without a folder)
            return f"{found.relative_to(root).as_posix()} is not a weight index (a metadata entry, a weight_map of files)"
        files = [folder / s for s in sorted(set(shards.values()))]
        if missing := [f for f in files if not f.is_file()]:
            return f"{found.relative_to(root).as_posix()} names {missing[0].name}, which is not there"
    for file in files:
        if problem := file_problem(file):
            return f"{file.relative_to(root).as_posix()} {problem}"
    return None


def read_json(path: Path):
    """A JSON file's content, or None where it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def file_problem(path: Path) -> str | None:
    """What is wrong with a weight file, from its first bytes, size and header: a Git LFS pointer, a safetensors
    file whose size is not what its header describes, a zip (torch's pickle format) without its directory."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"version https://git-lfs"):
        return "is a Git LFS pointer, not the weights: fetch them (git lfs pull)"
    if path.suffix == ".safetensors":
        return safetensors_problem(path)
    if head.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(path):
        return f"is cut short ({path.stat().st_size:,} bytes, without the directory that ends a torch file): copy it again"
    return None


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file, from its size and header: an 8-byte header length, the JSON header,
    then exactly the bytes its tensors' offsets cover."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else size
        if length > MAX_HEADER:
            return "has no readable safetensors header: copy it again"
        if length > size - 8:
            return f"is cut short ({size:,} bytes, not even its header): copy it again"
        try:
            header = json.loads(f.read(length))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return "has no readable safetensors header: copy it again"
    if 8 + length + end != size:
        return (f"is {'cut short' if size < 8 + length + end else 'longer than its header says'} ({size:,} bytes, "
                f"its header describes {8 + length + end:,}): copy it again")
    return None


@contextlib.contextmanager
def no_random_weights():
    """Loading a diffusers model whose checkpoint lacks some of its weights only logs a warning ("Some weights of
    UNet2DConditionModel were not initialized from the model checkpoint at ... and are newly initialized: [...]")
    and goes on with those weights random: a checkpoint of another layout put under a diffusers config, say, and
    every image of the run made by random numbers. Such a load raises OSError naming the model and a weight."""
    lacking: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if message.startswith("Some weights of") and "newly initialized" in message:
                lacking.append(message)

    logger, catch = logging.getLogger("diffusers"), Catch(logging.WARNING)
    level = logger.level
    logger.setLevel(min(level or logging.WARNING, logging.WARNING))  # heard whatever DIFFUSERS_VERBOSITY says
    logger.addHandler(catch)
    try:
        yield
    finally:
        logger.removeHandler(catch)
        logger.setLevel(level)
    if lacking:
        head, _, keys = lacking[0].partition(" and are newly initialized: ")
        model, _, path = head.removeprefix("Some weights of ").partition(" were not initialized from the model checkpoint at ")
        keys = keys.split("\n")[0].strip("[]").replace("'", "").split(", ")
        raise OSError(f"{path.strip()}: its checkpoint lacks {len(keys)} of the {model}'s weights ({keys[0]}, ...), "
                      f"which diffusers would start at random: a checkpoint of another model or layout?")


def fingerprint(directory: Path, files: Sequence[str] = ("*",)) -> str:
    """sha256 over the relative path and content of every file matching one of the glob patterns `files`
    (matched against the relative path and the file name): the identity of a local model directory."""
    digest = hashlib.sha256()
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = file.relative_to(directory).as_posix()
        if any(fnmatch.fnmatch(rel, f) or fnmatch.fnmatch(file.name, f) for f in files):
            digest.update(rel.encode())
            digest.update(file_sha256(file).encode())
    return digest.hexdigest()


def digest_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "controlnet-pipeline" / "sha256.json"


def file_sha256(path: str | Path) -> str:
    """A file's sha256, remembered by (path, size, modification time) so that big weights are hashed once."""
    path = Path(path).resolve()
    st = path.stat()
    key, stamp = str(path), [st.st_size, st.st_mtime_ns]
    cache = digest_cache()
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known.get(key), dict) and known[key].get("stamp") == stamp:
        return known[key]["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if st.st_size >= 1 << 20:  # small files are cheaper to hash than to remember
        known[key] = {"stamp": stamp, "sha256": digest.hexdigest()}
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
            tmp.write_text(json.dumps(known))
            tmp.replace(cache)
        except OSError:
            pass  # a read-only home: hash again next time
    return digest.hexdigest()
