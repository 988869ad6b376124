"""The console: what `run` prints (checked by its lines), `plan`, `--set` values, fast failures, --version."""

import json
import os
import re
import subprocess
import sys

import pyarrow as pa
import pytest
import yaml

from pipeline.config import ConfigError, load_config
from tests.helpers import ROOT, cli, cli_command, cli_env, free_port, job_dict

DEMO = ROOT / "jobs" / "configs" / "demo.yaml"


@pytest.fixture(scope="module")
def job(tiny_models, photos_dir, tmp_path_factory):
    """A two-annotator generation job config file, written once."""
    tmp = tmp_path_factory.mktemp("console")
    path = tmp / "job.yaml"
    # compile asked for: on a CPU-only instance the run says it generates eagerly
    path.write_text(yaml.safe_dump(job_dict(str(photos_dir), str(tmp / "out"), tiny_models, variants_per_image=1,
                                            compile=True)))
    return path, tmp / "out"


@pytest.fixture(scope="module")
def first_run(job):
    path, _ = job
    return cli("run", path, "--address", "local", env={"RAY_ADDRESS": ""}, timeout=900)


def test_a_run_prints_a_summary_line_and_a_table_of_stages_not_rays_logs(first_run, photos_dir):
    assert first_run.returncode == 0, first_run.stderr[-3000:]
    out = first_run.stdout.splitlines()
    assert out[0].startswith("run ") and " -> " in out[0]
    assert out.pop(1) == "note: generation.compile applies on GPU workers; this run generates on CPU, eagerly"
    inputs = len(list(photos_dir.iterdir()))
    assert f": {inputs} samples, 0 errors from {inputs} inputs in " in out[1]
    assert out[2] == "stages (time measured in each stage; they overlap):"
    stages = [line.split()[0] for line in out[4:]]
    assert stages == ["decode", "dedupe", "annotate:canny", "annotate:hed", "expand", "generate"]
    for line in out[4:]:
        assert line.split()[2].endswith("%") and float(line.split()[-1]) > 0
    # no Ray progress blocks, operator stats or worker logs, nor the core worker's line on its log level. Off a
    # terminal our own progress line is printed every 30 s, which a slow machine reaches: not counted
    ours = re.compile(r"^\[[#.]{24}\] \d+/\d+ inputs( · ETA [\d:]+)? · \d+ samples, [\d.]+/s( · \d+ errors)?"
                      r" · elapsed [\d:]+$")
    others = [line for line in first_run.stderr.splitlines() if not ours.match(line)]
    assert others == [], first_run.stderr


def test_the_stage_figures_are_in_the_manifest_and_the_report(first_run, job, photos_dir):
    _, out = job
    manifest = json.loads((out / "manifest.json").read_text())
    stages = manifest["stages"]
    inputs = len(list(photos_dir.iterdir()))
    assert stages["decode"]["rows_in"] == stages["decode"]["rows_out"] == inputs
    assert stages["generate"]["rows_out"] == inputs and stages["generate"]["seconds"] > 0
    # variants are expanded in the generator's actors, a generator batch at a time: as many inputs as make one
    # call's samples (generation.batch_size 3, one variant each), not an input at a time ahead of it
    assert stages["expand"]["batches"] == stages["generate"]["batches"] >= -(-inputs // 3)
    assert stages["expand"]["rows_in"] == inputs
    text = cli("inspect", out).stdout
    assert "annotate:hed" in text and "generate" in text


def test_a_finished_job_says_so_without_starting_ray(first_run, job):
    path, out = job
    before = (out / "manifest.json").read_bytes()
    again = cli("run", path, env={"RAY_ADDRESS": "127.0.0.1:1"}, timeout=120)  # no Ray there: it must not try
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == [f"{out} is complete: run {json.loads(before)['run_id']} wrote this job on "
                                         f"these inputs; nothing to do"]
    assert (out / "manifest.json").read_bytes() == before


def test_plan_says_what_a_run_would_do_and_changes_nothing(first_run, job, photos_dir, tmp_path):
    path, out = job
    before = sorted(p.name for p in out.iterdir())
    plan = cli("plan", path, "--set", "generation.variants_per_image=3", "--set", f"output.path={tmp_path / 'new'}",
               "--seconds-per-image", "3600")
    assert plan.returncode == 0, plan.stderr
    assert f"output: {tmp_path / 'new'}: new" in plan.stdout and not (tmp_path / "new").exists()
    inputs = len(list(photos_dir.iterdir()))
    assert f"source: {photos_dir}: {inputs} image files" in plan.stdout
    assert f"to do: {inputs} inputs -> {3 * inputs} samples (3 per input)" in plan.stdout
    assert f"estimate: {3 * inputs:.2f} GPU-hours on 1 actor(s)" in plan.stdout
    assert "annotator canny: (no weights)" in plan.stdout
    assert "generation base_model: " in plan.stdout and "generation controlnet hed: " in plan.stdout
    assert sorted(p.name for p in out.iterdir()) == before
    same = cli("plan", path)
    assert f"output: {out}: complete: nothing to do" in same.stdout and "to do: 0 inputs" in same.stdout
    changed = cli("plan", path, "--set", "generation.steps=5")  # what a run would refuse, plan refuses alike
    assert changed.returncode == 2 and "changed: generation.steps" in changed.stderr


def test_a_closed_stdout_ends_a_command_quietly(job):
    """`plan CONFIG | head` where head has gone: the shell's code for a closed pipe, and no traceback."""
    from tests.helpers import cli_command, cli_env

    read, write = os.pipe()
    os.close(read)  # nobody reads: the command's first write fails
    try:
        done = subprocess.run(cli_command("plan", job[0]), cwd=ROOT, env=cli_env(), stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=300, check=False)
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (141, "")


def test_an_interrupt_outside_a_commands_handler_is_one_line():
    """A Ctrl-C in the second after a run finished lands in `ray.shutdown` (the command's `finally`), outside the
    command's own handler: one line and 130, not a traceback."""
    code = ("import pipeline.cli as cli\n"
            "def main():\n    raise KeyboardInterrupt\n"
            "cli.main = main\ncli.console()\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert (done.returncode, done.stderr) == (130, "interrupted\n")


def test_config_errors_come_before_ray_and_torch_are_imported():
    code = ("import sys; from pipeline.cli import main; "
            f"rc = main(['run', {str(DEMO)!r}, '--set', 'generation.stepz=3']); "
            "print(rc, 'torch' in sys.modules, 'ray' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.stdout.split() == ["2", "False", "False"], proc.stderr
    assert proc.stderr.strip() == "error: invalid config: generation.stepz: unknown key"


def test_stage_shares_count_compile_time_once():
    from pipeline.docs.stats import stage_rows

    stages = {"decode": {"rows_out": 8, "seconds": 1.0}, "generate": {"rows_out": 16, "seconds": 3.0},
              "generate:compile": {"rows_out": 0, "seconds": 2.0}}  # within generate's 3 s
    rows = {r["name"]: r for r in stage_rows({"stages": stages})}
    assert [rows[n]["share"] for n in stages] == ["25%", "75%", "50%"]
    assert rows["generate"]["rows_per_s"] == 16 / 3.0


def test_batches_that_overlap_in_one_actor_share_their_stage_seconds():
    """A generator actor takes two batches at once: the stage's seconds are the time it was busy, not twice
    the time the two batches overlapped."""
    import threading
    import time

    from pipeline.console import timed

    reported, inside = [], threading.Barrier(2)

    class Progress:  # stands in for the actor handle: records what the stage reports
        class stage:  # noqa: N801
            remote = staticmethod(lambda name, rows_in, rows_out, seconds: reported.append(seconds))

    def work(batch):
        inside.wait(timeout=60)  # both batches are in the stage at once
        time.sleep(0.2)
        return batch

    stage = timed("overlap", work, Progress)
    started = time.perf_counter()
    threads = [threading.Thread(target=stage, args=(pa.table({"x": [1]}),)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    busy = time.perf_counter() - started
    assert len(reported) == 2 and all(s > 0 for s in reported)
    assert 0.2 <= sum(reported) <= busy  # each batch alone took over 0.2 s: counted in full, the sum would exceed it


def test_a_command_stops_the_ray_it_started_however_it_ends():
    # stopped by the command, not by Ray's exit hook (which first sleeps half a second); every process of the
    # local instance has ended, and the autoscaler monitor (started with -v) before GCS was stopped (after, its
    # SIGTERM handler waits on GCS until Ray kills it a second later).
    # The start does not wait on Ray's once-a-second retries: Ray's own look for the new raylet (a C++ call that
    # looks again a second later) comes once the raylet has registered, and the raylet was started with socket
    # retries every 0.1 s (as many seconds in all as Ray's ten of 1 s). Without -v, Ray's API server, autoscaler
    # monitor and log monitor do not start (nothing shows what they report); with it, they do
    code = ("import ray; from ray._private.node import Node; from ray._private import services, state\n"
            "from pipeline.cluster import init_ray, stops_ray\n"
            "real, monitor_gone, started = Node._kill_process_impl, {}, []\n"
            "def kill(node, kind, **kw):\n"
            "    monitor_gone.setdefault(kind, procs['monitor'].poll() is not None); real(node, kind, **kw)\n"
            "real_get, registered = services.get_node, []\n"
            "def get_node(gcs, node_id):\n"
            "    table = state.GlobalState(); table._initialize_global_state(services._get_gcs_client_options(gcs))\n"
            "    registered.append(any(n['NodeID'] == node_id and n['Alive'] for n in table.node_table()))\n"
            "    return real_get(gcs, node_id)\n"
            "services.get_node = get_node\n"
            "def start(verbose):\n"
            "    global procs; init_ray(None, verbose)\n"
            "    procs = {t: i[0].process for t, i in ray._private.worker._global_node.all_processes.items()}\n"
            "    started.append(','.join(sorted(procs)))\n"
            "def ok(args):\n"
            "    global env; start(False)\n"
            "    env = open(f'/proc/{procs[\"raylet\"].pid}/environ', 'rb').read().decode().split('\\0')\n"
            "    return 0\n"
            "def fails(args):\n"
            "    start(True); Node._kill_process_impl = kill; raise RuntimeError('boom')\n"
            "print('OK', stops_ray(ok)(None), ray.is_initialized(),\n"
            "      all(p.poll() is not None for p in procs.values()))\n"
            "print('REGISTERED', registered == [True], services.get_node is get_node)\n"
            "print('ENV', *sorted(v for v in env if v.startswith('RAY_raylet_client_')))\n"
            "try: stops_ray(fails)(None)\n"
            "except RuntimeError as e: print('FAILS', e, ray.is_initialized(), monitor_gone['gcs_server'],\n"
            "                                  all(p.poll() is not None for p in procs.values()))\n"
            "print('STARTED', *started)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "RAY_ADDRESS": ""})
    lines = [line.split() for line in proc.stdout.splitlines()
             if line.startswith(("OK", "REGISTERED", "ENV", "FAILS", "STARTED"))]  # -v: Ray's own lines too
    assert lines == [["OK", "0", "False", "True"], ["REGISTERED", "True", "True"],
                     ["ENV", "RAY_raylet_client_connect_timeout_milliseconds=100",
                      "RAY_raylet_client_num_connect_attempts=100"],
                     ["FAILS", "boom", "False", "True", "True"],
                     ["STARTED", "gcs_server,raylet", "dashboard,gcs_server,log_monitor,monitor,raylet"]], \
        proc.stdout + proc.stderr


def test_an_interrupt_waits_for_ray_datas_scheduling_thread_before_ray_stops(ray_session, monkeypatch):
    """On an interrupt Ray Data asks its scheduling thread to stop and waits 2 s for it; on a loaded machine the
    thread outlasted that, called into Ray after `ray.shutdown`, and Ray ended the process with exit code 1 instead
    of 130. Here the thread lingers 3 s after its loop (what a slow last step does); `settle_ray_data`, which a
    command calls before it stops Ray, waits for it."""
    import threading
    import time

    import ray
    from ray.data._internal.execution.streaming_executor import StreamingExecutor

    from pipeline.cluster import settle_ray_data

    loop = StreamingExecutor.run
    monkeypatch.setattr(StreamingExecutor, "run", lambda self: (loop(self), time.sleep(3)))
    ds = ray.data.range(40, override_num_blocks=20).map_batches(lambda batch: (time.sleep(0.2), batch)[1])
    before = set(threading.enumerate())
    with pytest.raises(KeyboardInterrupt):
        for _ in ds.iter_batches(batch_size=1):
            raise KeyboardInterrupt  # a Ctrl-C while the dataset streams
    scheduling = [t for t in set(threading.enumerate()) - before if t.name.startswith("StreamingExecutor-")]
    assert scheduling and all(t.is_alive() for t in scheduling)  # Ray Data's own wait has returned
    settle_ray_data()
    assert not any(t.is_alive() for t in scheduling)


def test_run_imports_ray_data_and_starts_ray_with_the_collector_paused(job, tmp_path):
    # no full collection over what the driver imports (Ray Data, pyarrow, pandas) and what Ray's start makes;
    # the collector is on again for the run, with those objects frozen out of it (pipeline.cpus.loading)
    code = ("import gc, sys; from pipeline import cli\n"
            "full = []\n"
            "gc.callbacks.append(lambda phase, info: phase == 'start' and info['generation'] == 2 and full.append(1))\n"
            "real = cli.init_ray\n"
            "def init(*args):\n"
            "    real(*args); print(len(full), gc.isenabled(), 'pandas' in sys.modules); raise RuntimeError('stop')\n"
            "cli.init_ray = init\n"
            f"rc = cli.main(['run', {str(job[0])!r}, '--set', 'output.path={tmp_path / 'out'}', '-q'])\n"
            "print(rc, gc.isenabled(), gc.get_freeze_count() > 200_000)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "RAY_ADDRESS": "", "HF_HUB_OFFLINE": "1"})
    assert proc.stdout.split() == ["0", "False", "True", "1", "True", "True"], proc.stdout + proc.stderr


def test_a_ray_that_cannot_start_says_so_without_the_resume_advice(job, tmp_path):
    bad = cli("run", job[0], "--set", f"output.path={tmp_path / 'out'}", "--address", "not-an-address")
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: could not join Ray at not-an-address:") and "resume" not in bad.stderr


def test_an_address_where_nothing_listens_is_refused_at_once(job, tmp_path):
    """Ray's own attempts to reach it go on for minutes, printing C++ warnings."""
    address = f"127.0.0.1:{free_port()}"
    bad = cli("run", job[0], "--set", f"output.path={tmp_path / 'out'}", "--address", address)
    assert bad.returncode == 2
    assert bad.stderr == f"error: could not join Ray at {address}: ConnectionRefusedError: [Errno 111] Connection refused\n"


@pytest.mark.parametrize("verbose", [False, True])
def test_a_stopped_run_is_one_line_and_its_stack_trace_with_v(job, tmp_path, monkeypatch, capsys, verbose):
    import pipeline.job
    from pipeline import cli as commands
    from pipeline import cluster

    def execute(*args, **kwargs):
        raise RuntimeError("a stage broke")

    monkeypatch.setattr(commands, "init_ray", lambda *args: None)
    monkeypatch.setattr(cluster, "stop_ray", lambda: None)  # the session's Ray, if any, stays up
    monkeypatch.setattr(pipeline.job, "execute", execute)
    args = ["run", str(job[0]), "--set", f"output.path={tmp_path / 'out'}"] + (["-v"] if verbose else [])
    assert commands.main(args) == 1
    err = capsys.readouterr().err
    assert err.endswith("error: the run stopped: a stage broke; what was written is kept, and running "
                        "the same command again resumes it\n")
    assert ("Traceback (most recent call last)" in err) is verbose and ('raise RuntimeError("a stage broke")' in err) is verbose


@pytest.mark.parametrize(("address", "recorded", "message"), [
    ("127.0.0.1:99999", None, "could not join Ray at 127.0.0.1:99999: ValueError: Port out of range 0-65535"),
    ("ray://127.0.0.1:10001", None, ("could not join Ray at ray://127.0.0.1:10001: Ray Data's executor needs the "
                                     "driver's core worker, which a Ray Client (ray://) driver does not have")),
    ("auto", "127.0.0.1:{port}", "could not join Ray at auto: ConnectionRefusedError"),
    (None, "127.0.0.1:{port}", None),  # no address: the stopped cluster Ray recorded is passed over
    (None, "127.0.0.1:{silent}", None),  # a recorded server that says nothing (a loaded GCS?): Ray judges
])
def test_addresses_ray_would_retry_for_minutes_are_judged_first(monkeypatch, request, address, recorded, message):
    import socket

    from pipeline import cluster

    port = free_port()
    silent = socket.create_server(("127.0.0.1", 0))  # takes connections (the kernel's backlog), never answers
    request.addfinalizer(silent.close)
    monkeypatch.setattr(cluster, "SPEAKS_WITHIN", 0.2)
    template, recorded = recorded, recorded and recorded.format(port=port, silent=silent.getsockname()[1])
    started = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(cluster, "recorded_cluster", lambda: recorded)
    monkeypatch.setattr(cluster, "start_ray", lambda address, join, options, verbose: started.append((address, join)))
    if message is None:
        cluster.init_ray(address, verbose=True)
        assert started == [(None if "{silent}" in template else "local", False)]
    else:
        with pytest.raises(cluster.RayUnavailable) as e:
            cluster.init_ray(address, verbose=True)
        assert str(e.value).startswith(message) and "\n" not in str(e.value) and not started


@pytest.mark.parametrize(("env", "says"), [
    ({}, ("the cluster uses token authentication, and Ray presents a token to an address only with "
          "RAY_AUTH_MODE=token: set it, with the cluster's token in ~/.ray/auth_token or RAY_AUTH_TOKEN")),
    ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 32},
     ("the cluster refuses the token this machine presents (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
      "~/.ray/auth_token): it is not the cluster's; `ray get-auth-token` on the head prints that one")),
])
def test_a_cluster_that_refuses_the_drivers_token_is_told_at_once(job, ray_address, tmp_path, env, says):
    """The session's cluster uses token authentication. Ray presents a token to an address given explicitly only
    with RAY_AUTH_MODE=token, and retried for 20 s where it had none, or one that is not the cluster's."""
    path, _ = job
    environment = {k: v for k, v in cli_env().items() if k != "RAY_AUTH_MODE"} | env
    proc = subprocess.run(cli_command("run", path, "--address", ray_address, "--set", f"output.path={tmp_path / 'out'}"),
                          capture_output=True, text=True, env=environment, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [f"error: could not join Ray at {ray_address}: ConnectionError: {says}"]


def test_with_the_clusters_token_ray_joins(monkeypatch, ray_address):
    from pipeline import cluster

    joined = []
    monkeypatch.setattr(cluster, "recorded_cluster", lambda: None)
    monkeypatch.setattr(cluster, "start_ray", lambda address, join, options, verbose: joined.append(address))
    cluster.init_ray(ray_address, verbose=True)  # this process presents the session's token
    assert joined == [ray_address]


def test_a_grpc_server_without_rays_gcs_is_told_at_once(monkeypatch):
    """The Ray Client server's port (gRPC too, for `ray://` addresses) given as a cluster address."""
    from concurrent import futures

    import grpc

    from pipeline import cluster

    server = grpc.server(futures.ThreadPoolExecutor(1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.setattr(cluster, "start_ray", lambda *args: pytest.fail("Ray was started"))
    try:
        cluster.answers(f"127.0.0.1:{port}")  # it speaks first, as a gRPC server does
        with pytest.raises(cluster.RayUnavailable, match=r"ConnectionError: it is a gRPC server without Ray's GCS "
                                                         r"service: the Ray Client server's port"):
            cluster.init_ray(f"127.0.0.1:{port}", verbose=True)
    finally:
        server.stop(None)


def test_a_dashboard_port_is_told_from_rays_gcs(monkeypatch, ray_address):
    """The port `ray job submit` takes (the dashboard's, an HTTP server) given as a cluster address: one line at once,
    where Ray retried for minutes. The session's real GCS passes the same check."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from pipeline import cluster

    class Quiet(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(cluster, "start_ray", lambda *args: pytest.fail("Ray was started"))
    address = f"127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(cluster.RayUnavailable, match=rf"^could not join Ray at {address}: ConnectionError: it "
                                                         r"answers HTTP: a dashboard's port, the address `ray job "
                                                         r"submit` takes\? A driver joins the head's GCS port"):
            cluster.init_ray(address, verbose=True)
    finally:
        server.shutdown()
    cluster.answers(ray_address)


@pytest.mark.parametrize(("serve", "says"), [
    (None, r"it says nothing in 0.2 s, where Ray's GCS speaks at once"),  # listening, never answering
    (lambda conn: conn.close(), r"it closes the connection at once, where Ray's GCS speaks"),  # a dead tunnel
    (lambda conn: conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n"),
     r"it speaks another protocol \(it says 'SSH-2.0-OpenSSH_9.6' first\), not Ray's GCS"),
])
def test_a_server_that_is_not_a_gcs_is_told_at_once(serve, says):
    """Ray retries for minutes where a server takes the connection but is not its GCS (which speaks first)."""
    import socket
    import threading

    from pipeline import cluster

    server = socket.create_server(("127.0.0.1", 0))
    if serve is not None:
        accepted = []
        threading.Thread(target=lambda: accepted.append(server.accept()[0]) or serve(accepted[0]), daemon=True).start()
    try:
        with pytest.raises(ConnectionError, match=f"^{says}"):
            cluster.answers(f"127.0.0.1:{server.getsockname()[1]}", wait=0.2 if serve is None else 60)
    finally:
        server.close()


@pytest.mark.parametrize(("assignment", "key", "value"), [
    ("generation.prompt.template={prompt}, {caption}", "template", "{prompt}, {caption}"),  # not YAML: text
    ("generation.prompt.negative=yes", "negative", "yes"),  # YAML would make it true: the schema wants text
    ("generation.prompt.negative=a cat", "negative", "a cat"),
    ("generation.prompt.prompts=a dog", "prompts", ["a dog"]),  # one string for a list of strings
    ("generation.prompt.prompts=[a, b]", "prompts", ["a", "b"]),
    ("generation.prompt.prompts+=a cat", "prompts", ["a watercolor painting", "a photo at night", "a cat"]),
    ("generation.steps=8", "steps", 8),
])
def test_set_values_are_typed_by_the_schema(assignment, key, value):
    cfg = load_config(DEMO, [assignment])
    got = getattr(cfg.generation.prompt, key) if hasattr(cfg.generation.prompt, key) else getattr(cfg.generation, key)
    assert got == value


def test_set_append_needs_a_list():
    with pytest.raises(ConfigError, match="generation.steps is not a list"):
        load_config(DEMO, ["generation.steps+=3"])


def test_version_and_the_console_script_name_itself():
    from pipeline import __version__

    assert cli("--version").stdout.strip() == f"python -m pipeline {__version__}"
    script = ROOT / ".venv" / "bin" / "controlnet-pipeline"
    if not script.exists():  # installed elsewhere: the one on this interpreter's path
        script = __import__("pathlib").Path(sys.executable).parent / "controlnet-pipeline"
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: controlnet-pipeline ")


def test_the_progress_bar_counts_inputs_and_says_how_long_is_left():
    from pipeline.console import Bar

    bar = Bar(progress=None, total=10, variants=2)
    bar.started -= 50  # fifty seconds into the run
    line = bar.line({"samples": 8, "errors": 1, "rejected": 1})  # 1 input rejected, 4 done with 2 rows each
    assert line.startswith("[############............] 5/10 inputs · ETA 0:50 · 8 samples, 0.16/s · 1 errors")


def test_the_training_line_says_the_step_loss_and_time_left_and_prints_once_per_checkpoint_without_a_terminal():
    import io

    from pipeline.console import TrainBar

    bar = TrainBar(steps=None, total=1000, checkpoint_every=100, stream=io.StringIO())
    bar.started -= 65
    assert bar.line(None) == "starting the training workers · elapsed 1:05"
    state = {"step": 120, "loss": 0.12345, "steps_per_s": 2.0}
    assert bar.line(state) == "step 120/1000 · loss 0.1235 · 2.00 steps/s · ETA 7:20 · elapsed 1:05"
    assert not bar.plain_due(None, since=1.0)
    assert bar.plain_due(state, since=1.0)  # step 100 has passed
    assert not bar.plain_due({**state, "step": 199}, since=1.0)
    assert bar.plain_due({**state, "step": 199}, since=30.0)  # and a line every 30 s between checkpoints
    assert bar.plain_due({**state, "step": 200}, since=1.0)


def test_a_local_models_revision_covers_the_files_its_loader_reads_and_big_digests_are_cached(
        tiny_models, tmp_path, monkeypatch):
    import shutil

    from pipeline.models import file_sha256, resolve_model

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    weights = tmp_path / "annotators"
    shutil.copytree(tiny_models["annotators"], weights)
    files = ("ControlNetHED.pth",)
    first = resolve_model(str(weights), None, files[0], files=files).commit
    (weights / "notes.txt").write_text("an unrelated file in a shared folder")
    assert resolve_model(str(weights), None, files[0], files=files).commit == first
    with open(weights / "ControlNetHED.pth", "ab") as f:
        f.write(b"\0")
    assert resolve_model(str(weights), None, files[0], files=files).commit != first
    # the digest of a big file is remembered by (path, size, mtime): a stale entry is never used
    big = tmp_path / "big.bin"
    big.write_bytes(b"\1" * (2 << 20))
    real = file_sha256(big)
    cache = tmp_path / "cache" / "controlnet-pipeline" / "sha256.json"
    entry = json.loads(cache.read_text())[str(big.resolve())]
    cache.write_text(json.dumps({str(big.resolve()): {**entry, "sha256": "remembered"}}))
    assert file_sha256(big) == "remembered"  # not hashed again
    big.write_bytes(b"\2" * (2 << 20))  # same size, new content and mtime
    assert file_sha256(big) not in ("remembered", real)


def test_a_failure_is_one_line_naming_the_stage_without_rays_colours():
    from pipeline.cli import failure_reason

    read = RuntimeError("\x1b[36mray::ReadWebDataset->SplitBlocks(2)()\x1b[39m (pid=1, ip=127.0.0.1)\n"
                        "Traceback (most recent call last):\n  File \"tarfile.py\", line 1\n"
                        "tarfile.ReadError: unexpected end of data")
    assert failure_reason(read) == "ReadWebDataset->SplitBlocks(2)() failed: tarfile.ReadError: unexpected end of data"
    stage = RuntimeError("\x1b[36mray::MapWorker(MapBatches(annotate:canny)->MapBatches(annotate:hed))\x1b[39m\n"
                         "ValueError: bad weights")
    assert failure_reason(stage) == "stage annotate:hed failed: ValueError: bad weights"


def test_ctrl_c_inside_the_import_systems_own_code_is_sent_again_outside_it():
    """An interrupt that lands in importlib's code (where it could leave the global import lock held and be dropped)
    is not raised there but sent again; anywhere else it is the KeyboardInterrupt Python raises."""
    import threading
    import types

    from pipeline.cli import interrupt

    here = types.SimpleNamespace(f_code=types.SimpleNamespace(co_filename=__file__))
    with pytest.raises(KeyboardInterrupt):
        interrupt(2, here)
    in_importlib = types.SimpleNamespace(f_code=types.SimpleNamespace(co_filename="<frozen importlib._bootstrap>"))
    interrupt(2, in_importlib)  # returns: nothing raised inside importlib
    with pytest.raises(KeyboardInterrupt):  # sent again as a signal to the main thread: raised here
        threading.Event().wait(60)  # the interrupt ends this wait (60 s only bounds a failure)
