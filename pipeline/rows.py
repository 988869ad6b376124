"""Rows and error rows: what every stage maps over.

A row is a plain dict of Arrow-friendly values. Errors are data: a row that fails gets
`error_stage`, `error_type` and `error_message` set, and every later stage passes it through
untouched. One bad row never fails its batch or the job.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Callable, Iterable

import pyarrow as pa

log = logging.getLogger(__name__)

Row = dict[str, Any]


def rows_of(batch: pa.Table) -> list[Row]:
    return batch.to_pylist()


def table_of(rows: list[Row]) -> pa.Table:
    """Rows to a table; keys missing from some rows become nulls."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return pa.table({k: pa.array([row.get(k) for row in rows]) for k in keys})


def is_error(row: Row) -> bool:
    return row.get("error_stage") is not None


ADDRESS = re.compile(r" (?:object )?at 0x[0-9a-fA-F]+")


def error_message(exc: BaseException) -> str:
    """The exception's message without object addresses, so identical failures group together."""
    return ADDRESS.sub("", str(exc) or repr(exc))


def error_row(row: Row, stage: str, exc: BaseException) -> Row:
    log.warning("%s failed for %s: %s: %s", stage, row.get("source_uri"), type(exc).__name__, exc)
    return {**row, "error_stage": stage, "error_type": type(exc).__name__, "error_message": error_message(exc)}


def map_rows(stage: str, batch: pa.Table, fn: Callable[[Row], Iterable[Row]]) -> pa.Table:
    """Apply `fn` to each good row (it returns zero or more rows); a raising row becomes an error row."""
    out: list[Row] = []
    for row in rows_of(batch):
        if is_error(row):
            out.append(row)
            continue
        try:
            out.extend(fn(row))
        except Exception as exc:  # noqa: BLE001 - errors are data
            out.append(error_row(row, stage, exc))
    return table_of(out)


def map_batch_isolated(stage: str, batch: pa.Table, fn: Callable[[list[Row]], list[Row]]) -> pa.Table:
    """Apply a batched `fn` to the good rows; if the batch raises, redo it row by row so only the
    rows that fail on their own become error rows."""
    rows = rows_of(batch)
    good = [i for i, r in enumerate(rows) if not is_error(r)]
    if good:
        try:
            results = fn([rows[i] for i in good])
        except Exception:  # noqa: BLE001
            results = []
            for i in good:
                try:
                    results.extend(fn([rows[i]]))
                except Exception as exc:  # noqa: BLE001 - errors are data
                    results.append(error_row(rows[i], stage, exc))
        for i, result in zip(good, results):
            rows[i] = result
    return table_of(rows)
