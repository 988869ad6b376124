"""What `python -m pipeline inspect OUT` prints: counts, errors, throughput, models."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from pipeline.docs.stats import error_groups, finished, fmt_rate, fmt_seconds, model_rows, stage_rows, throughput
from pipeline.docs.scores import inspect_lines as quality_lines
from pipeline.io.output import RunOutput


def inspect_text(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """A plain-text summary of a run's output: counts, errors, throughput, models."""
    out = RunOutput(url, storage_options)
    manifest = out.manifest()
    counts = manifest.get("counts", {})
    sources = out.read("samples", ["source_uri"])
    lines = [f"run {manifest.get('run_id')}  code {manifest.get('code_version')}  finished: {finished(manifest)}",
             f"output: {url}", "", "counts (manifest):"]
    lines += [f"  {k.replace('_', ' ')}: {v}" for k, v in counts.items() if k != "errors_by_stage"] or [
        "  (written when the run completes; the Parquet counts below are what is written so far)"]
    lines += ["counts (parquet):",
              f"  samples: {out.num_rows('samples')} rows in {len(out.files('samples'))} files, "
              f"{len(set(sources.column('source_uri').to_pylist())) if sources is not None else 0} sources",
              f"  errors: {out.num_rows('errors')} rows in {len(out.files('errors'))} files"]
    if out.files("rejected"):
        lines.append(f"  rejected: {out.num_rows('rejected')} rows in {len(out.files('rejected'))} files")
    lines += ["", "errors:"]
    errors = error_groups(out)
    by_stage: dict[str, list] = defaultdict(list)
    for g in errors:
        by_stage[g["stage"]].append(g)
    for stage, groups in by_stage.items():
        lines.append(f"  {stage}: {sum(g['count'] for g in groups)}")
        lines += [f"    {g['count']} x {g['type']}: {g['message']}" for g in groups]
    if not errors:
        lines.append("  none")
    lines += ["", "throughput:", f"  {throughput(manifest)}"]
    lines += [f"  {st['name']}: {fmt_seconds(st['seconds'])} ({st['share']}), {st['rows']} rows, "
              f"{fmt_rate(st['rows_per_s'])}" for st in stage_rows(manifest)]
    lines += ["", "models:"]
    lines += [f"  {r['role']}: {r['model'] or '(no weights)'}"
              + (f" @ {r['commit']}" if r["commit"] else "") + (f" (revision {r['revision']})" if r["revision"] else "")
              for r in model_rows(manifest)]
    lines += quality_lines(out, manifest)  # score distributions, worst and best samples (scored outputs only)
    return "\n".join(lines)
