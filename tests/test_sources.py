"""Sources beyond image folders: WebDataset tar shards and Hugging Face `datasets` Parquet exports."""

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import SourceConfig, load_config
from pipeline.job import run
from pipeline.io.sources import SourceError, list_files, read_source
from tests.helpers import canny_job, read_parquet_dir, write_photos


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, bytes]:
    directory = tmp_path_factory.mktemp("source-photos")
    paths = write_photos(directory, names=("astronaut", "coffee", "rocket"))
    paths += write_photos(directory, names=("chelsea",), fmt="png")
    return {p.name: p.read_bytes() for p in paths}


def test_missing_path_is_a_source_error_naming_it(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(SourceError, match=f"source.path '{missing}' does not exist"):
        list_files(SourceConfig(type="webdataset", path=missing), ["tar"])
    (tmp_path / "notes.txt").write_text("no shards here")
    with pytest.raises(SourceError, match=r"holds no files with extensions \['.tar'\]"):
        list_files(SourceConfig(type="webdataset", path=str(tmp_path)), ["tar"])


def test_webdataset_job(ray_session, photos, tmp_path):
    """Captions from .txt or a configured .json key; an undecodable image is an error row, not a failed job."""
    meta = lambda alt: json.dumps({"alt": alt, "caption": "not this key"}).encode()  # noqa: E731
    write_tar(tmp_path / "shard-000.tar", [
        ("astronaut.jpg", photos["astronaut.jpg"]), ("astronaut.txt", b"an astronaut\n"),
        ("chelsea.png", photos["chelsea.png"]), ("chelsea.json", meta("a cat")),
    ])
    write_tar(tmp_path / "shard-001.tar", [
        ("coffee.jpg", photos["coffee.jpg"]), ("coffee.json", meta("a cup")),
        ("broken.jpg", photos["rocket.jpg"][:500]), ("broken.txt", b"a broken rocket"),
        ("readme.txt", b"a sample without an image is not an input"),
    ])
    data = canny_job(str(tmp_path), str(tmp_path / "out"))
    data["source"] = {"type": "webdataset", "path": str(tmp_path / "shard-*.tar"), "caption_key": "alt"}
    result = run(load_config(data=data), echo=lambda _: None)

    assert (result.inputs, result.samples, result.errors) == (4, 3, 1)
    samples = {r["source_uri"]: r for r in read_parquet_dir(tmp_path / "out" / "samples").to_pylist()}
    shard0, shard1 = (str(tmp_path / f"shard-00{i}.tar") for i in (0, 1))
    assert {uri: r["caption"] for uri, r in samples.items()} == {
        f"{shard0}#astronaut": "an astronaut", f"{shard0}#chelsea": "a cat", f"{shard1}#coffee": "a cup"}
    assert samples[f"{shard1}#coffee"]["source_sha256"] == hashlib.sha256(photos["coffee.jpg"]).hexdigest()
    (error,) = read_parquet_dir(tmp_path / "out" / "errors").to_pylist()
    assert error["source_uri"] == f"{shard1}#broken" and error["stage"] == "decode"
    assert error["source_sha256"] == hashlib.sha256(photos["rocket.jpg"][:500]).hexdigest()


def test_webdataset_members_and_captions(ray_session, photos, tmp_path):
    image = photos["coffee.jpg"]
    write_tar(tmp_path / "shard.tar", [
        ("a.jpg", image), ("a.txt", b"from txt"), ("a.json", b'{"caption": "from json"}'),  # .txt wins
        ("b.JPEG", image), ("b.json", b'{"caption": "default key"}'),  # extensions match in any case
        ("c.webp", image), ("c.json", b"not json"),  # a broken .json is no caption, not a failure
        ("dir/d.png", image), ("dir/d.json", b'{"caption": ["not", "a string"]}'),
        ("e.tiff", image),
    ])
    rows = read_source(SourceConfig(type="webdataset", path=str(tmp_path))).take_all()
    rows = {r["source_uri"].split("#")[1]: r for r in rows}
    assert {k: r["caption"] for k, r in rows.items()} == {
        "a": "from txt", "b": "default key", "c": None, "dir/d": None, "e": None}
    assert all(r["source_bytes"] == image for r in rows.values())
    # a member name in Latin-1 (not UTF-8) and a JSON caption escaping a lone surrogate: rows, not a failed read
    with tarfile.open(tmp_path / "latin.tar", "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        for name, data in (("été.png", image), ("b.png", image), ("b.json", b'{"caption": "bad \\udce9 text"}')):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    latin = {r["source_uri"].split("#")[1]: r for r in
             read_source(SourceConfig(type="webdataset", path=str(tmp_path / "latin.tar"))).take_all()}
    assert sorted(latin) == [r"\xe9t\xe9", "b"] and latin["b"]["caption"] == "bad ? text"
    assert all(r["source_bytes"] == image for r in latin.values())
    (tmp_path / "latin.tar").unlink()
    limited = SourceConfig(type="webdataset", path=str(tmp_path / "shard.tar"), extensions=["jpg", "png"], limit=1)
    assert len(read_source(limited).take_all()) == 1
    only_jpg_png = SourceConfig(type="webdataset", path=str(tmp_path / "shard.tar"), extensions=["jpg", "png"])
    assert sorted(r["source_uri"].split("#")[1] for r in read_source(only_jpg_png).take_all()) == ["a", "dir/d"]


def test_a_damaged_shard_is_an_error_row_naming_it(ray_session, photos, tmp_path):
    """A shard cut short keeps the samples before the cut, a file that is not a tar archive is one error row, the
    members of a key that comes back after another key are one too, and so is a sample with a member over
    image.max_bytes, which is not read; the read goes on (the decode stage makes
    these rows error rows of the job, as for any `source_error`)."""
    write_tar(tmp_path / "a.tar", [("astronaut.jpg", photos["astronaut.jpg"]), ("astronaut.txt", b"an astronaut")])
    cut = write_tar(tmp_path / "b.tar", [("coffee.jpg", photos["coffee.jpg"]), ("chelsea.png", photos["chelsea.png"])])
    coffee_end = 512 + -(-len(photos["coffee.jpg"]) // 512) * 512  # its header, its data in 512-byte blocks
    cut.write_bytes(cut.read_bytes()[: coffee_end + 512 + 100])  # cut inside chelsea.png's data
    (tmp_path / "c.tar").write_bytes(b"not a tar archive\n" * 100)
    write_tar(tmp_path / "d.tar", [("rocket.jpg", photos["rocket.jpg"]), ("x.jpg", photos["coffee.jpg"]),
                                   ("rocket.txt", b"a late caption")])
    read = read_source(SourceConfig(type="webdataset", path=str(tmp_path))).take_all()
    rows = {(r["source_uri"].removeprefix(str(tmp_path) + "/"), r["source_error"] is None): r for r in read}

    assert len(read) == len(rows) and sorted(rows) == [
        ("a.tar#astronaut", True), ("b.tar", False), ("b.tar#coffee", True), ("c.tar", False),
        ("d.tar#rocket", True), ("d.tar#rocket.txt", False), ("d.tar#x", True)]
    assert rows["a.tar#astronaut", True]["caption"] == "an astronaut"
    assert rows["b.tar#coffee", True]["source_bytes"] == photos["coffee.jpg"]
    assert rows["b.tar", False]["source_error"] == "not a readable tar shard: unexpected end of data; samples read before it: 1"
    assert rows["c.tar", False]["source_error"].startswith("not a readable tar shard: ")
    assert rows["d.tar#rocket.txt", False]["source_error"] == (  # named by its member: one row per URI
        "the members of 'rocket' are not adjacent in the shard (WebDataset keeps a sample's files together)")
    assert rows["d.tar#rocket", True]["caption"] is None  # the caption that came back is not the sample's

    # image.max_bytes: a member over it is not read, and its sample is an error row; the others are read
    rocket, coffee = len(photos["rocket.jpg"]), len(photos["coffee.jpg"])
    limit = (rocket + coffee) // 2  # between the two
    read = read_source(SourceConfig(type="webdataset", path=str(tmp_path / "d.tar")), max_bytes=limit).take_all()
    rows = {r["source_uri"].removeprefix(str(tmp_path) + "/"): r for r in read}
    big, small = ("d.tar#rocket", "d.tar#x") if rocket > coffee else ("d.tar#x", "d.tar#rocket")
    assert rows[big]["source_bytes"] is None and rows[big]["source_error"] == (
        f"its .jpg member is {max(rocket, coffee)} bytes, over image.max_bytes={limit} (not read)")
    assert rows[small]["source_bytes"] is not None and rows[small]["source_error"] is None


def test_hugging_face_datasets_parquet_export(ray_session, photos, tmp_path):
    """The Image feature is a {bytes, path} struct: embedded bytes, or a path to the file; a null cell is an
    error row saying so (not a file that was looked for and not found). Each table row is one input, named by
    its row number: a row repeating another's bytes, or its path, is a duplicate naming the first."""
    import datasets

    coffee = tmp_path / "coffee.jpg"
    coffee.write_bytes(photos["coffee.jpg"])
    images = [{"bytes": photos["astronaut.jpg"], "path": "astronaut.jpg"},
              {"bytes": photos["chelsea.png"], "path": "chelsea.png"},
              {"bytes": None, "path": str(coffee)},
              {"bytes": b"not an image", "path": "broken.jpg"},
              None,
              {"bytes": photos["astronaut.jpg"], "path": None},
              {"bytes": None, "path": str(coffee)}]
    text = ["an astronaut", "a cat", "a cup", "nothing", "null", "the astronaut again", "the cup again"]
    ds = datasets.Dataset.from_dict({"image": images, "text": text})
    export = tmp_path / "train-00000-of-00001.parquet"
    ds.cast_column("image", datasets.Image()).to_parquet(str(export))
    assert json.loads(pq.read_schema(export).metadata[b"huggingface"])["info"]["features"]["image"]["_type"] == "Image"

    data = canny_job(str(export), str(tmp_path / "out"))  # captions become prompts: test_job
    data["source"] = {"type": "parquet", "path": str(export), "caption_column": "text"}
    result = run(load_config(data=data), echo=lambda _: None)

    assert (result.inputs, result.samples, result.errors) == (7, 3, 4)
    samples = {r["source_uri"]: r for r in read_parquet_dir(tmp_path / "out" / "samples").to_pylist()}
    assert {uri: r["caption"] for uri, r in samples.items()} == {
        f"{export}#row=0/astronaut.jpg": "an astronaut",
        f"{export}#row=1/chelsea.png": "a cat",
        f"{export}#row=2/{coffee}": "a cup",
    }
    assert samples[f"{export}#row=1/chelsea.png"]["source_sha256"] == hashlib.sha256(photos["chelsea.png"]).hexdigest()
    errors = {r["source_uri"].removeprefix(f"{export}#"): r for r in read_parquet_dir(tmp_path / "out" / "errors").to_pylist()}
    assert sorted(errors) == ["row=3/broken.jpg", "row=4", "row=5", f"row=6/{coffee}"]
    assert errors["row=3/broken.jpg"]["stage"] == "decode"
    assert errors["row=4"]["stage"] == "decode" and "its image cell holds no image (null)" in errors["row=4"]["error_message"]
    assert errors["row=5"]["error_message"] == f"same content as {export}#row=0/astronaut.jpg"
    assert errors[f"row=6/{coffee}"]["error_message"] == f"same content as {export}#row=2/{coffee}"


def test_parquet_columns_are_checked_in_every_file_before_any_work(photos, tmp_path):
    import pyarrow as pa

    from pipeline.job import prepare

    pq.write_table(pa.table({"image": [photos["coffee.jpg"]], "text": ["a cup"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"image": [photos["rocket.jpg"]]}), tmp_path / "b.parquet")

    def refused(**source) -> str:
        data = canny_job(str(tmp_path), str(tmp_path / "out"))
        data["source"] = {"type": "parquet", "path": str(tmp_path / "*.parquet"), **source}
        with pytest.raises(SourceError) as e:
            prepare(load_config(data=data), dry_run=True)
        assert not (tmp_path / "out").exists()
        return str(e.value)

    assert "a.parquet has no column for source.image_column 'img'; its columns: ['image', 'text']" in \
        refused(image_column="img")
    assert "b.parquet has no column for source.caption_column 'text'" in refused(caption_column="text")
    (tmp_path / "b.parquet").unlink()  # a caption column of lists (as some datasets have) is not one string
    pq.write_table(pa.table({"image": [photos["rocket.jpg"]], "text": [["a", "rocket"]]}), tmp_path / "b.parquet")
    assert "b.parquet: source.caption_column 'text' holds list<element: string>, not text (one string per image)" in \
        refused(caption_column="text")
    (tmp_path / "b.parquet").unlink()  # an image column of numbers is no images
    pq.write_table(pa.table({"image": [1]}), tmp_path / "b.parquet")
    assert ("b.parquet: source.image_column 'image' holds int64, not images (encoded bytes, a path, or a struct of "
            "bytes and path)") in refused()
    (tmp_path / "b.parquet").unlink()
    pq.write_table(pa.table({"image": [photos["rocket.jpg"]]}), tmp_path / "b.parquet")
    (tmp_path / "b.parquet").rename(tmp_path / "caf\udce9.parquet")  # a name that is not UTF-8
    assert r"caf\xe9.parquet: a parquet file is read through pyarrow, which needs file names in UTF-8" in refused()
    (tmp_path / "caf\udce9.parquet").unlink()
    (tmp_path / "c.parquet").write_bytes(b"PAR1 not really")
    assert "c.parquet is not a readable Parquet file" in refused()


def test_plan_counts_parquet_rows_and_says_what_the_limit_reads(photos, tmp_path, capsys):
    import pyarrow as pa
    import yaml

    from pipeline.cli import main

    pq.write_table(pa.table({"image": [photos["coffee.jpg"]] * 3}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"image": [photos["rocket.jpg"]] * 2}), tmp_path / "b.parquet")
    write_tar(tmp_path / "s.tar", [("rocket.jpg", photos["rocket.jpg"])])
    data = canny_job(str(tmp_path), str(tmp_path / "out"))
    for source, lines in (
            ({"type": "parquet", "path": str(tmp_path / "*.parquet"), "limit": 4},
             ["2 Parquet files (5 rows), 4 read (source.limit)", "to do: 4 inputs -> 4 rows (1 per input)"]),
            ({"type": "webdataset", "path": str(tmp_path / "s.tar"), "limit": 3},  # its samples: counted by reading
             ["to do: every sample in the 1 tar shards, at most 3 in all (source.limit) (1 per sample)"])):
        (tmp_path / "job.yaml").write_text(yaml.safe_dump({**data, "source": source}))
        assert main(["plan", str(tmp_path / "job.yaml")]) == 0
        out = capsys.readouterr().out
        assert all(line in out for line in lines), out
