"""Fault injection on local Ray: a directory of good and damaged files, exact accounting."""

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.config import load_config
from pipeline.job import run
from tests.helpers import canny_job, photo, read_parquet_dir


def save(path: Path, image: Image.Image, fmt: str | None = None, **kw) -> None:
    image.save(path, format=fmt, **kw)


def test_good_and_bad_files_are_each_accounted_for_exactly_once(ray_session, tmp_path):
    d = tmp_path / "messy"
    d.mkdir()
    astronaut = Image.fromarray(photo("astronaut"))
    # converted, not rejected
    save(d / "cmyk.jpg", astronaut.convert("CMYK"), "JPEG")
    save(d / "gray16.png", Image.fromarray(np.asarray(astronaut.convert("L"), dtype=np.uint16) * 257))
    save(d / "palette.png", astronaut.convert("P"))
    save(d / "alpha.png", astronaut.convert("RGBA"))
    save(d / "gray.png", Image.fromarray(photo("camera")).convert("L"))  # the grayscale photograph, mode L
    exif = Image.Exif()
    exif[0x0112] = 8
    save(d / "exif-rotated.jpg", Image.fromarray(photo("coffee")), "JPEG", exif=exif)
    save(d / "name with spaces.jpg", Image.fromarray(photo("chelsea")))
    save(d / "ünïcødé 写真.jpg", Image.fromarray(photo("rocket")))
    # rejected, each with its reason
    good_jpeg = (d / "name with spaces.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 5])
    (d / "empty.png").write_bytes(b"")
    (d / "text.jpg").write_text("plain text with an image extension")
    save(d / "bomb.png", Image.new("1", (12_000, 12_000)))  # 144 Mpx in a few KB
    save(d / "too-small.png", Image.new("RGB", (10, 10), "red"))
    save(d / "panorama.jpg", Image.new("RGB", (2000, 100), "blue"))
    (d / "dangling.jpg").symlink_to(d / "deleted-before-read.jpg")
    (d / "loop-a.jpg").symlink_to(d / "loop-b.jpg")  # links to each other: listed, and an error row
    (d / "loop-b.jpg").symlink_to(d / "loop-a.jpg")

    result = run(load_config(data=canny_job(str(d), str(tmp_path / "out"))))  # all decided at decode: no models

    samples = read_parquet_dir(tmp_path / "out" / "samples")
    names = sorted(Path(u).name for u in samples["source_uri"].to_pylist())
    assert names == sorted(["cmyk.jpg", "gray16.png", "palette.png", "alpha.png", "gray.png", "exif-rotated.jpg",
                            "name with spaces.jpg", "ünïcødé 写真.jpg"])
    rotated = samples.filter(pa.compute.equal(samples["source_uri"], str(d / "exif-rotated.jpg"))).to_pylist()[0]
    assert rotated["height"] > rotated["width"] and json.loads(rotated["transform"])["exif_orientation"] == 8
    for row in samples.to_pylist():
        image = Image.open(io.BytesIO(row["image"]["bytes"]))
        assert image.mode == "RGB" and image.size == (row["width"], row["height"])

    errors = {Path(r["source_uri"]).name: r for r in read_parquet_dir(tmp_path / "out" / "errors").to_pylist()}
    reasons = {name: e["error_message"] for name, e in errors.items()}
    assert set(reasons) == {"truncated.jpg", "empty.png", "text.jpg", "bomb.png", "too-small.png", "panorama.jpg",
                            "dangling.jpg", "loop-a.jpg", "loop-b.jpg"}
    assert reasons["empty.png"] == "empty file (0 bytes)"
    assert reasons["truncated.jpg"].startswith("not a decodable image")
    assert reasons["text.jpg"].startswith("not a decodable image")
    assert reasons["bomb.png"] == "12000x12000 pixels is over image.max_pixels=64000000"
    assert reasons["too-small.png"] == "10x10 is smaller than image.min_side=16"
    assert reasons["panorama.jpg"] == "2000x100 has an aspect ratio over image.max_aspect_ratio=4"
    assert "No such file" in reasons["dangling.jpg"] and errors["dangling.jpg"]["error_type"] == "FileNotFoundError"
    assert "Too many levels of symbolic links" in reasons["loop-a.jpg"]
    assert all(e["stage"] == "decode" for e in errors.values())

    counts = json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"]
    assert counts["inputs"] == 17 == samples.num_rows + len(errors)
    assert (result.samples, result.errors, counts["duplicate_sample_ids"]) == (8, 9, 0)
