"""Object storage: sources and output on s3://, against a real S3-compatible server on 127.0.0.1.

Credentials travel in `storage_options` (config) so they reach Ray workers; the AWS_* environment
variables are checked for the driver-side listing and for a worker started with them.
"""

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from pipeline.config import SourceConfig, load_config
from pipeline.job import OutputExists, run
from pipeline.io.sources import SourceError, list_files, read_bytes, read_source
from tests.helpers import job_dict, read_parquet_dir, write_photos
from tests.s3_server import s3  # noqa: F401 - the fixture


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in write_photos(tmp_path_factory.mktemp("s3-photos"))}


@pytest.fixture(scope="module")
def s3_run(ray_session, tiny_models, s3, photos):
    """A whole job: photos plus a truncated JPEG from s3://…/photos/, output to s3://…/runs/one/."""
    fs = s3.fs()
    for name, data in photos.items():
        fs.pipe(f"{s3.bucket}/photos/{name}", data)
    fs.pipe(f"{s3.bucket}/photos/truncated.jpg", photos["chelsea.jpg"][:1000])
    data = job_dict(s3.url("photos"), s3.url("runs", "one"), tiny_models, variants_per_image=1)
    data["source"]["storage_options"] = s3.storage_options
    data["output"]["storage_options"] = s3.storage_options
    cfg = load_config(data=data)
    return cfg, run(cfg)


def output_objects(s3) -> dict[str, bytes]:
    """Every object the run wrote, by its path under the output prefix."""
    fs, root = s3.fs(), f"{s3.bucket}/runs/one"
    return {path[len(root) + 1 :]: fs.cat_file(path) for path in fs.find(root)}


def test_job_reads_from_and_writes_to_s3(s3, photos, s3_run):
    _, result = s3_run
    assert (result.inputs, result.samples, result.errors) == (6, 5, 1)
    objects = output_objects(s3)
    samples = read_parquet_dir(f"{s3.bucket}/runs/one/samples", fs=s3.fs()).to_pylist()
    assert sorted(r["source_uri"] for r in samples) == sorted(s3.url("photos", name) for name in photos)
    for r in samples:
        assert r["source_sha256"] == hashlib.sha256(photos[r["source_uri"].rsplit("/", 1)[1]]).hexdigest()
    (error,) = read_parquet_dir(f"{s3.bucket}/runs/one/errors", fs=s3.fs()).to_pylist()
    assert error["source_uri"] == s3.url("photos", "truncated.jpg")
    assert error["stage"] == "decode" and "not a decodable image" in error["error_message"]

    manifest = json.loads(objects["manifest.json"])
    assert manifest["counts"]["inputs"] == 6 and manifest["counts"]["samples"] == 5
    assert manifest["files"] and sorted(manifest["files"]) == sorted(n for n in objects if n.endswith(".parquet"))
    assert {f.split("/")[0] for f in manifest["files"]} == {"samples", "errors"}
    assert b"Operator" in objects["stats.txt"]
    assert not [n for n in objects if ".tmp-" in n]  # temporary names were all renamed away


def test_same_job_resumes_and_another_job_is_refused_on_s3(s3, s3_run):
    cfg, _ = s3_run
    before = {n: d for n, d in output_objects(s3).items() if n.endswith(".parquet")}
    again = run(cfg)  # the same job into the same prefix on the same inputs: complete, nothing to do
    assert again.run_id == json.loads(output_objects(s3)["manifest.json"])["run_id"]
    assert (again.inputs, again.samples, again.errors) == (6, 5, 1)
    assert {n: d for n, d in output_objects(s3).items() if n.endswith(".parquet")} == before
    data = cfg.model_dump()
    data["generation"]["steps"] = 4
    with pytest.raises(OutputExists, match=r"different job \(changed: generation.steps\)"):
        run(load_config(data=data))


def test_secret_key_is_in_no_output_object(s3, s3_run):
    objects = output_objects(s3)
    assert {"manifest.json", "stats.txt"} <= set(objects) and len(objects) >= 4
    secret = s3.secret
    for name, data in objects.items():
        assert secret.encode() not in data, name
        if name.endswith(".parquet"):  # compressed: look at the values and metadata too
            table = pq.read_table(io.BytesIO(data))
            assert secret not in repr(table.to_pylist()) and secret not in repr(table.schema.metadata), name
    manifest = json.loads(objects["manifest.json"])
    for section in ("source", "output"):
        options = manifest["config"][section]["storage_options"]
        assert options == {"endpoint_url": s3.endpoint_url, "key": "<redacted>", "secret": "<redacted>"}


def test_secret_key_is_in_no_log(s3, s3_run, capsys):
    """Ray's session logs (driver, workers, Ray Data) and this process's output never carry it."""
    from ray._private.worker import global_worker

    logs = Path(global_worker.node.get_logs_dir_path())
    files = [p for p in logs.rglob("*") if p.is_file()]
    assert any("ray-data" in p.name for p in files) and any(p.name.startswith("worker-") for p in files)
    for p in files:
        assert s3.secret.encode() not in p.read_bytes(), p
    captured = capsys.readouterr()
    assert s3.secret not in captured.out + captured.err


def test_parquet_source_on_s3(ray_session, s3, photos):
    fs = s3.fs()
    fs.pipe(f"{s3.bucket}/parquet/coffee.jpg", photos["coffee.jpg"])
    # Hugging Face Image structs: embedded bytes, or only a path (relative to the Parquet file)
    images = [{"bytes": photos["rocket.jpg"], "path": None}, {"bytes": None, "path": "coffee.jpg"}]
    sink = io.BytesIO()
    pq.write_table(pa.table({"jpg": images, "text": ["a rocket", "a coffee"]}), sink)
    fs.pipe(f"{s3.bucket}/parquet/shard-0.parquet", sink.getvalue())
    cfg = SourceConfig(type="parquet", path=s3.url("parquet"), image_column="jpg", caption_column="text",
                       storage_options=s3.storage_options)
    rows = {r["caption"]: r for r in read_source(cfg).take_all()}
    assert set(rows) == {"a rocket", "a coffee"}
    assert rows["a rocket"]["source_uri"] == s3.url("parquet", "shard-0.parquet") + "#row=0"
    assert rows["a rocket"]["source_bytes"] == photos["rocket.jpg"]
    # a path is resolved to an s3:// URI; the decode stage fetches it with the source's storage_options
    assert rows["a coffee"]["source_uri"] == s3.url("parquet", "shard-0.parquet") + "#row=1/coffee.jpg"
    assert (rows["a coffee"]["source_bytes"], rows["a coffee"]["source_path"]) == (None, s3.url("parquet", "coffee.jpg"))
    assert read_bytes(rows["a coffee"]["source_path"], s3.storage_options) == photos["coffee.jpg"]


def test_webdataset_source_on_s3(ray_session, s3, photos):
    sink = io.BytesIO()
    with tarfile.open(fileobj=sink, mode="w") as tar:
        for key, member, data in [("astronaut", "jpg", photos["astronaut.jpg"]),
                                  ("astronaut", "json", json.dumps({"caption": "a person in space"}).encode()),
                                  ("camera", "jpg", photos["camera.jpg"])]:
            info = tarfile.TarInfo(f"{key}.{member}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    s3.fs().pipe(f"{s3.bucket}/shards/shard-000.tar", sink.getvalue())
    cfg = SourceConfig(type="webdataset", path=s3.url("shards", "*.tar"), storage_options=s3.storage_options)
    rows = {r["source_uri"]: r for r in read_source(cfg).take_all()}
    shard = s3.url("shards", "shard-000.tar")
    assert set(rows) == {f"{shard}#astronaut", f"{shard}#camera"}
    assert rows[f"{shard}#astronaut"]["caption"] == "a person in space"
    assert rows[f"{shard}#astronaut"]["source_bytes"] == photos["astronaut.jpg"]
    assert rows[f"{shard}#camera"]["caption"] is None


@pytest.mark.parametrize("path", ["{bucket}/no-such-prefix", "s3://no-such-bucket/photos"])
def test_missing_s3_path_is_a_source_error_naming_it(s3, path):
    path = path.format(bucket=s3.url())
    with pytest.raises(SourceError, match=f"source.path '{path}' does not exist"):
        list_files(SourceConfig(path=path, storage_options=s3.storage_options), ["jpg"])


def test_credentials_and_endpoint_from_aws_environment(ray_session, s3, photos, monkeypatch):
    import s3fs

    fs = s3.fs()
    fs.pipe(f"{s3.bucket}/env/rocket.jpg", photos["rocket.jpg"])
    env = {"AWS_ACCESS_KEY_ID": s3.key, "AWS_SECRET_ACCESS_KEY": s3.secret, "AWS_ENDPOINT_URL": s3.endpoint_url}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()  # no filesystem made before the variables were set
    try:
        uri = s3.url("env", "rocket.jpg")
        assert list_files(SourceConfig(path=s3.url("env")), ["jpg"]) == [uri]
        assert read_bytes(uri, {}) == photos["rocket.jpg"]
        # workers see the variables only if they are in their environment (set before `ray start`,
        # or through a runtime_env as here); then the decode stage's fetch works with no options
        fetch = ray.remote(read_bytes).options(runtime_env={"env_vars": env})
        assert ray.get(fetch.remote(uri, {})) == photos["rocket.jpg"]
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
