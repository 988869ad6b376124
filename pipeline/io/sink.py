"""The writer: one streaming Ray Data sink that routes good rows to `samples/` and error rows to
`errors/`, each as Parquet in the documented schema.

Files are written under a temporary name and renamed into place, so a reader never sees a
partial Parquet file; a file's name derives from the rows it holds, so a retried write task
replaces its file instead of duplicating rows. Each write task returns its row counts; the driver
adds them up for the manifest's `this_run`.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from datetime import datetime, timezone
from typing import Any, Iterable

import pyarrow as pa
from ray.data.block import Block, BlockAccessor
from ray.data.datasource import Datasink
from ray.data.datasource.datasink import WriteResult

from pipeline.io.output import write_parquet
from pipeline.io.sources import filesystem
from pipeline.schema import ANNOTATOR, IMAGE, errors_schema, normalized

ANNOTATOR_FIELDS = [f.name for f in ANNOTATOR]


class SplitParquetSink(Datasink[dict]):
    def __init__(self, path: str, storage_options: dict[str, Any], run_id: str, code_version: str,
                 control_ids: list[str], rows_per_file: int, schema: pa.Schema, progress=None, reject: bool = False,
                 layout: str = "flat", rows_per_write: int | None = None):
        self.path = path
        self.storage_options = storage_options
        self.run_id = run_id
        self.code_version = code_version
        self.control_ids = control_ids
        self.rows_per_file = rows_per_file
        self.schema = schema  # of samples/ (schema.samples_schema)
        self.progress = progress  # console.Progress: told what each write task wrote
        self.reject = reject  # quality.action drop: samples with passed = false go to rejected/
        self.totals: dict[str, int] = {}  # rows this run wrote, by kind
        # normalized: sample rows without the source's columns, which go to sources/ once, from the row that
        # variant expansion marked `writes_source` (the first of the source's variants in this run)
        self.sources_schema = None
        if layout == "normalized":
            self.schema, self.sources_schema = normalized(schema)
        self.row_schema = schema  # every column a row is built with (image columns as structs)
        # rows gathered for one write task (Ray Data bundles the blocks): the stages pass on small blocks, so
        # that each hands its first rows on soon; files are written from several of them
        self.rows_per_write = min(rows_per_write, rows_per_file) if rows_per_write else None

    @property
    def min_rows_per_write(self) -> int | None:
        return self.rows_per_write

    def on_write_start(self, schema=None) -> None:
        fs, root = filesystem(self.path, self.storage_options)
        for sub in ("samples", "errors", *(("rejected",) if self.reject else ()), *(("sources",) if self.sources_schema else ())):
            fs.makedirs(posixpath.join(root, sub), exist_ok=True)

    def write(self, blocks: Iterable[Block], ctx) -> dict[str, int]:
        fs, root = filesystem(self.path, self.storage_options)
        now = datetime.now(timezone.utc)
        samples, errors, rejected, sources = [], [], [], []
        for block in blocks:
            for row in BlockAccessor.for_block(block).to_arrow().to_pylist():
                failed = row.get("error_stage") is not None
                sample = None if failed else self.sample_row(row, now)  # one dict for its samples/ and sources/ rows
                if self.sources_schema is not None and row.get("writes_source"):
                    sources.append(sample or self.sample_row(row, now))
                if failed:
                    errors.append(self.error_row(row, now))
                elif self.reject and row.get("passed") is False:
                    rejected.append(sample)
                else:
                    samples.append(sample)
        if sources:  # before the samples that refer to them: a crash never leaves a marked sample without its source
            self._write(fs, root, "sources", sources, self.sources_schema)
        self._write(fs, root, "samples", samples, self.schema)
        self._write(fs, root, "errors", errors, errors_schema())
        self._write(fs, root, "rejected", rejected, self.schema)
        if self.progress is not None:  # samples below the quality gate are finished work too
            self.progress.wrote.remote(len(samples) + len(rejected), len(errors),
                                       sum(1 for e in errors if e["sample_id"] is None))
        return {"samples": len(samples), "errors": len(errors), "rejected": len(rejected)}

    def on_write_complete(self, write_result: WriteResult[dict]) -> None:
        self.totals = {kind: sum(r[kind] for r in write_result.write_returns) for kind in ("samples", "errors", "rejected")}

    def _write(self, fs, root: str, kind: str, rows: list[dict], schema: pa.Schema) -> list[str]:
        written = []
        for start in range(0, len(rows), self.rows_per_file):
            chunk = rows[start : start + self.rows_per_file]
            # named by the rows it holds: a write task Ray retries replaces its own file, never adds a copy
            keys = "\n".join(f"{r['sample_id']}|{r['source_uri']}" for r in chunk)
            name = f"{kind}/part-{hashlib.sha256(keys.encode()).hexdigest()[:32]}.parquet"
            write_parquet(fs, posixpath.join(root, name), pa.Table.from_pylist(chunk, schema=schema))
            written.append(name)
        return written

    def sample_row(self, row: dict, now: datetime) -> dict:
        """The stages' row in the output schema: image columns as {bytes, path}, annotator provenance
        gathered into one list, run fields added."""
        out = {f.name: {"bytes": row[f.name], "path": None} if f.type == IMAGE else row.get(f.name) for f in self.row_schema}
        annotators = []
        for c in self.control_ids:
            prov = json.loads(row[f"annotator_{c}"])
            prov["params"] = json.dumps(prov.get("params", {}), sort_keys=True)
            annotators.append({k: prov.get(k) for k in ANNOTATOR_FIELDS})
        out.update(annotators=annotators, run_id=self.run_id, code_version=self.code_version, created_at=now)
        return out

    def error_row(self, row: dict, now: datetime) -> dict:
        return {
            "source_uri": row.get("source_uri"),
            "source_sha256": row.get("source_sha256"),
            "sample_id": row.get("sample_id"),
            "variant_index": row.get("variant_index"),
            "stage": row["error_stage"],
            "error_type": row.get("error_type"),
            "error_message": row.get("error_message"),
            "run_id": self.run_id,
            "created_at": now,
        }
