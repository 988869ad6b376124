"""Documents of a run, built from its output directory alone (so any output can be re-documented):
report.html (`report.py`), README.md (`card.py`, a Hugging Face dataset card), croissant.json
(`croissant.py`) and what `inspect` prints (`inspect.py`)."""

from __future__ import annotations

import json
from typing import Any

from pipeline.docs.card import dataset_card
from pipeline.docs.croissant import croissant
from pipeline.docs.inspect import inspect_text
from pipeline.docs.report import MAX_SOURCES, report_html
from pipeline.io.output import RunOutput

__all__ = ["inspect_text", "write_documents"]


def write_documents(url: str, storage_options: dict[str, Any] | None = None, max_sources: int = MAX_SOURCES) -> list[str]:
    """Write report.html, README.md and croissant.json into a run's output; returns their paths."""
    out = RunOutput(url, storage_options)
    manifest = out.manifest()
    control_ids = [c.removeprefix("control_") for c in out.control_columns()]
    return [
        out.write_text("report.html", report_html(out, max_sources)),
        out.write_text("README.md", dataset_card(manifest, url, out.digest())),
        out.write_text("croissant.json",
                       json.dumps(croissant(manifest, control_ids, out.location()), indent=2) + "\n"),
    ]
