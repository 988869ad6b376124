"""Sources: turn a config's `source` into a Ray Dataset of rows {source_uri, source_bytes, caption}.

Paths go through fsspec, so local paths, globs and s3:// URLs take the same code; `storage_options`
(e.g. s3fs's endpoint_url, key, secret) reach the driver and, pickled with the filesystem, the
workers. For image folders the driver lists the files and the bytes are fetched inside the decode
task: a file that cannot be read then becomes an error row instead of failing the read of its whole
block. Parquet files and WebDataset shards are read by Ray Data datasources of ours (`tables`, `shards`);
their image bytes are passed through undecoded, so an undecodable image becomes an error row in the decode
stage.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import stat
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote_to_bytes

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import ray

from pipeline.config import SourceConfig

log = logging.getLogger(__name__)


class SourceError(ValueError):
    """A source that does not exist or holds nothing readable."""


class NotARegularFile(OSError):
    """An input that is a FIFO, a device or a directory, not a file."""


class InputTooLarge(ValueError):
    """An input with more bytes than `image.max_bytes`."""


def filesystem(url: str, storage_options: dict[str, Any]) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(url, **storage_options)


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Re-attach the protocol fsspec strips (local paths stay plain paths, see `local_uri`)."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return local_uri(path) if protocol in ("file", "local") else f"{protocol}://{path}"


def local_uri(path: str) -> str:
    """A local path as recorded in rows: the path itself, or where its name is not valid UTF-8 (any bytes
    are allowed in file names), a `file://` URL of its percent-encoded bytes, which `read_bytes` opens."""
    return path if utf8(path) else "file://" + quote(os.fsencode(path), safe="/")


def utf8(text: str) -> bool:
    """Whether `text` is valid UTF-8 (a name that is not keeps its bytes as surrogate escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def modified(info: dict[str, Any]) -> Any:
    """What tells a file's versions apart in an fsspec listing: its modification time, or its ETag (object stores)."""
    return info.get("mtime") or info.get("ETag") or info.get("LastModified")


def local_path(uri: str) -> str:
    """The file system path of a local uri (the inverse of `local_uri`)."""
    return os.fsdecode(unquote_to_bytes(uri.removeprefix("file://"))) if uri.startswith("file://") else uri


@dataclass(frozen=True)
class Listing:
    """The inputs of a source: files (images, Parquet or tar shards) as full URIs, sorted, and a digest of
    their names, sizes and modification stamps (a re-run of a finished job with the same digest has
    nothing to do)."""

    uris: list[str]
    digest: str
    skipped: int = 0  # entries that are not regular files (FIFOs, devices, links to them): never read

    def limited(self, limit: int | None) -> list[str]:
        """The files read under `source.limit` (for image folders, where a file is an input)."""
        return self.uris[:limit] if limit else self.uris


def list_inputs(cfg: SourceConfig, extensions: list[str]) -> Listing:
    """Every regular file with one of `extensions` under the configured directories/globs."""
    extensions = {"." + e.lower().lstrip(".") for e in extensions}
    found: dict[str, str] = {}
    skipped = 0
    for url in cfg.paths:
        fs, path = filesystem(url, cfg.storage_options)
        if fs.isdir(path):
            candidates = fs.find(path, detail=True)
        elif any(ch in path for ch in "*?["):
            candidates = fs.glob(path, detail=True)
        elif fs.isfile(path):
            candidates = {path: fs.info(path)}
        else:
            raise SourceError(f"source.path {url!r} does not exist")
        for p, info in candidates.items():
            if posixpath.splitext(p)[1].lower() not in extensions:
                continue
            if cfg.type != "images" and not utf8(p):  # an image file's name may be any bytes; these go to pyarrow
                name = repr(p.encode("utf-8", "surrogateescape"))[2:-1]
                raise SourceError(f"{name}: a {cfg.type} file is read through pyarrow, which needs file names in UTF-8: "
                                  f"rename it")
            dangling = False
            if info.get("islink"):  # find() describes a link itself, info() its target
                try:
                    info = fs.info(p)
                except OSError:  # a dangling link, or a loop of links
                    dangling = True  # listed: its read fails, an error row says so
            if info.get("type") != "file" and not dangling:  # a FIFO, a device or a link to one: a read would hang
                skipped += 1
                continue
            uri = full_uri(fs, p)
            found[uri] = f"{uri}\0{info.get('size')}\0{modified(info)}"
    if not found:
        raise SourceError(f"source.path {cfg.path!r} holds no files with extensions {sorted(extensions)}")
    uris = sorted(found)
    digest = hashlib.sha256("\n".join(found[u] for u in uris).encode("utf-8", "surrogateescape")).hexdigest()
    if skipped:
        log.warning("source.path %r: %d entries are not regular files (FIFOs, devices, links to them); skipped",
                    cfg.path, skipped)
    return Listing(uris, digest, skipped)


def list_files(cfg: SourceConfig, extensions: list[str]) -> list[str]:
    """Every regular file with one of `extensions` under the configured paths, sorted, as full URIs."""
    return list_inputs(cfg, extensions).uris


def read_bytes(uri: str, storage_options: dict[str, Any], max_bytes: int | None = None) -> bytes:
    """The bytes of a file, at most `max_bytes` (more: InputTooLarge). Local and remote paths are opened
    as they are, never as fsspec URL chains (`a::b.jpg` is the file `a::b.jpg`)."""
    limit = -1 if max_bytes is None else max_bytes + 1
    if "://" not in uri or uri.startswith("file://"):
        path = local_path(uri)
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the read forever
            raise NotARegularFile(f"not a regular file: {uri}")
        with open(path, "rb") as f:
            data = f.read(limit)
    else:
        protocol = uri.split("://", 1)[0]
        with fsspec.filesystem(protocol, **storage_options).open(uri, "rb") as f:
            data = f.read(limit)
    if max_bytes is not None and len(data) > max_bytes:
        raise InputTooLarge(f"over image.max_bytes={max_bytes} bytes")
    return data


def source_extensions(cfg: SourceConfig) -> list[str]:
    """What a source lists: image files, Parquet files or tar shards."""
    return {"images": cfg.extensions, "parquet": ["parquet"], "webdataset": ["tar"]}[cfg.type]


def read_source(cfg: SourceConfig, listing: Listing | None = None, max_bytes: int | None = None) -> ray.data.Dataset:
    """The source as rows {source_uri, source_bytes, caption}; `listing` saves listing it again. A shard's member
    over `max_bytes` (image.max_bytes) is not read."""
    listing = listing or list_inputs(cfg, source_extensions(cfg))
    if cfg.type == "images":
        uris = listing.limited(cfg.limit)
        return ray.data.from_items(
            [{"source_uri": u, "source_bytes": None, "caption": None} for u in uris],
            override_num_blocks=min(len(uris), 200),
        )
    ds = _read_webdataset(cfg, listing, max_bytes) if cfg.type == "webdataset" else _read_parquet(cfg, listing)
    return ds.limit(cfg.limit) if cfg.limit else ds


def check_columns(cfg: SourceConfig, listing: Listing) -> int | None:
    """Parquet: every listed file is Parquet and has the configured columns, read from the footers before any
    work (SourceError naming the file and the key). Otherwise a typo in `image_column` failed the run midway
    with Ray's "UDF failed", and a file without `caption_column` stopped it without naming the file. Returns the
    files' rows (each an input), from the same footers; None for other sources."""
    if cfg.type != "parquet":
        return None
    import pyarrow.parquet as pq

    fs, paths, _ = _arrow_files(cfg, listing)
    wanted = _parquet_columns(cfg)
    rows = 0
    for uri, path in zip(listing.uris, paths):
        try:
            with fs.open(path, "rb") as f:
                footer = pq.read_metadata(f)
            schema = footer.schema.to_arrow_schema()
        except (OSError, pa.ArrowException) as e:
            raise SourceError(f"{uri} is not a readable Parquet file ({type(e).__name__}: {e})") from None
        rows += footer.num_rows
        missing = [f"source.{key} {column!r}" for key, column in wanted.items() if column not in schema.names]
        if missing:
            raise SourceError(f"{uri} has no column for {', '.join(missing)}; its columns: {schema.names}")
        kind = schema.field(wanted["image_column"]).type
        if not image_cells(kind):
            raise SourceError(f"{uri}: source.image_column {wanted['image_column']!r} holds {kind}, not images (encoded "
                              f"bytes, a path, or a struct of bytes and path)")
        for key in ("caption_column", "prompt_column"):  # read as one string per image
            column = wanted.get(key)
            kind = schema.field(column).type if column else None
            text = kind is None or pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)
            if not text:
                raise SourceError(f"{uri}: source.{key} {column!r} holds {kind}, not text (one string per image)")
    return rows


def image_cells(kind: pa.DataType) -> bool:
    """Whether a Parquet column of this type holds images as the reader takes them: encoded bytes, a path, or a
    struct of `bytes` and `path` (a Hugging Face `datasets` Image feature)."""
    def scalar(t: pa.DataType) -> bool:
        return any(test(t) for test in (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_string,
                                        pa.types.is_large_string, pa.types.is_null))

    if pa.types.is_struct(kind):
        fields = {kind.field(i).name: kind.field(i).type for i in range(kind.num_fields)}
        known = [fields[f] for f in ("bytes", "path") if f in fields]
        return bool(known) and all(map(scalar, known))
    return scalar(kind)


def _parquet_columns(cfg: SourceConfig) -> dict[str, str]:
    """The Parquet columns a source reads, by their setting's name."""
    keys = ("image_column", "caption_column", "prompt_column", "mask_column")
    return {key: getattr(cfg, key) for key in keys if getattr(cfg, key)}


def _arrow_files(cfg: SourceConfig, listing: Listing) -> tuple[fsspec.AbstractFileSystem, list[str], pafs.FileSystem]:
    """The listed files as paths within one filesystem, plus that filesystem wrapped for Ray's readers."""
    fs, _ = filesystem(cfg.paths[0], cfg.storage_options)
    paths = [fs._strip_protocol(local_path(p)) for p in listing.uris]
    return fs, paths, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def read_parquet_files(paths: list[str], **kwargs) -> ray.data.Dataset:
    """`ray.data.read_parquet` over files already listed, through Ray Data's first Parquet datasource.

    Its second (Ray's default since 2.5x) lists the given files again and reads their footers on a pool of
    32 `FooterReader` actors per read, each a Ray worker process of its own: on a 2-core machine a training
    run over one Parquet file started four of them before its read was done, ~2.5 CPU-s each, and the whole
    run took 100 CPU-s without them against 129-160 with them. This one samples a few of the files in plain
    tasks (on the worker processes Ray already has) and reads the same rows in the same order."""
    context = ray.data.DataContext.get_current()
    was, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        return ray.data.read_parquet(paths, **kwargs)
    finally:
        context.use_datasource_v2 = was


def _read_parquet(cfg: SourceConfig, listing: Listing) -> ray.data.Dataset:
    from pipeline.io.tables import TableRows

    fs, paths, arrow_fs = _arrow_files(cfg, listing)
    return ray.data.read_datasource(TableRows(paths, fs, _parquet_columns(cfg), cfg.allowed_roots, filesystem=arrow_fs))


def _normalized(uri: str) -> str:
    """A uri with `.` and `..` resolved (and, for local paths, symbolic links), to compare with roots."""
    if "://" in uri and not uri.startswith("file://"):
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://{posixpath.normpath('/' + rest).lstrip('/')}"
    return os.path.realpath(local_path(uri))


def under_roots(uri: str, roots: list[str]) -> bool:
    """Whether `uri` lies under one of `roots` (directories or URL prefixes)."""
    target = _normalized(uri)
    for root in map(_normalized, roots):
        if target == root or target.startswith(root.rstrip("/") + "/"):
            return True
    return False


def _read_webdataset(cfg: SourceConfig, listing: Listing, max_bytes: int | None) -> ray.data.Dataset:
    """WebDataset tar shards: members sharing a key (`sample01.jpg`, `sample01.txt`) form a sample.

    The image is the first member whose extension is in `extensions`; the caption is the `.txt`
    member, else `caption_key` in the `.json` member. Samples without an image member are not
    inputs (as non-image files in a folder are not). source_uri is `<shard URI>#<key>`.
    """
    from pipeline.io.shards import Shards

    fs, paths, arrow_fs = _arrow_files(cfg, listing)
    return ray.data.read_datasource(Shards(paths, fs, cfg.extensions, cfg.caption_key, max_bytes, filesystem=arrow_fs))


ROWS_PER_BLOCK = 64  # inputs a block read from a shard or a Parquet file (their images' bytes)
# source_error: why a row cannot be read at all (e.g. a path outside source.allowed_roots); decode rejects it
SOURCE_SCHEMA = pa.schema([("source_uri", pa.string()), ("source_bytes", pa.binary()), ("caption", pa.string()),
                           ("source_error", pa.string())])
