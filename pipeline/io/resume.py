"""Resume: what an earlier run into the same output path wrote, and whether it was the same job.

A run writes `manifest.json` with `completed: false` and the job's fingerprint before any data
moves, and again with `completed: true` and the counts at the end. Re-running the same command
after a crash (driver or worker killed) reads the ids already written to `samples/` and `errors/`
and skips that work, so the job ends with every input exactly once. A different job into the same
path is refused unless the config says to overwrite it or to write a new version next to it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import JobConfig
from pipeline.ids import sample_ids
from pipeline.io.output import NotARunOutput, RunOutput, Written
from pipeline.rows import map_rows

# Settings that change how fast a job runs or where it reads credentials, not what it writes;
# a resume may change them (e.g. more actors on a bigger cluster, or a bigger `limit`).
EXECUTION_KEYS = {"num_gpus", "num_cpus", "actors", "batch_size", "storage_options", "limit", "local_files_only"}
RUN_FILES = ("manifest.json", "samples", "errors", "rejected", "sources", "stats.txt", "report.html", "README.md",
             "croissant.json")


class OutputExists(RuntimeError):
    """The output path holds a different job's run and the config does not say what to do with it."""


def job_identity(cfg: JobConfig, models_provenance: dict[str, Any]) -> dict[str, Any]:
    """Everything that decides what the job writes: the config without output and execution
    settings, plus the resolved revision of every model."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in EXECUTION_KEYS}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    # settings left at their defaults are left out, so a setting added in a later version (with a default that
    # keeps what earlier versions did) does not make earlier runs look like a different job
    identity = strip({k: v for k, v in cfg.model_dump(mode="json", exclude_defaults=True).items() if k != "output"})
    if cfg.output.layout != "flat":  # where the source columns go is part of what the job writes
        identity["output"] = {"layout": cfg.output.layout}
    identity["model_revisions"] = _revisions(models_provenance)
    return identity


def _revisions(provenance: Any) -> Any:
    if isinstance(provenance, dict):
        if "commit" in provenance:
            return provenance["commit"]
        return {k: _revisions(v) for k, v in provenance.items()}
    if isinstance(provenance, list):
        return [_revisions(v) for v in provenance]
    return provenance


def fingerprint(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON-like values."""
    if isinstance(old, dict) and new is None or old is None and isinstance(new, dict):  # a section set on one side
        old, new = old or {}, new or {}
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += differences(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in differences(a, b, f"{prefix}{i}.")]
    return [] if old == new else [prefix.rstrip(".")]


@dataclass(frozen=True)
class Output:
    path: str
    manifest: dict[str, Any] | None  # the earlier run's manifest when resuming
    written: Written

    @property
    def resuming(self) -> bool:
        return self.manifest is not None


def open_output(cfg: JobConfig, identity: dict[str, Any], dry_run: bool = False) -> Output:
    """Decide where this run writes: a fresh path, the same job's earlier run (resume), a new
    version next to a different job's run, or nowhere (OutputExists)."""
    out = cfg.output
    target = RunOutput(out.path, out.storage_options)
    existing = [p for p in RUN_FILES if target.exists(p)]
    if out.overwrite:
        for p in existing if not dry_run else ():
            target.fs.rm(target.path(p), recursive=True)
        existing = []
    if not existing:
        if not dry_run:
            target.fs.makedirs(target.root, exist_ok=True)
        return Output(out.path, None, Written())
    try:
        manifest, damaged = target.read_manifest(), None
    except NotARunOutput as e:
        manifest, damaged = None, e
    if manifest and manifest.get("job_fingerprint") == fingerprint(identity):
        if not dry_run:
            target.remove_temporaries()
        return Output(out.path, manifest, target.written())
    if manifest and existing == ["manifest.json"] and not manifest.get("completed"):
        # a run that stopped before it wrote a row (a model that could not load, fixed since: its fingerprint
        # changed): nothing to keep apart, so this run starts afresh here
        return Output(out.path, None, Written())
    if out.new_version:
        base, n = _version_base(out.path), 2
        while True:
            candidate = cfg.model_copy(update={"output": out.model_copy(update={"path": f"{base}-v{n}", "new_version": False})})
            try:
                return open_output(candidate, identity, dry_run)
            except OutputExists:
                n += 1
    if damaged is not None:
        raise OutputExists(f"output.path {out.path}: {damaged}; choose another path or set output.overwrite=true")
    if manifest is None:
        raise OutputExists(f"output.path {out.path} holds files ({', '.join(existing)}) but no manifest.json; "
                           f"choose another path or set output.overwrite=true")
    changed = differences(manifest.get("job_identity"), identity) if manifest.get("job_identity") else ["(unknown)"]
    raise OutputExists(
        f"output.path {out.path} holds a run of a different job (changed: {', '.join(changed[:8])}"
        f"{', ...' if len(changed) > 8 else ''}); set output.overwrite=true to replace it, "
        f"output.new_version=true to write next to it, or choose another path"
    )


def _version_base(path: str) -> str:
    head, sep, tail = path.rstrip("/").rpartition("-v")
    return head if sep and tail.isdigit() else path.rstrip("/")


class DuplicateContent(ValueError):
    """An input whose bytes equal another input's: it would get the same sample ids."""


class SkipWritten:
    """Drop work an earlier run of this job wrote. Before decode: sources rejected as a whole.
    After decode: sources whose every variant is written (so no annotator runs for them again); a
    source whose variants were written from another source with the same content is a duplicate."""

    def __init__(self, done_ref, job_seed: int, variants: int, after_decode: bool):
        self.done_ref, self.job_seed, self.variants, self.after_decode = done_ref, job_seed, variants, after_decode
        self._done: tuple[dict[str, str], pa.Array] | None = None

    def done(self) -> tuple[dict[str, str], pa.Array, frozenset[str]]:
        """(finished sample ids -> source uri, rejected source uris, sha256s of the rows in sources/), fetched
        once per worker."""
        if self._done is None:
            import ray

            samples, sources, source_rows = ray.get(self.done_ref)
            self._done = samples, pa.array(sorted(sources), pa.string()), source_rows
        return self._done

    def __call__(self, batch: pa.Table) -> pa.Table:
        samples, sources, _ = self.done()
        if not self.after_decode:
            return batch.filter(pc.invert(pc.is_in(batch["source_uri"], value_set=sources)))
        return map_rows("dedupe", batch, lambda row: self.unfinished(row, samples))

    def unfinished(self, row: dict, samples: dict[str, str]) -> list[dict]:
        owners = {samples.get(i) for i in sample_ids(self.job_seed, row["source_sha256"], self.variants)}
        if None in owners:
            return [row]  # work left; variant expansion skips the written variants
        if row["source_uri"] in owners:
            return []
        raise DuplicateContent(f"same content as {min(owners)}")

    def variant_done(self, sample_id: str) -> bool:
        return sample_id in self.done()[0]

    def source_done(self, source_sha256: str) -> bool:
        """output.layout normalized: the source's row is in sources/ already."""
        return source_sha256 in self.done()[2]


class FirstCopy:
    """The dedupe stage: the first input with some content keeps it, later inputs with the same bytes become
    error rows naming the first, so sample ids stay unique and every copy is accounted for. Which input was
    first is decided by `registry`, the one actor of the run that every input's content hash passes through
    (`console.Progress.first_copies`), so the stage itself runs as a task, fused into decoding."""

    def __init__(self, registry):
        self.registry = registry

    def __call__(self, batch: pa.Table) -> pa.Table:
        import ray

        if "source_sha256" not in batch.column_names:  # every row failed before its bytes were hashed
            return batch
        good = batch.filter(pc.is_null(batch["error_stage"])) if "error_stage" in batch.column_names else batch
        inputs = list(zip(good["source_sha256"].to_pylist(), good["source_uri"].to_pylist()))
        first = dict(zip(inputs, ray.get(self.registry.first_copies.remote(inputs)))) if inputs else {}
        return map_rows("dedupe", batch, lambda row: self.check(row, first))

    @staticmethod
    def check(row: dict, first: dict[tuple[str, str], str]) -> list[dict]:
        holder = first[(row["source_sha256"], row["source_uri"])]
        if holder != row["source_uri"]:
            raise DuplicateContent(f"same content as {holder}")
        return [row]
