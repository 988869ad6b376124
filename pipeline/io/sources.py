"""Sources: turn a config's `source` into a Ray Dataset of rows {source_uri, source_bytes, caption}.

Paths go through fsspec, so local paths, globs and s3:// URLs take the same code; `storage_options`
(e.g. s3fs's endpoint_url, key, secret) reach the driver and, pickled with the filesystem, the
workers. For image folders the driver lists the files and the bytes are fetched inside the decode
task: a file that cannot be read then becomes an error row instead of failing the read of its whole
block. Parquet and WebDataset shards are read by Ray Data's readers; their image bytes are passed
through undecoded, so an undecodable image becomes an error row in the decode stage.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from typing import TYPE_CHECKING, Any

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import ray

from pipeline.config import SourceConfig

if TYPE_CHECKING:
    import pandas as pd


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
    ds = _read_webdataset(cfg) if cfg.type == "webdataset" else _read_parquet(cfg)
    return ds.limit(cfg.limit) if cfg.limit else ds


def _arrow_files(cfg: SourceConfig, extensions: list[str]) -> tuple[fsspec.AbstractFileSystem, list[str], pafs.FileSystem]:
    """The listed files as paths within one filesystem, plus that filesystem wrapped for Ray's readers."""
    fs, _ = filesystem(cfg.paths[0], cfg.storage_options)
    paths = [filesystem(p, cfg.storage_options)[1] for p in list_files(cfg, extensions)]
    return fs, paths, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def _read_parquet(cfg: SourceConfig) -> ray.data.Dataset:
    fs, paths, arrow_fs = _arrow_files(cfg, ["parquet"])
    columns = [cfg.image_column] + ([cfg.caption_column] if cfg.caption_column else [])
    ds = ray.data.read_parquet(paths, columns=columns, include_paths=True, filesystem=arrow_fs)
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

    return ds.map_batches(normalize, batch_format="pyarrow")


def _read_webdataset(cfg: SourceConfig) -> ray.data.Dataset:
    """WebDataset tar shards: members sharing a key (`sample01.jpg`, `sample01.txt`) form a sample.

    The image is the first member whose extension is in `extensions`; the caption is the `.txt`
    member, else `caption_key` in the `.json` member. Samples without an image member are not
    inputs (as non-image files in a folder are not). source_uri is `<shard URI>#<key>`.
    """
    fs, paths, arrow_fs = _arrow_files(cfg, ["tar"])
    image_exts = list(dict.fromkeys(e.lower().lstrip(".") for e in cfg.extensions))
    wanted = set(image_exts) | {"txt", "json"}
    ds = ray.data.read_webdataset(
        paths,
        filesystem=arrow_fs,
        decoder=None,  # raw bytes: decoding (and rejecting) images is the decode stage's job
        suffixes=lambda suffix: suffix.lower() in wanted,
    )
    caption_key = cfg.caption_key

    def normalize(batch: pd.DataFrame) -> pa.Table:
        rows = []
        for sample in batch.to_dict("records"):  # a member missing from this sample reads as NaN
            members = {k.lower(): v for k, v in sample.items() if not k.startswith("__") and isinstance(v, bytes)}
            image = next((members[e] for e in image_exts if e in members), None)
            if image is not None:
                uri = f"{full_uri(fs, sample['__url__'])}#{sample['__key__']}"
                caption = _webdataset_caption(members, caption_key)
                rows.append({"source_uri": uri, "source_bytes": image, "caption": caption})
        return pa.Table.from_pylist(rows, schema=SOURCE_SCHEMA)

    # The reader yields pandas blocks whose columns are the members found in the shard; batch_size=None
    # takes one block per batch, so shards with different members are never concatenated.
    return ds.map_batches(normalize, batch_format="pandas", batch_size=None)


def _webdataset_caption(members: dict[str, bytes], json_key: str) -> str | None:
    if "txt" in members:
        return members["txt"].decode("utf-8", errors="replace").strip()
    if "json" in members:
        try:
            value = json.loads(members["json"]).get(json_key)
        except (ValueError, AttributeError):  # not JSON, or not a JSON object
            return None
        return value if isinstance(value, str) else None
    return None


SOURCE_SCHEMA = pa.schema([("source_uri", pa.string()), ("source_bytes", pa.binary()), ("caption", pa.string())])
