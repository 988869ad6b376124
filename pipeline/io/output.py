"""A run's output directory: the one place that writes files into it atomically and reads it back.

`atomic_open` writes under a temporary name in the same directory and renames into place, so a
reader never sees a partial file (a crash leaves a `.tmp-*` file that resume removes). `RunOutput`
reads what a run wrote (manifest, Parquet files, written ids) for resume, report, inspect and export.
"""

from __future__ import annotations

import base64
import json
import posixpath
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Iterator

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.io.sources import filesystem, modified
from pipeline.schema import IMAGE

# rejected/: samples below the quality gate (quality.action drop); sources/: output.layout normalized
KINDS = ("samples", "errors", "rejected", "sources")


class NotARunOutput(ValueError):
    """A directory without the manifest.json a run writes."""


class DamagedParquet(NotARunOutput):
    """A Parquet file of an output that cannot be read (cut short, overwritten): named, with what to do."""

    def __init__(self, name: str, error: Exception):
        super().__init__(f"{name} is not a readable Parquet file ({type(error).__name__}: {error}); move it out of "
                         f"the output and run the job's command again (its inputs are done again)")


class UnsafeParquet(ValueError):
    """A Parquet file whose columns would run code when read (Arrow extension types, e.g. pickled objects)."""


def check_plain_parquet(f, name: str) -> None:
    """Refuse a Parquet file that declares Arrow extension types. Reading those can unpickle data
    (Ray's `arrow_pickled_object`), so a crafted file in a shared bucket could run code. The check reads
    the footer's key-value metadata only, without deserialising the Arrow schema stored there."""
    metadata = footer(f, name).metadata or {}
    if b"ARROW:extension:name" in base64.b64decode(metadata.get(b"ARROW:schema", b"")):
        raise UnsafeParquet(f"{name} declares Arrow extension columns; refusing to read it (only plain Parquet "
                            f"as this pipeline writes it is read back)")
    f.seek(0)


def footer(f, name: str) -> pq.FileMetaData:
    """A Parquet file's footer; DamagedParquet naming the file where it is not Parquet or is cut short."""
    try:
        return pq.read_metadata(f)
    except pa.ArrowInvalid as e:
        raise DamagedParquet(name, e) from None


def read_parquet(f, name: str, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file's columns, after `check_plain_parquet`."""
    check_plain_parquet(f, name)
    try:
        return pq.read_table(f, columns=columns)
    except pa.ArrowInvalid as e:  # a footer that reads, over data that does not (a missing column is a KeyError)
        raise DamagedParquet(name, e) from None


@contextmanager
def atomic_open(fs: fsspec.AbstractFileSystem, path: str, mode: str = "wb") -> Iterator[Any]:
    """Open `path` for writing under a temporary name next to it; rename into place on success."""
    tmp = posixpath.join(posixpath.dirname(path), f".tmp-{uuid.uuid4().hex}")
    try:
        with fs.open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise
    fs.mv(tmp, path)


def write_parquet(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table) -> None:
    with atomic_open(fs, path) as f:
        pq.write_table(table, f, compression="zstd")


@dataclass(frozen=True)
class Written:
    """What the Parquet files under an output path hold (read from their id columns only)."""

    samples: list[dict[str, Any]] = field(default_factory=list)  # samples/: sample_id, source_uri, one per row
    errors: list[dict[str, Any]] = field(default_factory=list)  # errors/: sample_id, source_uri, stage
    files: list[str] = field(default_factory=list)  # relative to the output path
    rejected: list[dict[str, Any]] = field(default_factory=list)  # rejected/ (below the quality gate): as samples
    gated: bool = False  # the output has a rejected/ folder (a run with quality.action drop)
    source_rows: frozenset[str] = frozenset()  # sources/ (output.layout normalized): the sources' sha256

    @property
    def sample_ids(self) -> list[str]:
        return [r["sample_id"] for r in self.samples]

    @cached_property  # built once, used by the log line and the skip stages
    def done_samples(self) -> dict[str, str]:
        """Sample ids that are finished (written as a sample, a rejected sample or a failed sample) -> their
        source uri."""
        return {r["sample_id"]: r["source_uri"] for r in self.samples + self.rejected + self.errors if r["sample_id"]}

    @cached_property
    def done_sources(self) -> frozenset[str]:
        """Sources rejected before variants existed (unreadable, not an image, annotator failure)."""
        return frozenset(e["source_uri"] for e in self.errors if not e["sample_id"])

    def counts(self, variants: int) -> dict[str, Any]:
        rejected = sum(1 for e in self.errors if not e["sample_id"])
        failed = len(self.errors) - rejected
        below = [r["sample_id"] for r in self.rejected]
        ids = Counter(self.sample_ids + below + [e["sample_id"] for e in self.errors if e["sample_id"]])
        return {
            # every input ends as one error row before expansion, or as `variants` rows after it
            "inputs": rejected + (len(self.sample_ids) + len(below) + failed) // variants,
            "rejected_inputs": rejected,
            "samples": len(self.sample_ids),
            **({"rejected_samples": len(below)} if self.gated or below else {}),  # below the quality gate
            "failed_samples": failed,
            "errors": len(self.errors),
            "errors_by_stage": dict(Counter(e["stage"] for e in self.errors)),
            "duplicate_sample_ids": sum(n - 1 for n in ids.values() if n > 1),
        }


class RunOutput:
    """A run's output directory (local path or fsspec URL)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = url
        self.storage_options = storage_options or {}
        self.fs, self.root = filesystem(url, self.storage_options)

    def location(self) -> str:
        """The output as an absolute URL (file:// for local paths)."""
        return self.url if "://" in self.url else "file://" + self.root

    def path(self, name: str) -> str:
        return posixpath.join(self.root, name)

    def file_in_the_way(self) -> str | None:
        """The path itself or the nearest existing folder above it, where that is a file (nothing can be
        written under it); None otherwise."""
        path = self.root
        while path and not self.fs.isdir(path):
            if self.fs.isfile(path):
                return path
            if posixpath.dirname(path) == path:
                break
            path = posixpath.dirname(path)
        return None

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name))

    # ---------------------------------------------------------------- writing

    def open_atomic(self, name: str, mode: str = "wb"):
        return atomic_open(self.fs, self.path(name), mode)

    def write_text(self, name: str, text: str) -> str:
        """Write atomically; returns the path written."""
        with self.open_atomic(name, "w") as f:
            f.write(text)
        return self.path(name)

    def write_json(self, name: str, doc: dict[str, Any]) -> str:
        return self.write_text(name, json.dumps(doc, indent=2, default=str) + "\n")

    def remove_temporaries(self) -> None:
        """Temporary files of writes a crash interrupted (never listed in a manifest)."""
        for pattern in (".tmp-*", *(f"{kind}/.tmp-*" for kind in KINDS)):
            for p in self.fs.glob(self.path(pattern)):
                self.fs.rm(p)

    # ---------------------------------------------------------------- reading

    def read_text(self, name: str, default: str | None = None) -> str:
        if default is not None and not self.exists(name):
            return default
        with self.fs.open(self.path(name), "r") as f:
            return f.read()

    def read_manifest(self) -> dict[str, Any] | None:
        """The run's manifest; None where there is none; NotARunOutput where it is damaged."""
        if not self.exists("manifest.json"):
            return None
        try:
            manifest = json.loads(self.read_text("manifest.json"))
        except (ValueError, UnicodeDecodeError) as e:
            raise NotARunOutput(f"{self.path('manifest.json')} is damaged ({type(e).__name__}: {e}): "
                                f"not a run's manifest") from None
        if not isinstance(manifest, dict):
            raise NotARunOutput(f"{self.path('manifest.json')} is damaged (a JSON {type(manifest).__name__}, not an "
                                f"object): not a run's manifest")
        return manifest

    def manifest(self) -> dict[str, Any]:
        manifest = self.read_manifest()
        if manifest is None:
            raise NotARunOutput(f"{self.url} holds no manifest.json: not the output of a run")
        return manifest

    def files(self, kind: str) -> list[str]:
        return sorted(self.fs.glob(self.path(f"{kind}/*.parquet")))

    def digest(self, kinds: tuple[str, ...] = ("samples", "sources")) -> str:
        """16 hex digits that change when a file of these kinds is added, removed or rewritten (names, sizes and
        modification stamps, or ETags): what `datasets` needs told to read them again (see docs.card)."""
        import hashlib

        stamps = []
        for kind in kinds:  # one listing with the files' details (a request per file on S3 otherwise)
            for path, info in sorted(self.fs.glob(self.path(f"{kind}/*.parquet"), detail=True).items()):
                stamps.append([posixpath.relpath(path, self.root), info.get("size"),
                               str(modified(info))])
        return hashlib.sha256(json.dumps(stamps).encode()).hexdigest()[:16]

    @cached_property
    def normalized(self) -> bool:
        """The output has the normalized layout: samples' source columns are in sources/."""
        return self.fs.isdir(self.path("sources"))

    def read_file(self, path: str, columns: list[str] | None) -> pa.Table:
        """These columns of one Parquet file. In a normalized output a samples/ or rejected/ file reads the
        source columns it asks for (image, control maps, keypoints) from sources/, as if they were its own;
        `columns` None: every column of the file (and in a normalized output, those of its sources)."""
        with self.fs.open(path, "rb") as f:
            if not self.normalized or posixpath.basename(posixpath.dirname(path)) not in ("samples", "rejected"):
                return read_parquet(f, path, columns)
            own = pq.read_schema(f).names
            f.seek(0)
            wanted = columns if columns is not None else own + [n for n in self.sources_schema().names if n not in own]
            moved = [c for c in wanted if c not in own]
            mine = [c for c in wanted if c in own]
            table = read_parquet(f, path, mine + (["source_sha256"] if moved and "source_sha256" not in mine else []))
        if not moved:
            return table
        shas = table.column("source_sha256")
        found = self.source_columns(moved, set(shas.to_pylist()))
        index = {sha: i for i, sha in enumerate(found.column("source_sha256").to_pylist())}
        missing = [sha for sha in shas.to_pylist() if sha not in index]
        if missing:
            raise ValueError(f"{path}: no row in sources/ for source {missing[0]} (an incomplete normalized output)")
        rows = pa.array([index[sha] for sha in shas.to_pylist()], pa.int64())
        for name in moved:
            table = table.append_column(name, found.column(name).take(rows))
        return table.select(wanted)

    def schema_of(self, kind: str) -> pa.Schema:
        """The columns of the first file of `kind` (samples, sources, ...), as written."""
        files = self.files(kind)
        if not files:
            return pa.schema([])
        with self.fs.open(files[0], "rb") as f:
            check_plain_parquet(f, files[0])
            return pq.read_schema(f)

    def sources_schema(self) -> pa.Schema:
        return self.schema_of("sources")

    @cached_property
    def source_files(self) -> dict[str, str]:
        """sources/ (normalized layout): which file holds each source's row, read once from the key column."""
        return {sha: path for path in self.files("sources")
                for sha in self.read_file(path, ["source_sha256"]).column("source_sha256").to_pylist()}

    def source_columns(self, columns: list[str], shas: set[str]) -> pa.Table:
        """These columns of the sources/ rows of these sources (with source_sha256), one row per source;
        only the files holding them are read."""
        key = pa.array(sorted(shas), pa.string())
        parts = []
        for path in sorted({self.source_files[sha] for sha in shas if sha in self.source_files}):
            part = self.read_file(path, ["source_sha256", *columns])
            parts.append(part.filter(pc.is_in(part.column("source_sha256"), value_set=key)))
        return pa.concat_tables(parts) if parts else pa.table({"source_sha256": pa.array([], pa.string())})

    def read(self, kind: str, columns: list[str]) -> pa.Table | None:
        """These columns of every file of `kind` (samples, errors); None when there are no files."""
        tables = [self.read_file(p, columns) for p in self.files(kind)]
        return pa.concat_tables(tables) if tables else None

    def num_rows(self, kind: str) -> int:
        total = 0
        for p in self.files(kind):
            with self.fs.open(p, "rb") as f:
                total += footer(f, p).num_rows
        return total

    def samples_schema(self) -> pa.Schema:
        """The samples' columns, in a normalized output with those their sources hold (as the rows read)."""
        schema = self.schema_of("samples")
        if self.normalized and schema.names:
            schema = pa.schema([*schema, *(f for f in self.sources_schema() if f.name not in schema.names)])
        return schema

    def control_columns(self) -> list[str]:
        return [f.name for f in self.samples_schema() if f.type == IMAGE and f.name.startswith("control_")]

    def generated(self) -> bool:
        """Whether the run generated images (False: an annotate-only job)."""
        return "generated" in self.samples_schema().names

    def written(self) -> Written:
        """The ids of everything written (what a resume skips, what the manifest counts)."""
        samples = self.read("samples", ["sample_id", "source_uri"])
        errors = self.read("errors", ["sample_id", "source_uri", "stage"])
        rejected = self.read("rejected", ["sample_id", "source_uri"])
        sources = self.read("sources", ["source_sha256"])
        files = [posixpath.relpath(p, self.root) for kind in KINDS for p in self.files(kind)]
        return Written(samples.to_pylist() if samples is not None else [],
                       errors.to_pylist() if errors is not None else [], files,
                       rejected.to_pylist() if rejected is not None else [], self.fs.isdir(self.path("rejected")),
                       frozenset(sources.column("source_sha256").to_pylist()) if sources is not None else frozenset())
