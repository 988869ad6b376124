"""What the documents say about the quality gate: the thresholds, the distribution of every score
(summary numbers and a histogram image), and the worst and best samples per score.

Read from the output alone: the score columns of `samples/` and `rejected/` (only those columns;
images only for the few samples shown) and the manifest's `quality` record.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.io.output import RunOutput
from pipeline.scorers.base import CLIP, SHARPNESS, metric_for

KINDS = ("samples", "rejected")
EXTREMES = 3  # worst and best samples shown per score


@dataclass
class ScoreSummary:
    column: str  # score_<id>, clip_score, sharpness_score
    key: str  # its threshold key: the annotator id, clip or sharpness
    metric: str
    higher_is_better: bool
    values: list[float]  # every sample's score (NaN and missing left out)
    bound: tuple[str, float] | None  # ("min" | "max", threshold)
    failing: int  # samples on the wrong side of the bound
    worst: list[dict[str, Any]] = field(default_factory=list)  # {sample_id, source_uri, score, kind}
    best: list[dict[str, Any]] = field(default_factory=list)

    def stats(self) -> dict[str, float]:
        v = np.asarray(self.values, dtype=np.float64)
        if not len(v):
            return {}
        q = np.percentile(v, [10, 50, 90])
        return {"n": len(v), "min": float(v.min()), "p10": float(q[0]), "median": float(q[1]), "p90": float(q[2]),
                "max": float(v.max()), "mean": float(v.mean())}

    def line(self) -> str:
        s = self.stats()
        if not s:
            return "no values"
        return (f"n {s['n']}, min {s['min']:.4g}, p10 {s['p10']:.4g}, median {s['median']:.4g}, p90 {s['p90']:.4g}, "
                f"max {s['max']:.4g}, mean {s['mean']:.4g}")

    @property
    def direction(self) -> str:
        return "higher is better" if self.higher_is_better else "lower is better"

    @property
    def bound_text(self) -> str:
        return f"{self.bound[0]} {self.bound[1]:g}" if self.bound else "no threshold"


def score_columns(out: RunOutput) -> list[str]:
    """The score columns the output's samples (or rejected samples) have."""
    names: list[str] = []
    for kind in KINDS:
        files = out.files(kind)
        if files:
            with out.fs.open(files[0], "rb") as f:
                import pyarrow.parquet as pq

                names += [n for n in pq.read_schema(f).names if n not in names]
    return [n for n in names if (n.startswith("score_") and n != "score_provenance") or n in ("clip_score",
                                                                                                "sharpness_score")]


def _key_and_metric(column: str, annotators: dict[str, str]) -> tuple[str, str, bool]:
    if column == "clip_score":
        return CLIP, "CLIP cosine", True
    if column == "sharpness_score":
        return SHARPNESS, "Laplacian variance", True
    key = column.removeprefix("score_")
    metric = metric_for(annotators.get(key, ""))
    return key, metric.name if metric else "?", metric.higher_is_better if metric else True


def summaries(out: RunOutput, manifest: dict[str, Any], extremes: int = EXTREMES) -> list[ScoreSummary]:
    """One summary per score column of the output (empty when it was never scored)."""
    columns = score_columns(out)
    if not columns:
        return []
    annotators = {a.get("id") or a["name"]: a["name"] for a in (manifest.get("config") or {}).get("annotators", [])}
    quality = manifest.get("quality") or (manifest.get("config") or {}).get("quality") or {}
    tables = []
    for kind in KINDS:
        for path in out.files(kind):
            names = set(_schema_names(out, path))
            wanted = ["sample_id", "source_uri"] + [c for c in columns if c in names]
            t = out.read_file(path, wanted)
            for c in columns:
                if c not in t.schema.names:
                    t = t.append_column(c, pa.nulls(t.num_rows, pa.float64()))
            tables.append(t.select(["sample_id", "source_uri", *columns])
                          .append_column("kind", pa.array([kind] * t.num_rows, pa.string())))
    table = pa.concat_tables(tables)
    result = []
    for column in columns:
        key, metric, higher = _key_and_metric(column, annotators)
        valid = table.filter(pc.invert(pc.is_null(table[column], nan_is_null=True)))
        values = valid[column].to_pylist()
        bound = (("min", quality["min"][key]) if key in (quality.get("min") or {}) else
                 ("max", quality["max"][key]) if key in (quality.get("max") or {}) else None)
        failing = 0 if bound is None else sum(1 for v in values if (v < bound[1] if bound[0] == "min" else v > bound[1]))
        rows = valid.select(["sample_id", "source_uri", column, "kind"]).to_pylist()
        rows.sort(key=lambda r: (r[column] if higher else -r[column], r["sample_id"]))
        pick = [{"sample_id": r["sample_id"], "source_uri": r["source_uri"], "score": r[column], "kind": r["kind"]}
                for r in rows]
        result.append(ScoreSummary(column, key, metric, higher, values, bound, failing, pick[:extremes],
                                   pick[::-1][:extremes]))
    return result


def _schema_names(out: RunOutput, path: str) -> list[str]:
    import pyarrow.parquet as pq

    with out.fs.open(path, "rb") as f:
        return pq.read_schema(f).names


def histogram_png(summary: ScoreSummary, bins: int = 30) -> bytes:
    """A histogram of one score as PNG, the threshold drawn as a red line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 2.6), dpi=100)
    try:
        ax.hist(summary.values, bins=bins, color="#58a", edgecolor="white")
        if summary.bound:
            ax.axvline(summary.bound[1], color="#c33", linewidth=1.5, label=summary.bound_text)
            ax.legend(fontsize=8)
        ax.set_title(f"{summary.column} ({summary.metric}, {summary.direction})", fontsize=9)
        ax.set_xlabel("score", fontsize=8)
        ax.set_ylabel("samples", fontsize=8)
        ax.tick_params(labelsize=7)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)


def sample_images(out: RunOutput, sample_ids: set[str], columns: list[str]) -> dict[str, dict[str, bytes]]:
    """PNG bytes of these image columns for these samples (from samples/ and rejected/)."""
    found: dict[str, dict[str, bytes]] = {}
    if not sample_ids:
        return found
    ids = pa.array(sorted(sample_ids), pa.string())
    for kind in KINDS:
        for path in out.files(kind):
            table = out.read_file(path, ["sample_id"])
            if not pc.any(pc.is_in(table["sample_id"], value_set=ids)).as_py():
                continue
            names = [c for c in columns if c in _schema_names(out, path)]
            table = out.read_file(path, ["sample_id", *names])
            for row in table.filter(pc.is_in(table["sample_id"], value_set=ids)).to_pylist():
                found[row["sample_id"]] = {c: row[c]["bytes"] for c in names if row[c]}
    return found


def inspect_lines(out: RunOutput, manifest: dict[str, Any]) -> list[str]:
    """The `inspect` section: thresholds, each score's distribution, worst and best samples."""
    items = summaries(out, manifest)
    if not items:
        return []
    quality = manifest.get("quality") or {}
    lines = ["", "quality:"]
    if quality:
        lines.append(f"  action {quality.get('action')}, scored by {quality.get('scored_by')} at {quality.get('scored_at')}")
    for s in items:
        lines.append(f"  {s.column} ({s.metric}, {s.direction}; {s.bound_text}"
                     + (f": {s.failing} below" if s.bound else "") + f"): {s.line()}")
        lines.append("    worst: " + ", ".join(f"{w['sample_id']} {w['score']:.4g}" for w in s.worst))
        lines.append("    best: " + ", ".join(f"{b['sample_id']} {b['score']:.4g}" for b in s.best))
    return lines


def card_markdown(manifest: dict[str, Any]) -> str:
    """The dataset card's section on the quality gate (empty when the output was never scored)."""
    from pipeline.docs.card import md_cell, md_code

    quality = manifest.get("quality")
    if not quality:
        return ""
    counts = manifest.get("counts", {})
    bounds = [f"| {md_code(k)} | ≥ {md_cell(v)} |" for k, v in (quality.get("min") or {}).items()]
    bounds += [f"| {md_code(k)} | ≤ {md_cell(v)} |" for k, v in (quality.get("max") or {}).items()]
    table = "\n".join(["| score | threshold |", "|---|---|", *bounds]) if bounds else "No thresholds: scores only."
    if quality.get("action") == "drop":
        outcome = (f"Samples below a threshold are in `rejected/*.parquet` (same schema, `passed` false), not in "
                   f"`samples/`: {md_cell(counts.get('rejected_samples', 0))} rejected, "
                   f"{md_cell(counts.get('samples', 0))} kept.")
    else:
        outcome = "Every sample is in `samples/`; `passed` says whether it met every threshold."
    extra = ""
    if quality.get("clip_model"):
        extra += f", a CLIP score of prompt and image (`clip_score`, model {md_code(quality['clip_model'])})"
    if quality.get("sharpness"):
        extra += ", sharpness (`sharpness_score`, variance of the Laplacian)"
    return f"""
## Quality gate

Each sample was scored (by {md_cell(quality.get("scored_by"))}, {md_cell(quality.get("scored_at"))}): per
condition, the same annotator re-run on the generated image and compared with the source's control map
(`score_<id>`: edge F1, SSIM, depth RMSE, mIoU, pose PCK, normals angular error){extra}. Thresholds
(action {md_code(quality.get("action"))}):

{table}

{outcome}
"""


def report_section(out: RunOutput, manifest: dict[str, Any], thumbnail) -> dict[str, Any] | None:
    """What report.html shows of the quality gate: thresholds, one histogram (PNG data: URI) and the
    summary numbers per score, and the worst and best samples per score (generated image next to the
    control map it was compared with). `thumbnail(png) -> data: URI`. None when never scored."""
    import base64

    items = summaries(out, manifest)
    if not items:
        return None
    shown = {e["sample_id"] for s in items for e in s.worst + s.best}
    controls = [f"control_{s.key}" for s in items if s.column.startswith("score_")]
    images = sample_images(out, shown, ["generated", *controls])
    quality = manifest.get("quality") or {}

    def figures(s: ScoreSummary, picks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        shown = []
        for p in picks:
            pngs = images.get(p["sample_id"], {})
            control = pngs.get(f"control_{s.key}")
            shown.append({**p, "score": f"{p['score']:.4g}",
                          "generated": thumbnail(pngs["generated"]) if pngs.get("generated") else None,
                          "control": thumbnail(control) if control and s.column.startswith("score_") else None})
        return shown

    return {
        "action": quality.get("action"), "scored_by": quality.get("scored_by"), "scored_at": quality.get("scored_at"),
        "scores": [{"column": s.column, "metric": s.metric, "direction": s.direction, "bound": s.bound_text,
                    "failing": s.failing if s.bound else "—", "summary": s.line(),
                    "histogram": "data:image/png;base64," + base64.b64encode(histogram_png(s)).decode("ascii"),
                    "worst": figures(s, s.worst), "best": figures(s, s.best)} for s in items],
    }


def manifest_score_columns(manifest: dict[str, Any]) -> list[tuple[str, pa.DataType, str]]:
    """The quality columns of a scored output's samples, from its manifest (none when never scored)."""
    from pipeline.config import AnnotatorConfig, QualityConfig
    from pipeline.scorers.stage import Gate, gate_settings, score_columns

    record = manifest.get("quality")
    if not record:
        return []
    quality = QualityConfig.model_validate(gate_settings(record))
    annotators = [AnnotatorConfig.model_validate(a) for a in (manifest.get("config") or {}).get("annotators", [])]
    return score_columns(Gate(quality, annotators))
