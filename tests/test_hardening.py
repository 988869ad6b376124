"""Hostile inputs, hostile output folders and config mistakes: each defect a user could meet on a corpus
of millions of files, reproduced on real files and a local Ray instance."""

import hashlib
import io
import json
import os
import pickle
import shutil
import socket
import struct
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import ImageConfig, load_config
from pipeline.docs import inspect_text
from pipeline.docs.report import report_html
from pipeline.io.images import decode_image
from pipeline.io.lock import RunLock, OutputLocked
from pipeline.io.output import RunOutput, UnsafeParquet
from pipeline.io.sources import SourceError, local_path
from pipeline.job import OutputExists, prepare, run
from pipeline.provenance import redacted
from pipeline.rows import error_message
from tests.helpers import photo, read_parquet_dir

MAX_BYTES = 150_000


def annotate_only(source, output, **source_options) -> dict:
    return {"seed": 3, "source": {"type": "images", "path": str(source), **source_options},
            "image": {"resolution": 64, "max_bytes": MAX_BYTES},
            "annotators": [{"name": "canny"}], "output": {"path": str(output)}}


def jpeg(name: str, size=(96, 64), **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(photo(name, size)).save(buf, format="JPEG", **kw)
    return buf.getvalue()


def text_orientation_exif(text: str) -> bytes:
    """Raw EXIF whose orientation tag (0x0112) is ASCII text instead of a SHORT (Pillow writes only SHORTs)."""
    value = text.encode() + b"\0"
    entry = struct.pack(">HHII", 0x0112, 2, len(value), 8 + 2 + 12 + 4)  # tag, type ASCII, count, value offset
    return b"Exif\x00\x00MM\x00*" + struct.pack(">IH", 8, 1) + entry + struct.pack(">I", 0) + value


@pytest.fixture(scope="module")
def hostile(ray_session, tmp_path_factory):
    """One annotate-only run over a folder of odd inputs next to good ones."""
    d = tmp_path_factory.mktemp("hostile")
    (d / "good.jpg").write_bytes(jpeg("astronaut"))
    os.makedirs(os.fsencode(d), exist_ok=True)
    with open(os.path.join(os.fsencode(d), b"caf\xe9-latin1.jpg"), "wb") as f:  # not valid UTF-8
        f.write(jpeg("coffee"))
    os.mkfifo(d / "pipe.jpg")  # a read would block forever
    (d / "zero.jpg").symlink_to("/dev/zero")  # a read would never end
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "linked.jpg"
    elsewhere.write_bytes(jpeg("coffee", size=(80, 64)))
    (d / "link.jpg").symlink_to(elsewhere)  # a link to a regular file: read as that file
    (d / "pair").write_bytes(b"not the image")
    (d / "pair::c.jpg").write_bytes(jpeg("chelsea"))  # must not be read as the URL chain pair -> c.jpg
    (d / "copy-a.jpg").write_bytes(jpeg("rocket"))
    (d / "copy-b.jpg").write_bytes(jpeg("rocket"))  # byte-identical
    (d / "exif-text.jpg").write_bytes(jpeg("camera", exif=text_orientation_exif("upside down")))
    ramp = np.linspace(-1e6, 3e6, 96 * 64, dtype=np.float32).reshape(64, 96)
    Image.fromarray(ramp, mode="F").save(d / "float.tif")
    Image.fromarray((ramp * 100).astype(np.int32), mode="I").save(d / "wide.tif")
    (d / "eps.jpg").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300, 3), np.uint8)).save(d / "big.png")
    assert (d / "big.png").stat().st_size > MAX_BYTES
    out = tmp_path_factory.mktemp("hostile-out") / "out"
    started = time.monotonic()
    result = run(load_config(data=annotate_only(d, out)))
    return {"dir": d, "out": out, "result": result, "seconds": time.monotonic() - started,
            "samples": read_parquet_dir(out / "samples").to_pylist(), "errors": read_parquet_dir(out / "errors").to_pylist()}


def by_name(rows) -> dict[str, dict]:
    return {os.path.basename(local_path(r["source_uri"])): r for r in rows}


def test_a_file_name_that_is_not_utf8_is_read_and_its_uri_round_trips(hostile):
    samples = by_name(hostile["samples"])
    name = os.fsdecode(b"caf\xe9-latin1.jpg")
    row = samples[name]
    assert row["source_uri"].startswith("file://") and row["source_uri"].endswith("/caf%E9-latin1.jpg")
    with open(local_path(row["source_uri"]), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == row["source_sha256"]


def test_fifos_and_devices_are_never_read_and_links_to_files_are(hostile):
    names = set(by_name(hostile["samples"])) | set(by_name(hostile["errors"]))
    assert not {"pipe.jpg", "zero.jpg"} & names  # not listed: the run ended instead of hanging
    assert hostile["result"].inputs == len(names)
    linked = by_name(hostile["samples"])["link.jpg"]
    assert linked["source_sha256"] == hashlib.sha256((hostile["dir"] / "link.jpg").resolve().read_bytes()).hexdigest()


def test_double_colon_names_are_files_not_url_chains(hostile):
    row = by_name(hostile["samples"])["pair::c.jpg"]
    assert row["source_sha256"] == hashlib.sha256((hostile["dir"] / "pair::c.jpg").read_bytes()).hexdigest()


def test_identical_files_keep_unique_ids_and_the_copy_is_an_error_naming_the_first(hostile):
    samples, errors = by_name(hostile["samples"]), by_name(hostile["errors"])
    kept = [n for n in ("copy-a.jpg", "copy-b.jpg") if n in samples]
    copy = [n for n in ("copy-a.jpg", "copy-b.jpg") if n in errors]
    assert len(kept) == len(copy) == 1
    assert errors[copy[0]]["error_type"] == "DuplicateContent"
    assert errors[copy[0]]["error_message"] == f"same content as {samples[kept[0]]['source_uri']}"
    ids = [r["sample_id"] for r in hostile["samples"]]
    assert len(ids) == len(set(ids)) and hostile["result"].manifest["counts"]["duplicate_sample_ids"] == 0


def test_a_wrong_type_exif_orientation_is_ignored_and_recorded(hostile):
    transform = json.loads(by_name(hostile["samples"])["exif-text.jpg"]["transform"])
    assert transform["exif_orientation"] == 1 and transform["exif_orientation_ignored"] == "'upside down'"


def test_float_and_wide_integer_images_are_scaled_by_their_real_range(hostile):
    samples = by_name(hostile["samples"])
    for name, low, high in (("float.tif", -1e6, 3e6), ("wide.tif", -1e8, 3e8)):
        transform = json.loads(samples[name]["transform"])
        assert transform["value_range"] == pytest.approx([low, high], rel=1e-3), name
        pixels = np.asarray(Image.open(io.BytesIO(samples[name]["image"]["bytes"])).convert("L"))
        assert pixels.min() <= 5 and pixels.max() >= 250, name  # a ramp over the whole range, not black or wrapped
        assert (np.diff(pixels.astype(int), axis=1) >= -2).all(), name  # still increasing left to right


def test_only_the_configured_formats_are_decoded(hostile):
    error = by_name(hostile["errors"])["eps.jpg"]
    assert error["stage"] == "decode" and "allowed format" in error["error_message"]


def test_inputs_over_max_bytes_are_error_rows(hostile):
    error = by_name(hostile["errors"])["big.png"]
    assert error["error_type"] == "InputTooLarge" and f"image.max_bytes={MAX_BYTES}" in error["error_message"]


def test_every_input_ends_exactly_once_and_a_resume_recreates_a_lost_duplicate_row(hostile, tmp_path):
    counts = hostile["result"].manifest["counts"]
    listed = {p.name for p in hostile["dir"].iterdir()} - {"pipe.jpg", "zero.jpg", "pair"}
    assert counts["inputs"] == len(listed) == len(hostile["samples"]) + len(hostile["errors"])
    # a crash lost the file holding the duplicate's error row: the resume writes it again, nothing else
    import shutil

    out = tmp_path / "out"
    shutil.copytree(hostile["out"], out)
    copy = next(r for r in hostile["errors"] if r["error_type"] == "DuplicateContent")
    for f in (out / "errors").glob("*.parquet"):
        if copy["source_uri"] in pq.read_table(f, columns=["source_uri"])["source_uri"].to_pylist():
            rest = pq.read_table(f).filter(pa.compute.not_equal(pa.compute.field("source_uri"), copy["source_uri"]))
            f.unlink()
            if rest.num_rows:
                pq.write_table(rest, out / "errors" / "part-rest.parquet")
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "completed": False}))
    result = run(load_config(data=annotate_only(hostile["dir"], out)))
    assert result.manifest["this_run"] == {"samples": 0, "errors": 1}
    assert result.manifest["counts"] == counts
    assert by_name(read_parquet_dir(out / "errors").to_pylist())[Path(local_path(copy["source_uri"])).name][
        "error_message"] == copy["error_message"]


def test_decoding_a_16_bit_image_takes_a_few_bytes_per_pixel():
    ramp = (np.arange(2048 * 2048, dtype=np.uint32) % 65536).astype(np.uint16).reshape(2048, 2048)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    tracemalloc.start()
    array, _ = decode_image(buf.getvalue(), ImageConfig(resolution=64, max_aspect_ratio=4))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert array.shape == (64, 64, 3)
    assert peak < 4 * ramp.size, f"{peak / ramp.size:.1f} bytes per pixel"  # float64 copies took 16+


def test_a_wrong_source_deletes_nothing_and_writes_no_manifest(hostile, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(hostile["out"], out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    data = annotate_only(tmp_path / "no-such-folder", out)
    data["output"]["overwrite"] = True
    with pytest.raises(SourceError, match="does not exist"):
        run(load_config(data=data))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    fresh = tmp_path / "fresh"
    with pytest.raises(SourceError):
        run(load_config(data=annotate_only(tmp_path / "no-such-folder", fresh)))
    assert not fresh.exists()
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(OutputExists, match="is a file"):
        prepare(load_config(data=annotate_only(hostile["dir"], tmp_path / "a-file")))


class Payload:
    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_outputs_with_pickled_extension_columns_are_refused_unread(hostile, tmp_path):
    import shutil

    from ray.data._internal.object_extensions.arrow import ArrowPythonObjectArray

    out = tmp_path / "out"
    shutil.copytree(hostile["out"], out)
    payload = Payload()
    payload.marker = tmp_path / "code-ran"
    assert pickle.loads(pickle.dumps(payload)) is None and payload.marker.exists()  # the payload does run code
    payload.marker.unlink()
    crafted = pa.table({"sample_id": ArrowPythonObjectArray.from_objects([payload]), "source_uri": ["x"]})
    pq.write_table(crafted, out / "samples" / "part-crafted.parquet")
    for read in (lambda: RunOutput(str(out)).written(), lambda: inspect_text(str(out)),
                 lambda: run(load_config(data=annotate_only(hostile["dir"], out)))):
        with pytest.raises(UnsafeParquet, match="extension columns"):
            read()
    assert not payload.marker.exists()


def test_secrets_are_redacted_by_field_and_in_urls_and_nothing_else():
    config = {"source": {"caption_key": "caption", "path": "s3://bucket/photos",
                         "storage_options": {"endpoint_url": "http://user:p4ss@127.0.0.1:9000", "key": "AKIA",
                                             "secret": "s3cr3t", "client_kwargs": {"headers": {"Authorization": "Bearer t"}},
                                             "connection_string": "AccountKey=abc", "sas": "sv=1&sig=x", "anon": False}}}
    got = redacted(config)
    options = got["source"]["storage_options"]
    assert got["source"]["caption_key"] == "caption" and got["source"]["path"] == "s3://bucket/photos"
    assert options["endpoint_url"] == "http://user:<redacted>@127.0.0.1:9000"
    assert options["client_kwargs"]["headers"]["Authorization"] == "<redacted>"
    assert all(options[k] == "<redacted>" for k in ("key", "secret", "connection_string", "sas"))
    assert options["anon"] is False and "p4ss" not in json.dumps(got) and "s3cr3t" not in json.dumps(got)
    assert redacted({"generation": {"prompt": {"key": "sha256"}}}) == {"generation": {"prompt": {"key": "sha256"}}}


def test_report_escapes_every_value_from_the_output(hostile, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(hostile["out"], out)
    manifest = json.loads((out / "manifest.json").read_text())
    evil = "<script>alert(1)</script>"
    manifest.update(code_version=evil, started_at=evil)
    manifest["counts"]["samples"] = evil
    manifest["timings"]["samples_per_s"] = evil
    (out / "manifest.json").write_text(json.dumps(manifest))
    html = report_html(RunOutput(str(out)))
    assert evil not in html and html.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 4


def test_parquet_path_columns_read_only_under_allowed_roots(ray_session, tmp_path):
    inside = tmp_path / "shards" / "imgs"
    inside.mkdir(parents=True)
    (inside / "a.jpg").write_bytes(jpeg("astronaut"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "b.jpg").write_bytes(jpeg("chelsea"))
    paths = ["imgs/a.jpg", "imgs/../../elsewhere/b.jpg", str(elsewhere / "b.jpg"), "file:///etc/hostname"]
    pq.write_table(pa.table({"image": paths}), tmp_path / "shards" / "index.parquet")
    data = annotate_only(tmp_path / "shards" / "index.parquet", tmp_path / "out")
    data["source"]["type"] = "parquet"
    result = run(load_config(data=data))
    assert [Path(u).name for u in read_parquet_dir(tmp_path / "out" / "samples")["source_uri"].to_pylist()] == ["a.jpg"]
    errors = read_parquet_dir(tmp_path / "out" / "errors").to_pylist()
    assert len(errors) == 3 and all("outside source.allowed_roots" in e["error_message"] for e in errors)
    assert result.inputs == 4
    data["source"]["allowed_roots"] = [str(tmp_path / "shards"), str(elsewhere)]
    data["output"]["path"] = str(tmp_path / "out2")
    run(load_config(data=data))
    names = sorted(Path(u).name for u in read_parquet_dir(tmp_path / "out2" / "samples")["source_uri"].to_pylist())
    assert names == ["a.jpg", "b.jpg"]  # b.jpg once: the second path to it is the same content, a duplicate


def test_error_messages_carry_no_object_addresses():
    try:
        Image.open(io.BytesIO(b"not an image"))
    except Exception as e:  # noqa: BLE001
        assert " at 0x" in str(e)
        assert error_message(e) == "cannot identify image file <_io.BytesIO>"


def test_one_run_per_output_path(tmp_path):
    output = RunOutput(str(tmp_path / "out"))
    with RunLock(output, "run-a"):
        with pytest.raises(OutputLocked, match="in use by run run-a"):
            RunLock(output, "run-b").acquire()
    with RunLock(output, "run-b"):  # released: free again
        pass
    lock = output.path(".lock")
    dead = {"run_id": "gone", "host": socket.gethostname(), "pid": 2**22 + 12345, "heartbeat_at": time.time()}
    Path(lock).write_text(json.dumps(dead))
    with RunLock(output, "run-c"):  # its process is gone: taken over at once
        assert json.loads(Path(lock).read_text())["run_id"] == "run-c"
    elsewhere = {"run_id": "remote", "host": "another-host", "pid": 1, "heartbeat_at": time.time()}
    Path(lock).write_text(json.dumps(elsewhere))
    with pytest.raises(OutputLocked, match="in use by run remote on another-host"):
        RunLock(output, "run-d").acquire()
    Path(lock).write_text(json.dumps({**elsewhere, "heartbeat_at": time.time() - 3600}))
    with RunLock(output, "run-e"):  # its heartbeat stopped an hour ago
        pass
    assert not Path(lock).exists()


def test_a_second_run_into_a_locked_output_is_refused_before_writing(hostile, tmp_path):
    out = tmp_path / "out"
    with RunLock(RunOutput(str(out)), "first"):
        with pytest.raises(OutputLocked):
            run(load_config(data=annotate_only(hostile["dir"], out)))
        assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_score_names_the_run_still_writing_an_unfinished_output(hostile, tmp_path):
    from pipeline.scorers.rescore import NotScorable, score_output

    out = tmp_path / "out"
    shutil.copytree(hostile["out"], out)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(manifest | {"completed": False}))
    # a run at work: wait for it, not "run the job again"
    with RunLock(RunOutput(str(out)), "writing"), pytest.raises(OutputLocked, match="in use by run writing on "):
        score_output(str(out))
    with pytest.raises(NotScorable, match="the run did not finish; run the same job again to complete it"):
        score_output(str(out))


def test_a_finished_job_run_again_writes_nothing(hostile):
    out = hostile["out"]
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    result = run(load_config(data=annotate_only(hostile["dir"], out)))
    assert result.run_id == hostile["result"].run_id
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()} == before


def test_ctrl_c_prints_one_line_and_exits_130_and_the_run_resumes(ray_address, tiny_models, photos_dir, tmp_path):
    import signal
    import subprocess

    import yaml

    from tests.helpers import ROOT, cli, cli_command, cli_env, job_dict

    out = tmp_path / "out"
    data = job_dict(str(photos_dir), str(out), tiny_models, batch_size=1)  # SIGINT as soon as the run has started
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(data))
    args = ("run", tmp_path / "job.yaml", "--address", "local")  # its own Ray instance, as a user's would be
    driver = subprocess.Popen(cli_command(*args), cwd=ROOT, env=cli_env({"RAY_ADDRESS": ""}), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    while not (out / "manifest.json").exists() and driver.poll() is None:  # the run has started its work
        time.sleep(0.05)
    driver.send_signal(signal.SIGINT)
    stdout, stderr = driver.communicate()
    assert driver.returncode == 130, stderr[-3000:]
    assert "interrupted: what was written is kept; run the same command again to resume" in stderr.splitlines()
    assert "Traceback" not in stderr
    assert json.loads((out / "manifest.json").read_text())["completed"] is False
    # resumed on the test session's Ray (a resume does not depend on the instance; one fewer Ray start)
    again = cli("run", tmp_path / "job.yaml", "--address", ray_address, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["samples"] == len(list(photos_dir.iterdir())) * 2 and counts["duplicate_sample_ids"] == 0
