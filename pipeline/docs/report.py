"""report.html: a self-contained gallery (source, control maps, generated variants as thumbnail
data: URIs; click to enlarge; filters; control maps over the source) and the run's stats (counts, errors,
per-stage throughput as the stages measured it, models).

Only the columns the page needs are read; image bytes only for the sources the gallery shows.
"""

from __future__ import annotations

import base64
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import jinja2
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from pipeline.docs.stats import (annotator_rows, error_groups, finished, fmt_rate, fmt_seconds, model_rows, stage_rows,
                                  throughput)
from pipeline.docs.scores import report_section
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
    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:  # PIL decodes and encodes outside the GIL
        thumb = lambda png: pool.submit(thumbnail_uri, png, px)  # noqa: E731 - a future, resolved below
        for path in files:
            if not uris_by_file[path] & shown:
                continue
            table = out.read_file(path, columns)
            table = table.filter(pc.is_in(table.column("source_uri"), value_set=pa.array(sorted(shown), pa.string())))
            for row in table.to_pylist():
                card = cards.get(row["source_uri"])
                if card is None:  # every variant carries the same source image and control maps
                    card = cards[row["source_uri"]] = SourceCard(
                        row["source_uri"], thumb(row["image"]["bytes"]), {c: thumb(row[c]["bytes"]) for c in controls}, [])
                if generated:
                    card.variants.append({k: row[k] for k in ("variant_index", "seed", "prompt", "sample_id")}
                                         | {"uri": thumb(row["generated"]["bytes"])})
    for card in cards.values():
        card.image = card.image.result()
        card.controls = {c: uri.result() for c, uri in card.controls.items()}
        for variant in card.variants:
            variant["uri"] = variant["uri"].result()
        card.variants.sort(key=lambda v: v["variant_index"])
    return [cards[u] for u in sorted(cards)], len(all_uris)


# ---------------------------------------------------------------- report.html

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left;vertical-align:top;white-space:pre-line}
td.n{text-align:right}code,pre{font:12px ui-monospace,monospace}pre{background:#f6f6f6;padding:.5em;overflow:auto}
.card{border-top:1px solid #ddd;padding:.5em 0}.card h3{margin:.2em 0;font-size:14px}
.row{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0;max-width:256px;position:relative}
figure img{display:block;max-width:256px;cursor:zoom-in}
figcaption{font-size:12px;color:#555}.source figcaption{font-weight:bold}.generated img{outline:2px solid #8ab}
.note{background:#fff6d5;padding:.3em .6em}.filters{position:sticky;top:0;background:#fff;padding:.4em 0;z-index:1}
.filters label{margin-right:1em}.hidden{display:none}
.overlay .control img.over{display:block}.control img.over{display:none;position:absolute;left:0;top:0;opacity:.55;mix-blend-mode:multiply}
#lightbox{position:fixed;inset:0;background:rgba(0,0,0,.85);display:none;align-items:center;justify-content:center;z-index:2;cursor:zoom-out}
#lightbox.open{display:flex}#lightbox img{width:min(90vw,90vh);height:auto;image-rendering:auto;cursor:zoom-out}
"""

SCRIPT = """
const q = s => [...document.querySelectorAll(s)];
function applyFilters() {
  const text = document.getElementById('f-prompt').value.toLowerCase();
  const control = document.getElementById('f-annotator').value;
  for (const card of q('.card')) {
    let shown = 0;
    for (const fig of card.querySelectorAll('figure.generated')) {
      const hit = !text || fig.dataset.prompt.toLowerCase().includes(text);
      fig.classList.toggle('hidden', !hit); shown += hit;
    }
    card.classList.toggle('hidden', !!text && shown === 0);
    for (const fig of card.querySelectorAll('figure.control'))
      fig.classList.toggle('hidden', !!control && fig.dataset.control !== control);
  }
  const stage = document.getElementById('f-error').value;
  for (const row of q('#errors tr[data-stage]')) row.classList.toggle('hidden', !!stage && row.dataset.stage !== stage);
}
document.addEventListener('input', e => { if (e.target.closest('.filters')) applyFilters(); });
document.getElementById('f-overlay').addEventListener('change', e => document.body.classList.toggle('overlay', e.target.checked));
const box = document.getElementById('lightbox');
document.addEventListener('click', e => {
  if (e.target.matches('figure img')) { box.querySelector('img').src = e.target.src; box.classList.add('open'); }
  else if (e.target.closest('#lightbox')) box.classList.remove('open');
});
"""

# Every value reaches the page through Jinja's autoescape: nothing read from an output (manifest values,
# URIs, prompts, error messages) can add markup.
TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,">
<title>Run {{ run_id }}</title><style>{{ style }}</style></head>
<body>
{%- macro table(header, rows, id=None) %}
<table{% if id %} id="{{ id }}"{% endif %}>{% if header|select|list %}<tr>{% for h in header %}<th>{{ h }}</th>{% endfor %}</tr>{% endif %}
{%- for row in rows %}<tr>{% for c in row %}{% if c is number %}<td class="n">{{ c }}</td>{% else %}<td>{{ c }}</td>{% endif %}{% endfor %}</tr>{% endfor %}</table>
{%- endmacro %}
<h1>ControlNet dataset · run {{ run_id }}</h1>
{{ table([], [["output", url], ["code version", manifest.code_version], ["started", manifest.started_at],
              ["finished", finished]]) }}
<h2>Counts</h2>
{{ table([], counts) }}
<h2>Throughput</h2>
<p>{{ throughput }}</p>
{%- if stages %}
{{ table(["stage", "time (its own work)", "share", "rows out", "throughput"], stages) }}
{%- else %}
<p>This run's manifest has no per-stage timings.</p>
{%- endif %}
{%- if quality %}
<h2 id="quality">Quality</h2>
<p>Action {{ quality.action }}, scored by {{ quality.scored_by }} at {{ quality.scored_at }}. Per score: its
distribution (threshold in red), then the worst and the best samples (generated image, control map).</p>
{%- for s in quality.scores %}
<section class="score"><h3>{{ s.column }} · {{ s.metric }}, {{ s.direction }} · {{ s.bound }} · below: {{ s.failing }}</h3>
<p>{{ s.summary }}</p>
<div class="row"><figure class="histogram"><img src="{{ s.histogram }}" alt="histogram of {{ s.column }}" style="max-width:420px"><figcaption>distribution of {{ s.column }}</figcaption></figure></div>
{%- for label, picks in [("worst", s.worst), ("best", s.best)] %}
<div class="row {{ label }}">
{%- for p in picks %}
<figure class="{{ label }}">{% if p.generated %}<img src="{{ p.generated }}" alt="generated {{ p.sample_id }}" title="sample_id: {{ p.sample_id }}
source: {{ p.source_uri }}">{% endif %}{% if p.control %}<img src="{{ p.control }}" alt="control map of {{ p.sample_id }}">{% endif %}<figcaption>{{ label }}: {{ s.column }} {{ p.score }} ({{ p.kind }})<br>{{ p.sample_id }}</figcaption></figure>
{%- endfor %}
</div>
{%- endfor %}
</section>
{%- endfor %}
{%- endif %}
<h2>Errors</h2>
{%- if errors %}
<table id="errors"><tr><th>stage</th><th>type</th><th>message</th><th>count</th><th>examples</th></tr>
{%- for e in errors %}<tr data-stage="{{ e[0] }}">{% for c in e %}{% if c is number %}<td class="n">{{ c }}</td>{% else %}<td>{{ c }}</td>{% endif %}{% endfor %}</tr>{% endfor %}</table>
{%- if more_errors %}<p class="note">{{ more_errors }} more error groups not listed.</p>{% endif %}
{%- else %}
<p>None.</p>
{%- endif %}
<h2>Models</h2>
{{ table(["role", "model", "revision (configured)", "resolved revision"], models) }}
{{ table(["annotator", "name", "parameters (effective)"], annotators) }}
<h2>Samples</h2>
{%- if n_sources > cards|length %}
<p class="note">Showing the first {{ cards|length }} of {{ n_sources }} sources (sorted by source URI); rebuild with <code>python -m pipeline report OUT --max-sources N</code> to show more.</p>
{%- else %}
<p>All {{ n_sources }} sources. Hover over an image for its prompt and seed; click it to enlarge.</p>
{%- endif %}
<div class="filters">
<label>prompt contains <input id="f-prompt" type="search"></label>
<label>control map <select id="f-annotator"><option value="">all</option>{% for a in control_ids %}<option>{{ a }}</option>{% endfor %}</select></label>
<label>errors at <select id="f-error"><option value="">every stage</option>{% for st in error_stages %}<option>{{ st }}</option>{% endfor %}</select></label>
<label><input id="f-overlay" type="checkbox"> control maps over the source</label>
</div>
{%- for card in cards %}
<section class="card"><h3 title="{{ card.uri }}">{{ card.uri.rsplit("/", 1)[-1] }}</h3><div class="row">
<figure class="source"><img src="{{ card.image }}" alt="source" title="{{ card.uri }}"><figcaption>source</figcaption></figure>
{%- for col, uri in card.controls.items() %}
<figure class="control" data-control="{{ col[8:] }}"><img src="{{ uri }}" alt="{{ col[8:] }}" title="control map {{ col }}"><img class="over" src="{{ card.image }}" alt="source under {{ col[8:] }}"><figcaption>{{ col[8:] }}</figcaption></figure>
{%- endfor %}
{%- for v in card.variants %}
<figure class="generated" data-prompt="{{ v.prompt or '' }}"><img src="{{ v.uri }}" alt="generated variant {{ v.variant_index }}" title="prompt: {{ v.prompt }}
seed: {{ v.seed }}
variant: {{ v.variant_index }}
sample_id: {{ v.sample_id }}"><figcaption>#{{ v.variant_index }} · seed {{ v.seed }}<br><span class="prompt">{{ v.prompt or "" }}</span></figcaption></figure>
{%- endfor %}
</div></section>
{%- endfor %}
<div id="lightbox"><img alt="enlarged"></div>
<script>{{ script|safe }}</script>
</body></html>
"""


def report_html(out: RunOutput, max_sources: int = MAX_SOURCES, px: int = THUMB_PX) -> str:
    manifest = out.manifest()
    counts = manifest.get("counts", {})
    cards, n_sources = gallery(out, max_sources, px)
    errors = error_groups(out)
    return jinja2.Environment(autoescape=True).from_string(TEMPLATE).render(
        run_id=str(manifest.get("run_id")), style=STYLE, script=SCRIPT, url=out.url, manifest=manifest,
        counts=[[k.replace("_", " "), v] for k, v in counts.items() if k != "errors_by_stage"]
               + [[f"errors at {s}", n] for s, n in counts.get("errors_by_stage", {}).items()],
        finished=finished(manifest), throughput=throughput(manifest),
        stages=[[st["name"], fmt_seconds(st["seconds"]), st["share"], st["rows"], fmt_rate(st["rows_per_s"])]
                for st in stage_rows(manifest)],
        errors=[[g["stage"], g["type"], g["message"], g["count"], "\n".join(map(str, g["examples"]))]
                for g in errors[:MAX_ERROR_GROUPS]],
        error_stages=sorted({g["stage"] for g in errors if g["stage"]}),
        more_errors=max(0, len(errors) - MAX_ERROR_GROUPS),
        models=[[r["role"], r["model"] or "— (no weights)", r["revision"] or "—", r["commit"] or "—"]
                for r in model_rows(manifest)],
        annotators=[[a["id"], a["name"], json.dumps(a["params"], sort_keys=True)] for a in annotator_rows(manifest, out)],
        control_ids=[c.removeprefix("control_") for c in out.control_columns()],
        cards=cards, n_sources=n_sources,
        quality=report_section(out, manifest, lambda png: thumbnail_uri(png, px)))
