"""Captions for uncaptioned photos (the caption stage with the tiny BLIP and Florence-2 models), prompts
per image (a Parquet column, a JSONL/CSV file by name or sha256), templates without dangling separators,
and the training export's check for empty text."""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.captioners import CAPTIONERS
from pipeline.captioners.stage import Caption
from pipeline.cli import main
from pipeline.config import CaptionerConfig, ConfigError, ImageConfig, PromptConfig, SourceConfig, load_config
from pipeline.export import ExportError, export_controlnet_train
from pipeline.io.images import Decode, array_to_png
from pipeline.io.resume import OutputExists
from pipeline.io.sources import read_source
from pipeline.job import resolve_models, run
from pipeline.models import resolve_model
from pipeline.variants import ExpandVariants, PromptFileError, load_prompt_file, render_prompt, source_name
from tests.helpers import canny_job, job_dict, photo, read_parquet_dir

NAMES = ("astronaut", "chelsea", "coffee", "camera")


def rows_of_photos(captions=None):
    captions = captions or {}
    rows = []
    for name in NAMES:
        image = photo(name, (96, 64))
        rows.append({"source_uri": f"/photos/{name}.jpg", "source_sha256": name, "caption": captions.get(name),
                     "image": array_to_png(image), "width": 96, "height": 64})
    return pa.Table.from_pylist(rows)


@pytest.mark.parametrize("kind, task", [("blip", None), ("florence2", None), ("florence2", "<MORE_DETAILED_CAPTION>")])
def test_captions_are_written_recorded_and_deterministic(tiny_models, kind, task):
    path = tiny_models[f"captioner/{kind}"]
    cfg = CaptionerConfig(kind=kind, model=path, task=task, max_new_tokens=8)
    model = resolve_model(path, None, CAPTIONERS[kind].probe, False, CAPTIONERS[kind].files)
    stage = Caption(cfg, model)
    batch = rows_of_photos({"coffee": "a cup of coffee"})
    out = stage(batch).to_pylist()
    assert [r.get("error_stage") for r in out] == [None] * len(NAMES)
    by_name = {r["source_uri"].split("/")[-1][:-4]: r for r in out}
    assert by_name["coffee"]["caption"] == "a cup of coffee" and by_name["coffee"]["captioner"] is None  # the source's
    for name in ("astronaut", "chelsea", "camera"):
        caption = by_name[name]["caption"]
        assert caption and caption == caption.strip() and "<" not in caption and "[" not in caption, caption
        prov = json.loads(by_name[name]["captioner"])
        assert prov == {"kind": kind, "model": path, "revision": model.commit, "task": cfg.effective_task,
                        "max_new_tokens": 8, "decoding": "greedy", "transformers": prov["transformers"]}
        assert prov["revision"].startswith("sha256:")
    assert prov["task"] == (task or ("<CAPTION>" if kind == "florence2" else None))
    if task == "<MORE_DETAILED_CAPTION>":  # the image decides the caption (the tiny Florence-2 has large weights)
        assert len({by_name[n]["caption"] for n in ("astronaut", "chelsea", "camera")}) > 1
    # greedy: the same images give the same captions, in another batch composition and another actor too
    again = {r["source_uri"]: r["caption"] for r in Caption(cfg, model)(batch.slice(1, 2)).to_pylist()}
    assert again == {r["source_uri"]: r["caption"] for r in out[1:3]}
    overwritten = Caption(cfg.model_copy(update={"overwrite": True}), model)(batch).to_pylist()
    assert overwritten[2]["caption"] != "a cup of coffee" and overwritten[2]["captioner"] is not None


def test_captioner_config_is_checked():
    assert CaptionerConfig(kind="florence2", model="m").effective_task == "<CAPTION>"
    for bad, message in (({"kind": "blip", "task": "<CAPTION>"}, "captioner blip takes no task"),
                         ({"kind": "florence2", "task": "<OD>"}, "task '<OD>' is not one of"),
                         ({"kind": "llava"}, "unknown captioner kind 'llava'")):
        with pytest.raises(ValueError, match=message):
            CaptionerConfig(model="m", **bad)


@pytest.mark.parametrize("template, caption, want", [
    ("{prompt}, {caption}", None, "a watercolor painting"),
    ("{prompt}, {caption}", "  ", "a watercolor painting"),
    ("{prompt}, {caption}", "a cat", "a watercolor painting, a cat"),
    ("{caption}, {prompt}", "", "a watercolor painting"),
    ("{prompt} of {caption}", "", "a watercolor painting"),
    ("{prompt}, {caption}, variant {variant}", "", "a watercolor painting, variant 1"),
    ("A photo of {caption}. {prompt}.", "", "A photo of a watercolor painting."),
])
def test_an_empty_field_leaves_no_dangling_separator(template, caption, want):
    cfg = PromptConfig(prompts=["a photo", "a watercolor painting"], template=template)
    assert render_prompt(cfg, 1, caption) == want


def expand(prompts: PromptConfig, rows, image_prompts=None):
    return ExpandVariants(0, 2, prompts, None, image_prompts)(pa.Table.from_pylist(rows)).to_pylist()


def test_prompts_file_by_name_and_by_sha256_reaches_the_right_rows(tmp_path):
    rows = [{"source_uri": f"/photos/{n}.jpg", "source_sha256": hashlib.sha256(n.encode()).hexdigest(), "caption": None}
            for n in NAMES]
    rows[1]["source_uri"] = "/data/shard-0.tar#chelsea.jpg"  # a member: the name after '#'
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"name": "astronaut.jpg", "prompt": "an astronaut on the moon"},
        {"name": "chelsea.jpg", "prompt": ["a tabby cat", "a lion"]},  # one per variant
        {"name": "coffee.jpg", "prompt": "a cup"}, {"name": "camera.jpg", "prompt": "a man"}]))
    cfg = PromptConfig(file=str(tmp_path / "p.jsonl"), template="{prompt}, {caption}")
    got = {(r["source_uri"], r["variant_index"]): r["prompt"] for r in expand(cfg, rows, load_prompt_file(cfg))}
    assert got[("/photos/astronaut.jpg", 0)] == got[("/photos/astronaut.jpg", 1)] == "an astronaut on the moon"
    assert (got[("/data/shard-0.tar#chelsea.jpg", 0)], got[("/data/shard-0.tar#chelsea.jpg", 1)]) == ("a tabby cat", "a lion")
    assert got[("/photos/camera.jpg", 1)] == "a man"

    sha = {n: hashlib.sha256(n.encode()).hexdigest() for n in NAMES}
    (tmp_path / "p.csv").write_text("sha256,prompt\n" + "".join(f"{sha[n].upper()},a photo of {n}\n" for n in NAMES[:3]))
    cfg = PromptConfig(file=str(tmp_path / "p.csv"), key="sha256", template="{prompt}")
    out = expand(cfg, rows, load_prompt_file(cfg))
    prompts = {r["source_sha256"]: r["prompt"] for r in out if r.get("error_stage") is None}
    assert prompts == {sha[n]: f"a photo of {n}" for n in NAMES[:3]}
    missing = [r for r in out if r.get("error_stage")]
    assert len(missing) == 1 and missing[0]["error_stage"] == "expand" and missing[0]["error_type"] == "MissingPrompt"
    assert missing[0]["error_message"] == (f"no prompt for {sha['camera']} in {tmp_path / 'p.csv'} "
                                           f"(generation.prompt.key: sha256)")


def test_a_broken_prompts_file_is_one_line_naming_the_line(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"name": "a.jpg", "prompt": "x"}\n{"file": "b.jpg", "prompt": "y"}\n')
    with pytest.raises(PromptFileError, match=r"p.jsonl line 2: needs the fields 'name' and 'prompt'"):
        load_prompt_file(PromptConfig(file=str(tmp_path / "p.jsonl")))
    with pytest.raises(PromptFileError, match="cannot read it"):
        load_prompt_file(PromptConfig(file=str(tmp_path / "nothing.csv")))
    (tmp_path / "e.csv").write_text("name,prompt\na.jpg,a cat\nb.jpg,  \n")  # an empty prompt is not a prompt
    with pytest.raises(PromptFileError, match=r"e.csv row 3: 'prompt' is empty"):
        load_prompt_file(PromptConfig(file=str(tmp_path / "e.csv")))


def test_a_csv_prompts_file_with_a_byte_order_mark_reads_as_without(tmp_path):
    """Excel's "CSV UTF-8" begins with a byte-order mark, which must not become part of the first column's name."""
    (tmp_path / "p.csv").write_bytes("\ufeffname,prompt\nphoto-0000.jpg,a cat\n".encode("utf-8"))
    assert load_prompt_file(PromptConfig(file=str(tmp_path / "p.csv"))) == {"photo-0000.jpg": "a cat"}


def test_prompt_column_needs_parquet_and_generation(tiny_models, tmp_path):
    data = job_dict(str(tmp_path), str(tmp_path / "out"), tiny_models)
    data["source"]["prompt_column"] = "text"
    with pytest.raises(ConfigError, match="only a parquet source has columns"):
        load_config(data=data)


def test_uncaptioned_photos_become_training_pairs_with_text(ray_session, tiny_models, photos_dir, tmp_path, capsys):
    """Annotate-only job with the tiny BLIP captioner; the export has text in every row; without the
    captioner the export warns and --require-text refuses."""
    data = canny_job(str(photos_dir), str(tmp_path / "out"))
    data["captioner"] = {"kind": "blip", "model": tiny_models["captioner/blip"], "max_new_tokens": 6, "batch_size": 2}
    cfg = load_config(data=data)
    result = run(cfg)
    assert result.errors == 0 and result.samples == len(list(photos_dir.glob("*.jpg")))
    table = read_parquet_dir(tmp_path / "out" / "samples")
    commit = resolve_models(cfg).captioner.commit
    assert all(table["caption"].to_pylist()) and table.schema.field("captioner").type == pa.string()
    assert {json.loads(p)["revision"] for p in table["captioner"].to_pylist()} == {commit}
    assert result.manifest["models"]["captioner"]["commit"] == commit
    record = export_controlnet_train(str(tmp_path / "out"), str(tmp_path / "train"), require_text=True)
    assert record["empty_text"] == 0
    assert sorted(pq.read_table(tmp_path / "train" / "train").column("text").to_pylist()) == sorted(table["caption"].to_pylist())

    del data["captioner"]
    data["output"]["path"] = str(tmp_path / "plain")
    run(load_config(data=data))
    capsys.readouterr()
    assert main(["export", str(tmp_path / "plain"), str(tmp_path / "plain-train"), "--format", "controlnet-train"]) == 0
    err = capsys.readouterr().err
    assert "warning: 5 rows have an empty caption (text)" in err and "`captioner` section" in err
    assert "run the job again with output.new_version=true" in err  # into the same path it is refused as changed
    assert "--require-text makes this an error" in err and len(err.strip().splitlines()) == 1
    assert main(["export", str(tmp_path / "plain"), str(tmp_path / "refused"), "--format", "controlnet-train",
                 "--require-text"]) == 2
    assert capsys.readouterr().err.startswith("error: 5 rows have an empty caption")
    assert not (tmp_path / "refused").exists()
    with pytest.raises(ExportError, match="add captions"):
        export_controlnet_train(str(tmp_path / "plain"), str(tmp_path / "refused"), require_text=True)


def test_prompts_from_a_parquet_column_reach_their_rows(ray_session, photos_dir, tmp_path):
    photos = sorted(photos_dir.glob("*.jpg"))
    pq.write_table(pa.table({"jpg": [{"bytes": p.read_bytes(), "path": p.name} for p in photos],
                             "text": [f"a drawing of {p.stem}" for p in photos[:-1]] + [None]}), tmp_path / "s.parquet")
    source = SourceConfig(type="parquet", path=str(tmp_path / "s.parquet"), image_column="jpg", prompt_column="text")
    rows = read_source(source).map_batches(Decode(ImageConfig(resolution=64), {}), batch_format="pyarrow").take_all()
    out = expand(PromptConfig(template="{prompt}, {caption}"), rows)
    got = {source_name(r["source_uri"]): r for r in out}  # <file>#row=<i>/<name>
    assert {n: r["prompt"] for n, r in got.items() if not r.get("error_stage")} == {
        p.name: f"a drawing of {p.stem}" for p in photos[:-1]}
    assert (got[photos[-1].name]["error_type"], got[photos[-1].name]["error_message"]) == (
        "MissingPrompt", "no prompt for this image: its source.prompt_column value is empty")


def test_captions_and_a_prompts_file_in_a_job(ray_session, tiny_models, photos_dir, tmp_path):
    """The captioner fills the captions, the prompts file the prompts; the template joins them; a photo
    the file does not name is an error row."""
    photos = sorted(photos_dir.glob("*.jpg"))
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"name": p.name, "prompt": f"a sketch of {p.stem}"}) + "\n"
                                              for p in photos[1:]))
    data = job_dict(str(photos_dir), str(tmp_path / "out"), tiny_models, steps=1, variants_per_image=1,
                    controlnets=[{"condition": "canny", "model": tiny_models["controlnet/canny"]}])
    data["annotators"] = data["annotators"][:1]
    data["captioner"] = {"kind": "florence2", "model": tiny_models["captioner/florence2"], "max_new_tokens": 5,
                         "task": "<DETAILED_CAPTION>", "batch_size": 2}
    data["generation"]["prompt"] = {"file": str(tmp_path / "p.jsonl"), "template": "{prompt}, {caption}"}
    result = run(load_config(data=data))
    samples = read_parquet_dir(tmp_path / "out" / "samples").to_pylist()
    assert {r["source_uri"]: r["prompt"] for r in samples} == {
        str(p): f"a sketch of {p.stem}, {r['caption']}" for p in photos[1:] for r in samples if r["source_uri"] == str(p)}
    assert all(r["caption"] and json.loads(r["captioner"])["task"] == "<DETAILED_CAPTION>" for r in samples)
    errors = read_parquet_dir(tmp_path / "out" / "errors").to_pylist()
    assert [(e["source_uri"], e["stage"], e["error_message"]) for e in errors] == [
        (str(photos[0]), "expand", f"no prompt for {photos[0].name} in {tmp_path / 'p.jsonl'} (generation.prompt.key: name)")]
    assert (result.samples, result.errors) == (len(photos) - 1, 1)
    # other prompts in the file are another job: refused before anything runs, naming what changed
    (tmp_path / "p.jsonl").write_text(json.dumps({"name": photos[0].name, "prompt": "a lion"}) + "\n")
    with pytest.raises(OutputExists, match=r"holds a run of a different job \(changed: prompts_file_sha256\)"):
        run(load_config(data=data))


@pytest.mark.parametrize("kind", ["blip", "florence2"])
def test_models_fetch_downloads_what_the_captioner_loads(tiny_models, tmp_path, monkeypatch, kind):
    """`models fetch` asks the hub for the captioner's file patterns; a snapshot of exactly the matching
    files of a real save_pretrained layout (here the tiny model's, served by a stand-in for the hub)
    loads and captions."""
    import fnmatch
    import shutil
    from pathlib import Path

    import huggingface_hub

    from pipeline.fetch import fetch

    served = Path(tiny_models[f"captioner/{kind}"])
    asked = []

    def snapshot_download(repo_id, revision=None, local_dir=None, allow_patterns=None):
        asked.append((repo_id, revision, tuple(allow_patterns)))
        Path(local_dir).mkdir(parents=True)
        for f in served.iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy(f, Path(local_dir) / f.name)
        return local_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    data = canny_job(str(tmp_path), str(tmp_path / "out"))
    data["captioner"] = {"kind": kind, "model": f"acme/{kind}-captions", "revision": "v1"}
    fetched = fetch(load_config(data=data), tmp_path / "models")
    assert [(f.role, f.path, f.downloaded) for f in fetched] == [
        (f"captioner {kind}", str(tmp_path / "models" / "acme" / f"{kind}-captions"), True)]
    assert asked == [(f"acme/{kind}-captions", "v1", CAPTIONERS[kind].files)]
    local = tmp_path / "models" / "acme" / f"{kind}-captions"
    assert {f.name for f in local.iterdir()} == {f.name for f in served.iterdir()}  # nothing the loader needs is left out
    model = resolve_model(str(local), None, CAPTIONERS[kind].probe, False, CAPTIONERS[kind].files)
    captioner = CAPTIONERS[kind](model, CAPTIONERS[kind].tasks[0] if CAPTIONERS[kind].tasks else None, 4)
    assert captioner([photo("rocket", (64, 64))])[0]


def test_a_captioner_model_that_is_not_there_fails_the_job_at_start(tiny_models, tmp_path):
    from pipeline.models import ModelUnavailable

    data = job_dict(str(tmp_path), str(tmp_path / "out"), tiny_models)
    data["captioner"] = {"kind": "blip", "model": "acme/not-cached"}
    with pytest.raises(ModelUnavailable, match=r"model 'acme/not-cached' \(revision main\) is not available"):
        resolve_models(load_config(data=data))
