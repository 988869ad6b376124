"""WebDataset tar shards as source rows, a damaged shard as an error row (`pipeline.io.sources` reads with it)."""

from __future__ import annotations

import json
import posixpath
import tarfile
from collections.abc import Iterator

import fsspec
import pyarrow as pa
from ray.data.datasource import FileBasedDatasource

from pipeline.io.sources import ROWS_PER_BLOCK, SOURCE_SCHEMA, full_uri


class Shards(FileBasedDatasource):
    """Ray Data's WebDataset reader, tolerant of a damaged shard: a file that is not a tar archive, or one that
    breaks off partway, is one error row naming the shard (what it held before the damage is read), where
    `ray.data.read_webdataset` stopped the whole job with tarfile's message and no file name. Members are read in
    tarfile's stream mode, one at a time, and grouped by key as WebDataset defines it (the path up to the first
    dot of the file name; a sample's members are adjacent): members of a key that comes back after another key
    are an error row of their own, named `<shard>#<member>` (the key's first sample keeps `<shard>#<key>`). A
    member over `max_bytes` (image.max_bytes) is never read: its sample is an error row. I/O errors are not caught
    here: Ray Data retries the read as it retries any other."""

    def __init__(self, paths: list[str], fs: fsspec.AbstractFileSystem, extensions: list[str], caption_key: str,
                 max_bytes: int | None = None, **kwargs):
        super().__init__(paths, **kwargs)
        self.fs, self.caption_key, self.max_bytes = fs, caption_key, max_bytes
        self.image_exts = list(dict.fromkeys(e.lower().lstrip(".") for e in extensions))
        self.wanted = set(self.image_exts) | {"txt", "json"}

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        shard, rows, read, seen, damage = full_uri(self.fs, path), [], 0, set(), None
        key, members = None, {}  # the sample being read: its key and wanted members (None: its key came back)
        try:
            tar = tarfile.open(fileobj=f, mode="r|*")  # noqa: SIM115 - closed with `f`, which Ray Data opened
            for member in tar:
                # a name that is not UTF-8 (tarfile keeps its bytes as surrogate escapes) shows them as \xNN
                member.name = member.name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                stem, dot, ext = posixpath.basename(member.name).partition(".")
                if not member.isreg() or not stem or not dot:
                    continue
                name = posixpath.join(posixpath.dirname(member.name), stem)
                if name != key:
                    rows += self.sample(shard, key, members)
                    seen.add(key)
                    key, members = name, (None if name in seen else {})
                    if members is None:  # named by its member, not its key: the key's first sample has that URI
                        rows.append(error_row(f"{shard}#{member.name}", f"the members of {name!r} are not adjacent "
                                                                        f"in the shard (WebDataset keeps a sample's "
                                                                        f"files together)"))
                if members is not None and ext.lower() in self.wanted and ext.lower() not in members:
                    too_big = self.max_bytes is not None and member.size > self.max_bytes  # its size, unread
                    members[ext.lower()] = member.size if too_big else tar.extractfile(member).read()
                if len(rows) >= ROWS_PER_BLOCK:
                    read += sum(1 for r in rows if r["source_error"] is None)
                    yield pa.Table.from_pylist(rows, schema=SOURCE_SCHEMA)
                    rows = []
        except tarfile.TarError as e:  # not a tar archive, a damaged header, data cut short
            damage = e
        rows += self.sample(shard, key, members)
        if damage is not None:
            read += sum(1 for r in rows if r["source_error"] is None)
            rows.append(error_row(shard, f"not a readable tar shard: {damage}; samples read before it: {read}"))
        if rows:
            yield pa.Table.from_pylist(rows, schema=SOURCE_SCHEMA)

    def sample(self, shard: str, key: str | None, members: dict[str, bytes | int] | None) -> list[dict]:
        """The sample's row; none for a sample without an image member (not an input), or whose key came back. A
        member too large to read holds its size."""
        image = next((members[e] for e in self.image_exts if e in members), None) if members else None
        if image is None:
            return []
        for ext, value in members.items():
            if isinstance(value, int):
                return [error_row(f"{shard}#{key}", f"its .{ext} member is {value} bytes, over image.max_bytes="
                                                    f"{self.max_bytes} (not read)")]
        return [{"source_uri": f"{shard}#{key}", "source_bytes": image,
                 "caption": caption(members, self.caption_key), "source_error": None}]


def error_row(uri: str, reason: str) -> dict:
    """A row the decode stage rejects with `reason`."""
    return {"source_uri": uri, "source_bytes": None, "caption": None, "source_error": reason}


def caption(members: dict[str, bytes], json_key: str) -> str | None:
    """The `.txt` member, else `json_key` of the `.json` member (not JSON, or not a string: no caption)."""
    if "txt" in members:
        return members["txt"].decode("utf-8", errors="replace").strip()
    if "json" in members:
        try:
            value = json.loads(members["json"]).get(json_key)
        except (ValueError, AttributeError):  # not JSON, or not a JSON object
            return None
        # JSON may escape a lone surrogate ("\udce9"), which is no UTF-8 text: replaced
        return value.encode("utf-8", "replace").decode("utf-8") if isinstance(value, str) else None
    return None
