"""The run's documents on a real run: the HTML gallery in headless Chromium, the `report` and
`inspect` commands, the Hugging Face dataset card, and the Croissant file."""

import base64
import io
import json
import os
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from pipeline.annotators import ANNOTATORS
from pipeline.config import load_config
from pipeline.job import run
from pipeline.models import fingerprint
from pipeline.io.output import RunOutput
from pipeline.docs import inspect_text
from pipeline.docs.report import gallery, report_html, thumbnail_uri
from tests.helpers import cli, job_dict, read_parquet_dir

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# an input whose name is markup: it must show as text, never become an element or break an attribute
EVIL = 'bad"<img src=x onerror=alert(1)>.png'
DOCUMENTS = ("report.html", "README.md", "croissant.json")


@pytest.fixture(scope="module")
def output(ray_session, tiny_models, photos_dir, tmp_path_factory):
    """One run: 5 photos (2 variants each, canny + hed) and one empty file that becomes a decode error."""
    inputs = tmp_path_factory.mktemp("report-inputs")
    for p in photos_dir.iterdir():
        shutil.copy(p, inputs / p.name)
    (inputs / EVIL).write_bytes(b"")
    out = tmp_path_factory.mktemp("report-run") / "out"
    result = run(load_config(data=job_dict(str(inputs), str(out), tiny_models)), echo=lambda _: None)
    assert (result.inputs, result.samples, result.errors) == (6, 10, 1)
    return out


def samples(out: Path, columns: list[str]) -> list[dict]:
    return read_parquet_dir(out / "samples", columns=columns).to_pylist()


def open_in_chromium(page_path: Path) -> dict:
    """Load a page in headless Chromium; return its images, text, console problems and non-data requests."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"headless Chromium is needed at {CHROMIUM} for this test: "
                    f"apt-get update && apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    problems, requests = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
            page.on("request", lambda r: requests.append(r.url) if not r.url.startswith(("data:", "file:")) else None)
            page.goto(page_path.as_uri(), wait_until="load")
            images = page.evaluate("""[...document.querySelectorAll('figure img:not(.over)')].map(i => ({
                loaded: i.complete && i.naturalWidth > 0, width: i.naturalWidth, height: i.naturalHeight,
                kind: i.closest('figure').className, title: i.title}))""")
            text = page.inner_text("body")
            visible = "s => [...document.querySelectorAll(s)].filter(e => e.offsetParent !== null)"
            interactions = {}
            if page.query_selector("figure.generated img"):
                clicked = page.get_attribute("figure.generated img", "src")
                page.click("figure.generated img")
                interactions.update(clicked=clicked, lightbox=page.get_attribute("#lightbox.open img", "src"))
                page.click("#lightbox")
                prompt = page.get_attribute("figure.generated", "data-prompt")
                page.fill("#f-prompt", prompt)
                interactions["after_prompt_filter"] = page.evaluate(f"({visible})('figure.generated').length")
                page.fill("#f-prompt", "")
                page.select_option("#f-annotator", "canny")
                interactions["controls_after_annotator_filter"] = page.evaluate(
                    f"({visible})('figure.control').map(f => f.dataset.control)")
                page.select_option("#f-annotator", "")
                page.check("#f-overlay")
                interactions["overlay_shown"] = page.evaluate(f"({visible})('figure.control img.over').length")
        finally:
            browser.close()
    return {"images": images, "text": text, "problems": problems, "requests": requests, **interactions}


def test_gallery_renders_every_image_in_chromium(output):
    page = open_in_chromium(output / "report.html")
    assert page["problems"] == []
    assert page["requests"] == []  # self-contained: nothing fetched
    images = page["images"]
    assert all(i["loaded"] for i in images), [i for i in images if not i["loaded"]]
    kinds = [i["kind"] for i in images]
    # 5 sources, 2 control maps each, 2 generated variants each
    assert (kinds.count("source"), kinds.count("control"), kinds.count("generated"), len(images)) == (5, 10, 10, 25)
    assert all(min(i["width"], i["height"]) == 64 for i in images)  # 64 px images: thumbnails only shrink
    # hovering a generated image shows its prompt and seed
    rows = samples(output, ["seed", "prompt"])
    titles = [i["title"] for i in images if i["kind"] == "generated"]
    assert len(titles) == 10 and {(r["prompt"], r["seed"]) for r in rows} == {
        (re.search(r"prompt: (.*)", t).group(1), int(re.search(r"seed: (\d+)", t).group(1))) for t in titles}
    text = page["text"]
    assert EVIL in text  # the error's source uri, escaped: shown as text
    assert "empty file (0 bytes)" in text and "decode" in text
    assert re.search(r"annotate:hed\s+[\d.]+ s\s+\d+%\s+5\b", text) and re.search(r"generate\s+[\d.]+ s\s+\d+%\s+10\b", text)
    assert page["lightbox"] == page["clicked"] and page["lightbox"].startswith("data:image/jpeg")  # click to enlarge
    prompts = [r["prompt"] for r in rows]
    assert page["after_prompt_filter"] == prompts.count(prompts[0])  # generated images with that prompt only
    assert page["controls_after_annotator_filter"] == ["canny"] * 5  # the hed maps hidden
    assert page["overlay_shown"] == 10  # each control map over its source
    assert "All 5 sources" in text


def test_gallery_caps_sources_and_says_so(output):
    html = report_html(RunOutput(str(output)), max_sources=2)
    assert html.count('<section class="card">') == 2
    assert "Showing the first 2 of 5 sources" in html
    cards, total = gallery(RunOutput(str(output)), max_sources=2, px=256)
    assert total == 5 and [c.uri for c in cards] == sorted({r["source_uri"] for r in samples(output, ["source_uri"])})[:2]
    assert all(len(c.controls) == 2 and len(c.variants) == 2 for c in cards)


def test_thumbnails_are_small_jpegs():
    buf = io.BytesIO()
    Image.new("RGB", (600, 400), "red").save(buf, format="PNG")
    uri = thumbnail_uri(buf.getvalue(), 256)
    assert uri.startswith("data:image/jpeg;base64,")
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as im:
        assert im.size == (256, 171)


def test_report_command_rebuilds_the_same_documents(output, tmp_path):
    written = {name: (output / name).read_bytes() for name in DOCUMENTS}
    for name in DOCUMENTS:
        (output / name).unlink()
    proc = cli("report", str(output))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(output / name) for name in DOCUMENTS]
    for name in DOCUMENTS:
        assert (output / name).read_bytes() == written[name], name

    proc = cli("report", str(tmp_path))
    assert proc.returncode == 2 and "holds no manifest.json" in proc.stderr
    proc = cli("report", str(output), "--max-sources", "-1")
    assert proc.returncode == 2 and "--max-sources: -1 is negative" in proc.stderr
    proc = cli("report", str(output), "--max-sources", "abc")
    assert proc.returncode == 2 and "--max-sources: 'abc' is not a whole number" in proc.stderr


def test_inspect_prints_counts_errors_throughput_and_models(output, tiny_models):
    proc = cli("inspect", str(output))
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for line in ("inputs: 6", "samples: 10", "errors: 1", "samples: 10 rows in 1 files, 5 sources",
                 "decode: 1", "1 x RejectedImage: empty file (0 bytes)", "  generate: "):
        assert line in text, line
    for key in ("base_model", "controlnet/canny", "controlnet/hed"):
        assert f"{tiny_models[key]} @ sha256:{fingerprint(Path(tiny_models[key]))}" in text, key
    hed_files = ANNOTATORS["hed"].files  # an annotator's revision covers the files its loader reads, no others
    assert f"{tiny_models['annotators']} @ sha256:{fingerprint(Path(tiny_models['annotators']), hed_files)}" in text
    assert "annotator canny: (no weights)" in text


def test_inspect_reads_no_image_bytes(output, monkeypatch):
    import pipeline.io.output

    asked = []
    real = pipeline.io.output.pq.read_table
    monkeypatch.setattr(pipeline.io.output.pq, "read_table", lambda f, columns: asked.append(columns) or real(f, columns=columns))
    inspect_text(str(output))
    assert asked and all(columns and not {"image", "generated", "control_canny", "control_hed"} & set(columns)
                         for columns in asked)


def test_dataset_card_front_matter_and_provenance(output, tiny_models):
    import datasets

    card = (output / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    manifest = json.loads((output / "manifest.json").read_text())
    job = f"run {manifest['run_id']} (job {manifest['job_fingerprint']}; files {RunOutput(str(output)).digest()})"
    assert meta["configs"] == [{"config_name": "default", "description": f"samples of {job}",  # for load_dataset: below
                                "data_files": [{"split": "train", "path": "samples/*.parquet"}]}]
    assert meta["license"] == "unknown" and "controlnet" in meta["tags"]
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["run_id"] in body and manifest["code_version"] in body
    assert f"sha256:{fingerprint(Path(tiny_models['controlnet/hed']))}" in body
    assert '{"high_threshold": 150, "low_threshold": 50}' in body  # canny params
    assert "scheduler: unipc" in body and "variants_per_image: 2" in body
    # the card's own config, as `datasets` reads it from the directory: samples only, not errors
    ds = datasets.load_dataset(str(output), split="train")
    assert ds.num_rows == 10 and isinstance(ds.features["control_hed"], datasets.Image)
    # and the usage snippet works as written
    snippet = re.search(r"^ds = (load_dataset\(.*\))$", body, re.MULTILINE).group(1)
    assert eval(snippet, {"load_dataset": datasets.load_dataset}).num_rows == 10


def test_load_dataset_reads_each_output_not_another_of_the_same_folder_name(output, tmp_path):
    """`load_dataset(DIR)` keys its cache by the folder's name and the card's configs: the card's description holds a
    digest of the files, so an output with other rows in a folder of the same name (or this one, its rows rewritten
    under the same file names as `score` does) is not read from the first one's cache."""
    import datasets

    from pipeline.docs import write_documents

    first, second = tmp_path / "a" / "out", tmp_path / "b" / "out"
    shutil.copytree(output, first)
    shutil.copytree(output, second)
    (kept,) = (second / "samples").glob("*.parquet")
    pq.write_table(pq.read_table(kept).slice(0, 4), kept)  # other rows under the same name
    write_documents(str(second))
    rows = [datasets.load_dataset(str(d), split="train", cache_dir=str(tmp_path / "cache")).num_rows for d in (first, second)]
    assert rows == [10, 4]


def test_croissant_validates_and_reads_the_samples(output):
    import mlcroissant as mlc

    dataset = mlc.Dataset(jsonld=str(output / "croissant.json"))  # raises on validation errors
    assert not dataset.metadata.ctx.issues.errors
    records = list(dataset.records("samples"))
    assert sorted(r["samples/sample_id"].decode() for r in records) == sorted(r["sample_id"] for r in samples(output, ["sample_id"]))
    sizes = {r["sample_id"]: (r["width"], r["height"]) for r in samples(output, ["sample_id", "width", "height"])}
    assert all(r["samples/generated"].size == sizes[r["samples/sample_id"].decode()] for r in records)
    assert {r["samples/variant_index"] for r in records} == {0, 1}


def test_an_unfinished_run_is_said_to_be_and_a_rate_counts_the_runs_own_samples():
    """inspect, the report and the card: no "finished None" for a stopped run; after `score` dropped samples, the
    rate still divides the samples the run wrote (not what is left) by its time."""
    from pipeline.docs.stats import finished, throughput

    done = {"completed": True, "finished_at": "2026-11-28T10:00:00+00:00", "counts": {"samples": 4},
            "this_run": {"samples": 16}, "timings": {"total_s": 8.0, "samples_per_s": 2.0}}
    assert finished(done) == "2026-11-28T10:00:00+00:00"
    assert throughput(done) == "16 samples written by the last run in 8.00 s = 2.0 samples/s"
    stopped = {"completed": False, "run_id": "r", "started_at": "2026-11-28T09:00:00+00:00"}
    assert finished(stopped).startswith("not completed: ") and "resumes" in finished(stopped)
    assert throughput(stopped) == "not measured: the run has not completed"


def test_a_damaged_parquet_file_in_an_output_is_one_line_naming_it(output, tmp_path, capsys):
    import shutil

    from pipeline.cli import main

    copy = tmp_path / "out"
    shutil.copytree(output, copy)
    cut = min((copy / "samples").glob("*.parquet"))  # the first: the one whose footer gives the columns
    cut.write_bytes(cut.read_bytes()[:1000])  # a file cut short
    for command in (["inspect", str(copy)], ["report", str(copy)],
                    ["export", str(copy), str(tmp_path / "export"), "--format", "controlnet-train", "--control", "hed"]):
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert err.startswith(f"error: {cut} is not a readable Parquet file (ArrowInvalid: ") and err.count("\n") == 1
