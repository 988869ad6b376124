"""What every document of a run says: error groups, per-stage timings, models, annotators,
generation parameters, read from the run's output and manifest."""

from __future__ import annotations

import json
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


def stage_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Each stage's own figures, as the stages measured them (manifest `stages`): seconds of work, rows
    out, rows/s and share of all stages' time (stages overlap, so shares say where the work is). A stage
    named `STAGE:compile` is time within STAGE (generation.compile): it is not counted twice in the shares."""
    stages = manifest.get("stages") or {}
    total = sum(s.get("seconds", 0) for name, s in stages.items() if not name.endswith(":compile")) or 1.0
    return [{"name": name, "seconds": s.get("seconds"), "rows": s.get("rows_out"),
             "rows_per_s": s["rows_out"] / s["seconds"] if s.get("seconds") else None,
             "share": f"{100 * s.get('seconds', 0) / total:.0f}%"} for name, s in stages.items()]


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
        elif key == "scorers":  # the quality gate's own models (CLIP)
            rows += [row(f"scorer {k}", m) for k, m in value.items()]
        elif isinstance(value, list):  # one model per condition
            rows += [row(f"{key.removesuffix('s')} ({conditions[i] if i < len(conditions) else i})", m)
                     for i, m in enumerate(value)]
        elif value:
            rows.append(row(key.replace("_", " "), value))
    return rows


def annotator_rows(manifest: dict[str, Any], out: RunOutput | None = None) -> list[dict[str, Any]]:
    """Each annotator with its effective parameters (defaults included) as the rows record them, or as
    configured where the output has no sample to read them from."""
    effective: dict[str, Any] = {}
    files = out.files("samples") if out is not None else []
    if files:
        first = out.read_file(files[0], ["annotators"]).slice(0, 1).to_pylist()
        for a in first[0]["annotators"] if first else []:
            effective[a["id"]] = json.loads(a["params"]) if a.get("params") else {}
    return [{"id": a.get("id") or a["name"], "name": a["name"],
             "params": effective.get(a.get("id") or a["name"], a.get("params", {}))}
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


def finished(manifest: dict[str, Any]) -> str:
    """When the run finished, or that it has not (stopped, or still running)."""
    if manifest.get("completed") and manifest.get("finished_at"):
        return str(manifest["finished_at"])
    return "not completed: stopped before its end, or still running (running its command again resumes it)"


def throughput(manifest: dict[str, Any]) -> str:
    """The last run's samples, wall time and rate (its own samples: later scoring may drop some from the counts)."""
    timings = manifest.get("timings") or {}
    if not manifest.get("completed") or timings.get("total_s") is None:
        return "not measured: the run has not completed"
    done = (manifest.get("this_run") or {}).get("samples", manifest.get("counts", {}).get("samples", 0))
    return (f"{done} samples written by the last run in {fmt_seconds(timings['total_s'])} = "
            f"{timings.get('samples_per_s')} samples/s")


def fmt_rate(r: Any) -> str:
    return f"{r:.3g} rows/s" if isinstance(r, (int, float)) else "—"


def run_layout(manifest: dict[str, Any]) -> str:
    """The run's output.layout (flat, or normalized: source columns in sources/)."""
    return manifest.get("config", {}).get("output", {}).get("layout", "flat")


def run_family(manifest: dict[str, Any]) -> str | None:
    """The run's generator family; None for an annotate-only run (manifests before families: sd15)."""
    gen = manifest.get("config", {}).get("generation")
    return (gen.get("family") or DEFAULT_FAMILY) if gen else None
