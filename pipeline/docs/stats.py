"""What every document of a run says: error groups, per-operator timings, models, annotators,
generation parameters, read from the run's output and manifest."""

from __future__ import annotations

import re
from typing import Any

from pipeline.generators import DEFAULT_FAMILY
from pipeline.io.output import RunOutput


def error_groups(out: RunOutput) -> list[dict[str, Any]]:
    """Errors grouped by (stage, type, message), most frequent first within a stage."""
    table = out.read("errors", ["stage", "error_type", "error_message", "source_uri"])
    groups: dict[tuple, dict[str, Any]] = {}
    for row in table.to_pylist() if table is not None else []:
        key = (row["stage"], row["error_type"], row["error_message"])
        group = groups.setdefault(key, {"stage": key[0], "type": key[1], "message": key[2], "count": 0, "examples": []})
        group["count"] += 1
        if len(group["examples"]) < 3:
            group["examples"].append(row["source_uri"])
    return sorted(groups.values(), key=lambda g: (g["stage"] or "", -g["count"], g["message"] or ""))


OPERATOR = re.compile(r"^Operator (\d+) (.+?): (.*)$")
SECONDS = re.compile(r"(?:produced|executed) in ([\d.]+)s")
OUTPUT_ROWS = re.compile(r"Total output num rows: (\d+) rows")
THROUGHPUT = re.compile(r"Ray Data throughput: ([\d.eE+-]+) rows/s")


def parse_stats(text: str) -> tuple[list[dict[str, Any]], float | None]:
    """Per-operator wall time, output rows and throughput from Ray Data's stats text, and the
    dataset's throughput. Lines it does not recognise are ignored; an operator with fused
    sub-operators reports its last sub-operator's rows and throughput."""
    operators: list[dict[str, Any]] = []
    dataset_rate = None
    in_dataset_block = False
    for line in text.splitlines():
        if m := OPERATOR.match(line):
            seconds = SECONDS.search(m.group(3))
            operators.append({"index": int(m.group(1)), "name": m.group(2),
                              "wall_s": float(seconds.group(1)) if seconds else None,
                              "output_rows": None, "rows_per_s": None})
            in_dataset_block = False
        elif line.startswith("Dataset throughput"):
            in_dataset_block = True
        elif m := OUTPUT_ROWS.search(line):
            if operators and not in_dataset_block:
                operators[-1]["output_rows"] = int(m.group(1))
        elif m := THROUGHPUT.search(line):
            if in_dataset_block:
                dataset_rate = float(m.group(1))
            elif operators:
                operators[-1]["rows_per_s"] = float(m.group(1))
        elif line and not line[0].isspace() and not line.startswith("*"):
            in_dataset_block = False  # another top-level section (iterator, memory)
    return operators, dataset_rate


def model_rows(manifest: dict[str, Any]) -> list[dict[str, str | None]]:
    """One row per model the run used: role, model (as configured), configured and resolved revision."""
    models, config = manifest.get("models", {}), manifest.get("config", {})
    conditions = [cn.get("condition") for cn in (config.get("generation") or {}).get("controlnets", [])]

    def row(role: str, m: dict | None) -> dict[str, str | None]:
        m = m or {}
        return {"role": role, "model": m.get("model"), "revision": m.get("revision"), "commit": m.get("commit")}

    rows = []
    for key, value in models.items():  # the generator's models by role ("base_model", "controlnets"), then annotators
        if key == "annotators":
            rows += [row(f"annotator {k}", m) for k, m in value.items()]
        elif isinstance(value, list):  # one model per condition
            rows += [row(f"{key.removesuffix('s')} ({conditions[i] if i < len(conditions) else i})", m)
                     for i, m in enumerate(value)]
        elif value:
            rows.append(row(key.replace("_", " "), value))
    return rows


def annotator_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"id": a.get("id") or a["name"], "name": a["name"], "params": a.get("params", {})}
            for a in manifest.get("config", {}).get("annotators", [])]


def generation_params(manifest: dict[str, Any]) -> dict[str, Any]:
    config = manifest.get("config", {})
    gen = config.get("generation") or {}
    keep = ("scheduler", "steps", "guidance_scale", "dtype", "variants_per_image", "prompt")
    params = {"seed": config.get("seed"), "resolution": config.get("image", {}).get("resolution")}
    params.update({k: gen[k] for k in keep if k in gen})
    params["controlnets"] = [{k: v for k, v in cn.items() if k != "revision"} for cn in gen.get("controlnets", [])]
    return params


def fmt_seconds(s: Any) -> str:
    return f"{s:.2f} s" if isinstance(s, (int, float)) else "—"


def fmt_rate(r: Any) -> str:
    return f"{r:.3g} rows/s" if isinstance(r, (int, float)) else "—"


def run_family(manifest: dict[str, Any]) -> str | None:
    """The run's generator family; None for an annotate-only run (manifests before families: sd15)."""
    gen = manifest.get("config", {}).get("generation")
    return (gen.get("family") or DEFAULT_FAMILY) if gen else None
