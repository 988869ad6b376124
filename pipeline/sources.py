"""Sources: turn a config's `source` into a Ray Dataset of rows {source_uri, source_bytes, caption}.

Paths go through fsspec, so local paths, globs and s3:// URLs take the same code. For image
folders the driver lists the files and the bytes are fetched inside the decode task: a file that
cannot be read then becomes an error row instead of failing the read of its whole block.
"""

from __future__ import annotations

import hashlib
import posixpath
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import ray

from pipeline.config import SourceConfig


class SourceError(ValueError):
    """A source that does not exist or holds nothing readable."""


def filesystem(url: str, storage_options: dict[str, Any]) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(url, **storage_options)


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Re-attach the protocol fsspec strips (local paths stay plain paths)."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def list_files(cfg: SourceConfig, extensions: list[str]) -> list[str]:
    """Every file with one of `extensions` under the configured directories/globs, sorted, as full URIs."""
    extensions = {"." + e.lower().lstrip(".") for e in extensions}
    found: set[str] = set()
    for url in cfg.paths:
        fs, path = filesystem(url, cfg.storage_options)
        if fs.isdir(path):
            candidates = fs.find(path)
        elif any(ch in path for ch in "*?["):
            candidates = fs.glob(path)
        elif fs.isfile(path):
            candidates = [path]
        else:
            raise SourceError(f"source.path {url!r} does not exist")
        found.update(full_uri(fs, p) for p in candidates if posixpath.splitext(p)[1].lower() in extensions)
    if not found:
        raise SourceError(f"source.path {cfg.path!r} holds no files with extensions {sorted(extensions)}")
    return sorted(found)


def read_bytes(uri: str, storage_options: dict[str, Any]) -> bytes:
    with fsspec.open(uri, "rb", **storage_options) as f:
        return f.read()


def read_source(cfg: SourceConfig) -> ray.data.Dataset:
    if cfg.type == "images":
        uris = list_files(cfg, cfg.extensions)
        uris = uris[: cfg.limit] if cfg.limit else uris
        return ray.data.from_items(
            [{"source_uri": u, "source_bytes": None, "caption": None} for u in uris],
            override_num_blocks=min(len(uris), 200),
        )
    return _read_parquet(cfg)


def _read_parquet(cfg: SourceConfig) -> ray.data.Dataset:
    fs, _ = filesystem(cfg.paths[0], cfg.storage_options)
    paths = [filesystem(p, cfg.storage_options)[1] for p in list_files(cfg, ["parquet"])]
    columns = [cfg.image_column] + ([cfg.caption_column] if cfg.caption_column else [])
    ds = ray.data.read_parquet(
        paths,
        columns=columns,
        include_paths=True,
        filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(fs)),
    )
    image_col, caption_col = cfg.image_column, cfg.caption_column

    def normalize(batch: pa.Table) -> pa.Table:
        rows = []
        for row in batch.to_pylist():
            value = row[image_col]
            data, name = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (value, None)
            if isinstance(data, str):
                data, name = None, data
            parquet_uri = full_uri(fs, row["path"])
            if name and data is None:
                # a path column: relative paths are relative to the Parquet file
                uri = name if "://" in name or name.startswith("/") else posixpath.join(posixpath.dirname(parquet_uri), name)
            else:
                uri = f"{parquet_uri}#{name or 'sha256=' + hashlib.sha256(data or b'').hexdigest()[:16]}"
            rows.append({"source_uri": uri, "source_bytes": data, "caption": row.get(caption_col) if caption_col else None})
        return pa.Table.from_pylist(rows, schema=SOURCE_SCHEMA)

    ds = ds.map_batches(normalize, batch_format="pyarrow")
    return ds.limit(cfg.limit) if cfg.limit else ds


SOURCE_SCHEMA = pa.schema([("source_uri", pa.string()), ("source_bytes", pa.binary()), ("caption", pa.string())])
