"""`ray job submit` for real: a local Ray head on 127.0.0.1, a job through the Jobs API (the `ray job`
CLI is its client), its output checked."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.helpers import ROOT, cli_command, cli_env, free_port, job_dict, kill_tree

RAY = str(Path(sys.executable).parent / "ray")


def ray_cli(*args, timeout=120) -> subprocess.CompletedProcess:
    # Ray starts local clusters with token authentication (the token is in ~/.ray/auth_token);
    # clients present it when RAY_AUTH_MODE=token, as `ray job submit` users do.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([RAY, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def ray_head():
    """A separate Ray head with its dashboard (the Jobs API) on 127.0.0.1. `--block` ties the head's
    processes to this one, so stopping it stops only this cluster (`ray stop` would stop every one). It records
    its address in its own temp dir (`RAY_TMPDIR` of a process that reads it), not in this machine's /tmp/ray."""
    port, dashboard = free_port(), free_port()
    # fixed default agent ports would collide with the test session's own Ray instance
    agent_ports = [f"--{flag}={free_port()}" for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                          "metrics-export-port", "runtime-env-agent-port")]
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths have a length limit
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--temp-dir={temp}/ray", "--disable-usage-stats", *agent_ports],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "RAY_AUTH_MODE": "token"})
    address = f"http://127.0.0.1:{dashboard}"
    try:
        while ray_cli("job", "list", "--address", address).returncode != 0:  # until the Jobs API answers
            assert head.poll() is None, "ray start --head exited"
            time.sleep(2)
        yield address, head, port, temp
    finally:
        # killed outright, with every process it started: `ray start --block` on SIGTERM stops them one by one
        # with grace periods (~30 s on a 2-core machine) and the cluster holds nothing worth keeping
        assert not kill_tree(head), "a process outlived its kill"
        shutil.rmtree(temp, ignore_errors=True)


def test_job_submitted_with_ray_job_submit_succeeds(ray_head, tiny_models, photos_dir, tmp_path):
    out = tmp_path / "out"
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(job_dict(str(photos_dir), str(out), tiny_models, variants_per_image=1)))
    runtime_env = {"env_vars": {"HF_HUB_OFFLINE": "1"}, "excludes": [".venv", "models", "out", ".git"]}
    ray_head, head, _, _ = ray_head
    attempt = 0
    while True:  # the head's job agent starts a little after its HTTP server: until it takes the job
        assert head.poll() is None, "ray start --head exited"
        attempt += 1
        submit = ray_cli("job", "submit", "--address", ray_head, "--submission-id", f"controlnet-test-{attempt}",
                         "--working-dir", ".", "--runtime-env-json", json.dumps(runtime_env),
                         "--", sys.executable, "-m", "jobs.run", str(config), "--set", "generation.steps=2",
                         timeout=480)
        if "No available agent" not in submit.stderr:
            break
        time.sleep(2)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "5 samples, 0 errors from 5 inputs" in submit.stdout
    status = ray_cli("job", "status", "--address", ray_head, f"controlnet-test-{attempt}")
    assert "succeeded" in (status.stdout + status.stderr).lower()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["samples"] == 5 and manifest["config"]["generation"]["steps"] == 2
    assert sum(pq.read_metadata(f).num_rows for f in (out / "samples").glob("*.parquet")) == 5


def test_a_run_joins_this_machines_head_by_its_address(ray_head, tiny_models, photos_dir, tmp_path):
    """Ray starts a head with token authentication where a token exists (~/.ray/auth_token), and presents the token
    to the cluster it recorded on this machine, but to an address given explicitly only with RAY_AUTH_MODE=token:
    `run --address 127.0.0.1:PORT` to this machine's own head joins it as a run given no address does."""
    _, head, port, temp = ray_head
    out = tmp_path / "out"
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(job_dict(str(photos_dir), str(out), tiny_models, variants_per_image=1)))
    env = {k: v for k, v in cli_env({"RAY_TMPDIR": temp}).items() if k != "RAY_AUTH_MODE"}
    run = subprocess.run(cli_command("run", config, "--address", f"127.0.0.1:{port}", "--set", "generation.steps=2"),
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=480, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "5 samples, 0 errors from 5 inputs" in run.stdout and head.poll() is None
