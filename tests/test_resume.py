"""Resume and faults on local Ray: a killed driver, a killed actor, a changed config, partial output.

The invariant checked everywhere: every input ends up exactly once, either as its samples in
`samples/` or as an error row in `errors/`; no sample_id twice, none missing.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from pipeline.config import load_config
from pipeline.job import OutputExists, run
from pipeline.ids import sample_identity
from tests.helpers import PHOTOS, ROOT, cli, cli_command, cli_env, job_dict, kill_tree, photo, read_parquet_dir

VARIANTS = 2


def make_inputs(directory: Path, per_photo: int) -> tuple[Path, set[str], set[str]]:
    """Distinct crops of the real photographs plus two bad files; returns (dir, good names, bad names)."""
    directory.mkdir(parents=True, exist_ok=True)
    good = set()
    for name in PHOTOS:
        pixels = photo(name)
        for k in range(per_photo):
            crop = pixels[8 * k : 8 * k + 200, 12 * k : 12 * k + 240]
            Image.fromarray(crop).save(directory / f"{name} crop {k}.jpg")  # spaces in names on purpose
            good.add(f"{name} crop {k}.jpg")
    (directory / "truncated.jpg").write_bytes((directory / f"{PHOTOS[0]} crop 0.jpg").read_bytes()[:500])
    (directory / "text.jpg").write_text("this is not a picture")
    return directory, good, {"truncated.jpg", "text.jpg"}


def expected_ids(directory: Path, names: set[str], seed: int = 7) -> set[str]:
    return {sample_identity(seed, hashlib.sha256((directory / n).read_bytes()).hexdigest(), v)[0]
            for n in names for v in range(VARIANTS)}


def check_exactly_once(out: Path, directory: Path, good: set[str], bad: set[str]) -> dict:
    """Every input exactly once; returns the manifest."""
    samples = read_parquet_dir(out / "samples", columns=["sample_id", "source_uri"]).to_pylist()
    ids = [r["sample_id"] for r in samples]
    assert len(ids) == len(set(ids)), "a sample_id appears twice"
    assert set(ids) == expected_ids(directory, good), "samples missing or unexpected"
    errors = read_parquet_dir(out / "errors", columns=["sample_id", "source_uri"]).to_pylist()
    assert sorted(Path(e["source_uri"]).name for e in errors) == sorted(bad)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["completed"] is True
    assert manifest["counts"]["inputs"] == len(good) + len(bad)
    assert manifest["counts"]["samples"] == len(good) * VARIANTS
    assert manifest["counts"]["duplicate_sample_ids"] == 0
    assert sorted(manifest["files"]) == sorted(str(p.relative_to(out)) for p in out.glob("*/*.parquet"))
    assert not list(out.rglob(".tmp-*"))
    return manifest


def parquet_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in out.glob("*/*.parquet")}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("small"), per_photo=1)


def config(directory: Path, out: Path, tiny, **generation):
    return load_config(data=job_dict(str(directory), str(out), tiny, **generation))


def one_file_per_row(directory: Path, out: Path, tiny):
    """The `finished` job: one image per generator call, one row per Parquet file (many files to lose)."""
    cfg = config(directory, out, tiny, batch_size=1)
    return cfg.model_copy(update={"output": cfg.output.model_copy(update={"rows_per_file": 1})})


@pytest.fixture(scope="module")
def finished(ray_session, tiny_models, small, tmp_path_factory):
    """One finished run of the `small` job; each test works on a copy of its output (the output path is not part
    of a job, so a copy is the same job's finished output)."""
    out = tmp_path_factory.mktemp("finished") / "out"
    return out, run(one_file_per_row(small[0], out, tiny_models))


def copy_of(finished, tmp_path: Path) -> Path:
    shutil.copytree(finished[0], tmp_path / "out")
    return tmp_path / "out"


def test_rerun_of_a_finished_job_redoes_nothing(tiny_models, small, finished, tmp_path):
    directory, good, bad = small
    out = copy_of(finished, tmp_path)
    cfg, first = one_file_per_row(directory, out, tiny_models), finished[1]
    before = parquet_bytes(out)
    manifest_before = (out / "manifest.json").read_bytes()
    again = run(cfg)
    assert again.run_id == first.run_id and again.samples == first.samples  # the finished run, reported as it is
    assert parquet_bytes(out) == before  # nothing rewritten, nothing added
    assert (out / "manifest.json").read_bytes() == manifest_before
    manifest = check_exactly_once(out, directory, good, bad)
    assert [r["run_id"] for r in manifest["runs"]] == [first.run_id]


def test_interrupted_output_is_completed_without_redoing_work(tiny_models, small, finished, tmp_path):
    """A crash leaves some files written, a temporary file and a manifest saying completed: false."""
    directory, good, bad = small
    out = copy_of(finished, tmp_path)
    cfg = one_file_per_row(directory, out, tiny_models)
    files = sorted(out.glob("samples/*.parquet"))
    lost = files[::3]  # as if these writes never happened
    lost_ids = {pq.read_table(f)["sample_id"][0].as_py() for f in lost}
    kept = {str(p.relative_to(out)): p.read_bytes() for p in files if p not in lost}
    for f in lost:
        f.unlink()
    (out / "samples" / ".tmp-0123").write_bytes(b"PAR1 half a file")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["completed"] = False
    (out / "manifest.json").write_text(json.dumps(manifest))

    result = run(cfg)
    assert result.manifest["this_run"] == {"samples": len(lost), "errors": 0}  # only the lost ones were redone
    assert set(read_parquet_dir(out / "samples", columns=["sample_id"])["sample_id"].to_pylist()) >= lost_ids
    assert all((out / name).read_bytes() == data for name, data in kept.items())  # finished work untouched
    check_exactly_once(out, directory, good, bad)


def test_a_different_job_is_refused_naming_what_changed(tiny_models, small, finished, tmp_path):
    directory, good, bad = small
    out = copy_of(finished, tmp_path)
    first = finished[1]
    before = parquet_bytes(out)
    changed = config(directory, out, tiny_models, steps=4, guidance_scale=5.0)
    with pytest.raises(OutputExists, match=r"changed: generation.guidance_scale, generation.steps\).*overwrite"):
        run(changed)
    assert parquet_bytes(out) == before

    # execution settings are not part of the job: more actors or another batch size resume it
    faster = config(directory, out, tiny_models, batch_size=5, actors=2)
    assert run(faster).run_id == first.run_id and parquet_bytes(out) == before  # the same job, complete

    data = job_dict(str(directory), str(out), tiny_models, steps=4, guidance_scale=5.0)
    data["output"]["new_version"] = True
    v2 = run(load_config(data=data))
    assert v2.output == f"{out}-v2" and v2.samples == len(good) * VARIANTS
    assert parquet_bytes(out) == before  # the first version is untouched
    assert run(load_config(data=data)).output == f"{out}-v2"  # the same new job resumes its version

    data["output"] = {"path": str(out), "overwrite": True}
    replaced = run(load_config(data=data))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["generation"]["steps"] == 4 and len(manifest["runs"]) == 1
    assert replaced.samples == len(good) * VARIANTS
    steps = read_parquet_dir(out / "samples", columns=["num_inference_steps"])["num_inference_steps"]
    assert set(steps.to_pylist()) == {4}


def test_resume_after_the_driver_is_killed(ray_address, tiny_models, tmp_path):
    """`python -m pipeline run` killed with SIGKILL part-way, then the same job again (joining a running Ray)."""
    directory, good, bad = make_inputs(tmp_path / "inputs", per_photo=2)
    out = tmp_path / "out"
    data = job_dict(str(directory), str(out), tiny_models, batch_size=1, steps=4)
    data["output"]["rows_per_file"] = 1
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(data))
    # its own local Ray instance (the test session has one running, which a plain ray.init() would join)
    args = ("run", tmp_path / "job.yaml", "--address", "local")
    no_address = {"RAY_ADDRESS": ""}

    driver = subprocess.Popen(cli_command(*args), cwd=ROOT, env=cli_env(no_address), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    while len(list(out.glob("samples/*.parquet"))) < 1 and driver.poll() is None:  # events, not a deadline
        time.sleep(0.05)
    kill_tree(driver, timeout=30)  # the local Ray instance the driver started goes down with it

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["completed"] is False, "the job finished before it was killed: make it longer"
    written = {str(p.relative_to(out)): p.read_bytes() for p in out.glob("*/*.parquet")}
    written_ids = set(read_parquet_dir(out / "samples", columns=["sample_id"])["sample_id"].to_pylist())
    assert 0 < len(written_ids) < len(good) * VARIANTS

    # the same job on the test session's Ray: a resume does not depend on the instance (one fewer Ray start)
    again = cli("run", tmp_path / "job.yaml", "--address", ray_address, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming" in again.stdout
    assert f"added {len(good) * VARIANTS - len(written_ids)} samples ({len(good) * VARIANTS} in all)" in again.stdout
    manifest = check_exactly_once(out, directory, good, bad)
    assert manifest["this_run"]["samples"] == len(good) * VARIANTS - len(written_ids)
    assert all((out / name).read_bytes() == data for name, data in written.items())
    assert len(manifest["runs"]) == 2


def generate_actor_pids() -> set[int]:
    """The generator actors of this test session's Ray (its processes descend from this one), not those of another
    Ray instance on the machine (a developer's running job, another test run)."""
    pids = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if "MapBatches(generate)" in " ".join(p.cmdline()):
                pids.add(p.pid)
        except psutil.NoSuchProcess:
            pass
    return pids


def test_an_actor_killed_mid_batch_is_replaced_and_its_batch_redone(ray_session, tiny_models, tmp_path):
    directory, good, bad = make_inputs(tmp_path / "inputs", per_photo=2)
    out = tmp_path / "out"
    cfg = config(directory, out, tiny_models, batch_size=2, steps=12)
    cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"rows_per_file": 1})})
    killed: list[int] = []
    written_at_kill: list[int] = []

    finished = threading.Event()

    def kill_one_generator():
        while not killed and not finished.is_set():  # until a generator is killed, or the run has ended
            if files := list(out.glob("samples/*.parquet")):  # the actor has finished a batch and is on the next
                for pid in generate_actor_pids():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                written_at_kill.append(sum(pq.read_metadata(f).num_rows for f in files))
            time.sleep(0.02)

    killer = threading.Thread(target=kill_one_generator)
    killer.start()
    try:
        result = run(cfg)
    finally:
        finished.set()
        killer.join()
    assert killed, "no generator actor was found to kill"
    assert written_at_kill[0] < len(good) * VARIANTS, "the generator had finished before it was killed"
    _, alive = psutil.wait_procs([psutil.Process(p) for p in killed if psutil.pid_exists(p)], timeout=120)  # zombies stay
    assert all(p.status() == psutil.STATUS_ZOMBIE for p in alive)
    assert result.errors == len(bad)  # the killed batch was redone, not turned into errors
    check_exactly_once(out, directory, good, bad)


@pytest.mark.parametrize("text", ["{\"run_id\": ", "[]"])
def test_a_damaged_manifest_is_one_line_naming_it_for_a_run_and_for_inspect(tmp_path, text, capsys):
    from pipeline.cli import main
    from pipeline.io.resume import open_output
    from tests.helpers import canny_job

    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(text)
    cfg = load_config(data=canny_job(str(tmp_path / "photos"), str(out)))
    with pytest.raises(OutputExists, match=r"manifest\.json is damaged .*choose another path or set output\.overwrite"):
        open_output(cfg, {}, dry_run=True)
    assert main(["inspect", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{out / 'manifest.json'} is damaged" in err[0]
    assert (out / "manifest.json").read_text() == text  # nothing replaced without output.overwrite


def test_an_output_path_under_a_file_is_refused_naming_the_file(tmp_path):
    from pipeline.job import prepare
    from tests.helpers import canny_job

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (8, 8)).save(photos / "a.png")
    (tmp_path / "notes.yaml").write_text("a file")
    for path in (tmp_path / "notes.yaml", tmp_path / "notes.yaml" / "sub" / "out"):
        with pytest.raises(OutputExists, match=f"{tmp_path / 'notes.yaml'} is a file, not a directory"):
            prepare(load_config(data=canny_job(str(photos), str(path))), dry_run=True)


def test_retry_errors_does_the_inputs_of_error_rows_again(ray_session, tiny_models, tmp_path, capsys):
    """An input that failed (here: a file still being copied when the run read it) is an error row, which a re-run
    skips; `--retry-errors` removes the error rows and does their inputs again: each input once, in the end."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(photo(PHOTOS[0])).save(inputs / "early.jpg")
    whole = Image.fromarray(photo(PHOTOS[1]))
    whole.save(tmp_path / "late.jpg")
    (inputs / "late.jpg").write_bytes((tmp_path / "late.jpg").read_bytes()[:300])  # cut short
    data = job_dict(str(inputs), str(tmp_path / "out"), tiny_models)
    data["annotators"] = [{"name": "canny"}]
    del data["generation"]
    cfg = load_config(data=data)
    first = run(cfg)
    assert (first.samples, first.errors) == (1, 1)
    said = []
    run(cfg, echo=said.append)
    assert said[0].endswith("nothing to do (1 error rows: --retry-errors does their inputs and samples again)")
    shutil.copy(tmp_path / "late.jpg", inputs / "late.jpg")  # its copy has finished
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(data))
    from pipeline.cli import main

    capsys.readouterr()
    assert main(["plan", str(tmp_path / "job.yaml"), "--retry-errors"]) == 0  # says it, changes nothing
    assert "to do: 1 inputs -> 1 rows" in capsys.readouterr().out and (tmp_path / "out" / "errors").is_dir()
    from pipeline.job import prepare

    prepare(cfg, retry_errors=True).lock.release()  # the rows removed, then stopped before Ray started
    again = run(cfg)  # not "complete": the input with no row is done
    assert (again.samples, again.errors) == (2, 0) and again.run_id != first.run_id
    samples = read_parquet_dir(tmp_path / "out" / "samples", columns=["source_uri"])["source_uri"].to_pylist()
    assert sorted(Path(u).name for u in samples) == ["early.jpg", "late.jpg"]
    assert not list((tmp_path / "out").glob("errors/*.parquet"))
