"""report.html: a self-contained gallery (source, control maps, generated variants as thumbnail
data: URIs) and the run's stats (counts, errors, per-operator throughput, models).

Only the columns the page needs are read; image bytes only for the sources the gallery shows.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from typing import Any

import jinja2
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


# Every value reaches the page through Jinja's autoescape: nothing read from an output (manifest values,
# URIs, prompts, error messages) can add markup.
TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,">
<title>Run {{ run_id }}</title><style>{{ style }}</style></head>
<body>
{%- macro table(header, rows) %}
<table><tr>{% for h in header %}<th>{{ h }}</th>{% endfor %}</tr>
{%- for row in rows %}<tr>{% for c in row %}{% if c is number %}<td class="n">{{ c }}</td>{% else %}<td>{{ c }}</td>{% endif %}{% endfor %}</tr>{% endfor %}</table>
{%- endmacro %}
<h1>ControlNet dataset · run {{ run_id }}</h1>
{{ table(["", ""], [["output", url], ["code version", manifest.code_version], ["started", manifest.started_at],
                    ["finished", manifest.finished_at]]) }}
<h2>Counts</h2>
{{ table(["", ""], counts) }}
<h2>Throughput</h2>
<p>{{ samples }} samples in {{ total_s }} = {{ samples_per_s }} samples/s</p>
{%- if operators %}
{{ table(["operator", "wall time", "output rows", "throughput"], operators) }}
{%- if dataset_rate %}<p>Ray Data dataset throughput: {{ dataset_rate }}</p>{% endif %}
{%- else %}
<p>No per-operator timings could be read from stats.txt.</p>
{%- endif %}
<details><summary>Ray Data stats (stats.txt)</summary><pre>{{ stats_text }}</pre></details>
<h2>Errors</h2>
{%- if errors %}
{{ table(["stage", "type", "message", "count", "examples"], errors) }}
{%- if more_errors %}<p class="note">{{ more_errors }} more error groups not listed.</p>{% endif %}
{%- else %}
<p>None.</p>
{%- endif %}
<h2>Models</h2>
{{ table(["role", "model", "revision (configured)", "resolved revision"], models) }}
{{ table(["annotator", "name", "params"], annotators) }}
<h2>Samples</h2>
{%- if n_sources > cards|length %}
<p class="note">Showing the first {{ cards|length }} of {{ n_sources }} sources (sorted by source URI); rebuild with <code>python -m pipeline report OUT --max-sources N</code> to show more.</p>
{%- else %}
<p>All {{ n_sources }} sources. Hover over an image for its prompt and seed.</p>
{%- endif %}
{%- for card in cards %}
<section class="card"><h3 title="{{ card.uri }}">{{ card.uri.rsplit("/", 1)[-1] }}</h3><div class="row">
<figure class="source"><img src="{{ card.image }}" alt="source" title="{{ card.uri }}"><figcaption>source</figcaption></figure>
{%- for col, uri in card.controls.items() %}
<figure class="control"><img src="{{ uri }}" alt="{{ col[8:] }}" title="control map {{ col }}"><figcaption>{{ col[8:] }}</figcaption></figure>
{%- endfor %}
{%- for v in card.variants %}
<figure class="generated"><img src="{{ v.uri }}" alt="generated variant {{ v.variant_index }}" title="prompt: {{ v.prompt }}
seed: {{ v.seed }}
variant: {{ v.variant_index }}
sample_id: {{ v.sample_id }}"><figcaption>#{{ v.variant_index }} · seed {{ v.seed }}<br><span class="prompt">{{ v.prompt or "" }}</span></figcaption></figure>
{%- endfor %}
</div></section>
{%- endfor %}
</body></html>
"""


def report_html(out: RunOutput, max_sources: int = MAX_SOURCES, px: int = THUMB_PX) -> str:
    manifest = out.manifest()
    counts, timings = manifest.get("counts", {}), manifest.get("timings", {})
    stats_text = out.read_text("stats.txt", default="")
    operators, dataset_rate = parse_stats(stats_text)
    cards, n_sources = gallery(out, max_sources, px)
    errors = error_groups(out)
    return jinja2.Environment(autoescape=True).from_string(TEMPLATE).render(
        run_id=str(manifest.get("run_id")), style=STYLE, url=out.url, manifest=manifest,
        counts=[[k.replace("_", " "), v] for k, v in counts.items() if k != "errors_by_stage"]
               + [[f"errors at {s}", n] for s, n in counts.get("errors_by_stage", {}).items()],
        samples=counts.get("samples", 0), total_s=fmt_seconds(timings.get("total_s")),
        samples_per_s=timings.get("samples_per_s"),
        operators=[[op["name"], fmt_seconds(op["wall_s"]), op["output_rows"] if op["output_rows"] is not None else "—",
                    fmt_rate(op["rows_per_s"])] for op in operators],
        dataset_rate=fmt_rate(dataset_rate) if dataset_rate is not None else None, stats_text=stats_text,
        errors=[[g["stage"], g["type"], g["message"], g["count"], "\n".join(map(str, g["examples"]))]
                for g in errors[:MAX_ERROR_GROUPS]],
        more_errors=max(0, len(errors) - MAX_ERROR_GROUPS),
        models=[[r["role"], r["model"] or "— (no weights)", r["revision"] or "—", r["commit"] or "—"]
                for r in model_rows(manifest)],
        annotators=[[a["id"], a["name"], json.dumps(a["params"], sort_keys=True)] for a in annotator_rows(manifest)],
        cards=cards, n_sources=n_sources)
