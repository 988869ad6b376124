"""report.html: a self-contained gallery (source, control maps, generated variants as thumbnail
data: URIs) and the run's stats (counts, errors, per-operator throughput, models).

Only the columns the page needs are read; image bytes only for the sources the gallery shows.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from html import escape
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from pipeline.docs.stats import (
    annotator_rows,
    error_groups,
    fmt_rate,
    fmt_seconds,
    model_rows,
    parse_stats,
)
from pipeline.io.output import RunOutput

MAX_SOURCES = 200  # sources shown in the gallery
THUMB_PX = 256  # longest side of a gallery thumbnail
MAX_ERROR_GROUPS = 100  # error (stage, type, message) groups listed in the report


# ---------------------------------------------------------------- gallery


def thumbnail_uri(png: bytes, px: int) -> str:
    """A JPEG data: URI of the image downscaled to at most px on its longest side."""
    with Image.open(io.BytesIO(png)) as im:
        im = im.convert("RGB")
        im.thumbnail((px, px))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass
class SourceCard:
    uri: str
    image: str  # data: URI
    controls: dict[str, str]  # control column -> data: URI
    variants: list[dict[str, Any]]  # {variant_index, seed, prompt, sample_id, uri}


def gallery(out: RunOutput, max_sources: int, px: int) -> tuple[list[SourceCard], int]:
    """Cards for the first `max_sources` sources (by source URI), and the number of sources in all."""
    files = out.files("samples")
    uris_by_file = {p: set(out.read_file(p, ["source_uri"]).column("source_uri").to_pylist()) for p in files}
    all_uris = sorted(set().union(*uris_by_file.values()))
    shown = set(all_uris[:max_sources])
    controls, generated = out.control_columns(), out.generated()
    columns = ["source_uri", "image", *controls]
    columns += ["sample_id", "variant_index", "seed", "prompt", "generated"] if generated else []
    cards: dict[str, SourceCard] = {}
    for path in files:
        if not uris_by_file[path] & shown:
            continue
        table = out.read_file(path, columns)
        table = table.filter(pc.is_in(table.column("source_uri"), value_set=pa.array(sorted(shown), pa.string())))
        for row in table.to_pylist():
            card = cards.get(row["source_uri"])
            if card is None:  # every variant carries the same source image and control maps
                card = cards[row["source_uri"]] = SourceCard(
                    row["source_uri"], thumbnail_uri(row["image"]["bytes"], px),
                    {c: thumbnail_uri(row[c]["bytes"], px) for c in controls}, [])
            if generated:
                card.variants.append({k: row[k] for k in ("variant_index", "seed", "prompt", "sample_id")}
                                     | {"uri": thumbnail_uri(row["generated"]["bytes"], px)})
    for card in cards.values():
        card.variants.sort(key=lambda v: v["variant_index"])
    return [cards[u] for u in sorted(cards)], len(all_uris)


def figure(uri: str, caption: str, title: str, cls: str) -> str:
    return (f'<figure class="{cls}"><img src="{uri}" alt="{escape(caption)}" title="{escape(title)}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def card_html(card: SourceCard) -> str:
    name = card.uri.rsplit("/", 1)[-1]
    figures = [figure(card.image, "source", card.uri, "source")]
    figures += [figure(uri, col.removeprefix("control_"), f"control map {col}", "control")
                for col, uri in card.controls.items()]
    for v in card.variants:
        title = f"prompt: {v['prompt']}\nseed: {v['seed']}\nvariant: {v['variant_index']}\nsample_id: {v['sample_id']}"
        figures.append(
            f'<figure class="generated"><img src="{v["uri"]}" alt="generated variant {v["variant_index"]}" '
            f'title="{escape(title)}"><figcaption>#{v["variant_index"]} · seed {v["seed"]}'
            f'<br><span class="prompt">{escape(v["prompt"] or "")}</span></figcaption></figure>')
    return (f'<section class="card"><h3 title="{escape(card.uri)}">{escape(name)}</h3>'
            f'<div class="row">{"".join(figures)}</div></section>')


# ---------------------------------------------------------------- report.html

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left;vertical-align:top;white-space:pre-line}
td.n{text-align:right}code,pre{font:12px ui-monospace,monospace}pre{background:#f6f6f6;padding:.5em;overflow:auto}
.card{border-top:1px solid #ddd;padding:.5em 0}.card h3{margin:.2em 0;font-size:14px}
.row{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0;max-width:256px}figure img{display:block;max-width:256px}
figcaption{font-size:12px;color:#555}.source figcaption{font-weight:bold}.generated img{outline:2px solid #8ab}
.note{background:#fff6d5;padding:.3em .6em}
"""


def table_html(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="n">{c}</td>' if isinstance(c, (int, float)) else f"<td>{escape(str(c))}</td>"
                         for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def report_html(out: RunOutput, max_sources: int = MAX_SOURCES, px: int = THUMB_PX) -> str:
    manifest = out.manifest()
    counts, timings = manifest.get("counts", {}), manifest.get("timings", {})
    stats_text = out.read_text("stats.txt", default="")
    operators, dataset_rate = parse_stats(stats_text)
    cards, n_sources = gallery(out, max_sources, px)
    errors = error_groups(out)
    run_id = str(manifest.get("run_id"))

    parts = [f"<h1>ControlNet dataset · run {escape(run_id)}</h1>",
             table_html(["", ""], [["output", out.url], ["code version", manifest.get("code_version")],
                                   ["started", manifest.get("started_at")], ["finished", manifest.get("finished_at")]])]
    parts.append("<h2>Counts</h2>")
    parts.append(table_html(["", ""], [[k.replace("_", " "), v] for k, v in counts.items() if k != "errors_by_stage"]
                            + [[f"errors at {s}", n] for s, n in counts.get("errors_by_stage", {}).items()]))
    parts.append("<h2>Throughput</h2>")
    parts.append(f"<p>{counts.get('samples', 0)} samples in {fmt_seconds(timings.get('total_s'))}"
                 f" = {escape(str(timings.get('samples_per_s')))} samples/s</p>")
    if operators:
        parts.append(table_html(["operator", "wall time", "output rows", "throughput"],
                                [[op["name"], fmt_seconds(op["wall_s"]), op["output_rows"] if op["output_rows"] is not None
                                  else "—", fmt_rate(op["rows_per_s"])] for op in operators]))
        if dataset_rate is not None:
            parts.append(f"<p>Ray Data dataset throughput: {fmt_rate(dataset_rate)}</p>")
    else:
        parts.append("<p>No per-operator timings could be read from stats.txt.</p>")
    parts.append(f"<details><summary>Ray Data stats (stats.txt)</summary><pre>{escape(stats_text)}</pre></details>")

    parts.append("<h2>Errors</h2>")
    if errors:
        shown = errors[:MAX_ERROR_GROUPS]
        parts.append(table_html(["stage", "type", "message", "count", "examples"],
                                [[g["stage"], g["type"], g["message"], g["count"], "\n".join(map(str, g["examples"]))]
                                 for g in shown]))
        if len(errors) > len(shown):
            parts.append(f'<p class="note">{len(errors) - len(shown)} more error groups not listed.</p>')
    else:
        parts.append("<p>None.</p>")

    parts.append("<h2>Models</h2>")
    parts.append(table_html(["role", "model", "revision (configured)", "resolved revision"],
                            [[r["role"], r["model"] or "— (no weights)", r["revision"] or "—", r["commit"] or "—"]
                             for r in model_rows(manifest)]))
    parts.append(table_html(["annotator", "name", "params"],
                            [[a["id"], a["name"], json.dumps(a["params"], sort_keys=True)] for a in annotator_rows(manifest)]))

    parts.append("<h2>Samples</h2>")
    if n_sources > len(cards):
        parts.append(f'<p class="note">Showing the first {len(cards)} of {n_sources} sources (sorted by source URI); '
                     f"rebuild with <code>python -m pipeline report OUT --max-sources N</code> to show more.</p>")
    else:
        parts.append(f"<p>All {n_sources} sources. Hover over an image for its prompt and seed.</p>")
    parts.extend(card_html(c) for c in cards)

    return ('<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            '<link rel="icon" href="data:,">'
            f"<title>Run {escape(run_id)}</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")
