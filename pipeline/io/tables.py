"""Parquet tables as source rows, one input per table row (`pipeline.io.sources` reads with it)."""

from __future__ import annotations

import posixpath
from collections.abc import Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data.datasource import FileBasedDatasource

from pipeline.io.sources import ROWS_PER_BLOCK, SOURCE_SCHEMA, full_uri, under_roots


class TableRows(FileBasedDatasource):
    """Each row of each Parquet file is one input, named `<file>#row=<i>`, followed by `/<path>` when its image
    cell has a path (the file's name in a Hugging Face `datasets` export, or the file it refers to). The row
    number makes the name unique: two rows with the same bytes and no path, or the same path, were one name,
    so the dedupe stage could not tell them apart (both were written, with the same sample ids) and a resume
    skipping one skipped both. An image cell is bytes, a path, or a `{bytes, path}` struct; a path cell is read
    by the decode stage from `source_path`, relative to the Parquet file, and only under `allowed_roots`
    (default: the Parquet file's directory)."""

    def __init__(self, paths: list[str], fs: fsspec.AbstractFileSystem, columns: dict[str, str],
                 allowed_roots: list[str] | None, **kwargs):
        super().__init__(paths, **kwargs)
        self.fs, self.columns, self.allowed_roots = fs, columns, allowed_roots
        self.read = list(dict.fromkeys(columns.values()))  # the Parquet columns read (a column may serve two keys)
        schema = SOURCE_SCHEMA.append(pa.field("source_path", pa.string()))
        if "prompt_column" in columns:  # the image's own prompt (source.prompt_column), for variant expansion
            schema = schema.append(pa.field("source_prompt", pa.string()))
        if "mask_column" in columns:  # its inpaint mask (source.mask_column), bytes only; decoded with the image
            schema = schema.append(pa.field("source_mask", pa.binary()))
        self.schema = schema

    def _open_input_source(self, filesystem, path: str, **open_args) -> pa.NativeFile:
        return filesystem.open_input_file(path)  # Parquet reads the footer first: random access

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        table, n = full_uri(self.fs, path), 0
        for batch in pq.ParquetFile(f).iter_batches(batch_size=ROWS_PER_BLOCK, columns=self.read):
            rows = [self.row(table, n + i, cells) for i, cells in enumerate(batch.to_pylist())]
            n += len(rows)
            yield pa.Table.from_pylist(rows, schema=self.schema)

    def row(self, table: str, index: int, cells: dict) -> dict:
        image_col, value = self.columns["image_column"], cells[self.columns["image_column"]]
        data, name = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (value, None)
        if isinstance(data, str):
            data, name = None, data
        row = {"source_uri": f"{table}#row={index}" + (f"/{name}" if name else ""), "source_bytes": data,
               "source_error": None, "source_path": None}
        if name and data is None:
            path = name if "://" in name or name.startswith("/") else posixpath.join(posixpath.dirname(table), name)
            roots = self.allowed_roots or [posixpath.dirname(table)]
            row["source_path"] = path
            if not under_roots(path, roots):
                row["source_error"] = f"path {path!r} is outside source.allowed_roots {roots}"
        elif data is None:  # a null cell (or a struct with neither bytes nor path): nothing to read
            row["source_error"] = f"its {image_col} cell holds no image (null)"
        caption, prompt, mask = (self.columns.get(k) for k in ("caption_column", "prompt_column", "mask_column"))
        row["caption"] = cells[caption] if caption else None
        if prompt:
            row["source_prompt"] = cells[prompt]
        if mask:
            row["source_mask"] = mask_bytes(cells[mask])
        return row


def mask_bytes(value) -> bytes | None:
    """A mask cell's image bytes (bytes, or an {bytes, path} struct); None when it holds none."""
    data = value.get("bytes") if isinstance(value, dict) else value
    return data if isinstance(data, bytes) else None
