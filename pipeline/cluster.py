"""Starting, joining and stopping Ray for a command: a local instance on a laptop, a running cluster given its
address (judged before Ray's own minutes of retries), and a shutdown that does not wait on Ray's exit hooks."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

SPEAKS_WITHIN = 5.0  # seconds a server at a cluster address has to speak first, as Ray's GCS does at once


class RayUnavailable(RuntimeError):
    """Ray could not be started or joined."""


def init_ray(address: str | None, verbose: bool = False) -> None:
    """Start or join Ray. `run` reads its config, imports Ray Data, pyarrow and pandas and calls this with Python's
    garbage collector paused, then freezes what that made out of later collections (`pipeline.cpus.loading`):
    full collections walking those ~280,000 objects took ~0.5 s of the driver's CPU, most of it before any
    actor started."""
    from pipeline.console import quiet_ray, without_log_level_line

    options = {} if verbose else quiet_ray()
    join = joins_cluster(address)
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None and address.startswith("ray://"):
        raise RayUnavailable(f"could not join Ray at {address}: Ray Data's executor needs the driver's core worker, "
                             f"which a Ray Client (ray://) driver does not have; submit the job to the cluster with "
                             f"`ray job submit`, or run it on a node of the cluster with --address HEAD:6379")
    try:
        if address in (None, "auto") and (found := recorded_cluster()) is not None:
            try:
                answers(found, silent_ok=True)  # silent: a GCS slow to speak, or something else: Ray judges
            except OSError:
                if address is not None:
                    raise
                address = "local"  # Ray's record of a cluster on this machine that has stopped: start a new one
        elif join:
            answers(address)
            if (found := recorded_cluster()) is not None and same_cluster(address, found):
                token_as_for_auto()
            if reason := gcs_refusal(address):
                raise ConnectionError(reason)
        with contextlib.nullcontext() if verbose else without_log_level_line():
            start_ray(address, join, options, verbose)
    except Exception as e:  # noqa: BLE001 - any failure to start or connect is one line
        raise RayUnavailable(f"could not {'join Ray at ' + address if join else 'start a local Ray instance'}: "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def start_ray(address: str | None, join: bool, options: dict, verbose: bool = False) -> None:
    import ray

    if join:
        ray.init(address=address, **options)
    else:
        # the laptop default: a local Ray instance ('local': always a new one), without the dashboard's
        # nine web modules (~5 CPU-s of a start on two cores). Its workers inherit this environment:
        # OpenMP threads that sleep when idle, so stages sharing a few cores do not spin against each other
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        for key, value in SOCKET_RETRIES.items():
            os.environ.setdefault(key, value)
        with raylet_polled_finely(), contextlib.nullcontext() if verbose else without_unwatched_processes():
            ray.init(address=address, include_dashboard=False, **options)


# What a local instance starts that a command showing none of Ray's logs has no use for: the API server (with the
# dashboard off it loads Ray's usage-statistics module alone, and `ray.init` waits ~0.6 s for it to write its address
# before it starts the raylet), the autoscaler monitor (one machine has nothing to scale; its events reach the
# console as logs) and the log monitor (it passes the workers' log lines to a driver that does not print them)
UNWATCHED = ("start_api_server", "start_monitor", "start_log_monitor")


@contextlib.contextmanager
def without_unwatched_processes():
    """While a local instance starts for a command that shows none of Ray's logs, Ray's node starts none of the
    `UNWATCHED` processes: `ray.init` 1.16-1.17 s against 1.90-2.06 s, ~1 CPU-s less in the start (two cores),
    a tiny 40-input run 11.70 s against 12.50 s. With `-v` (Ray's logs shown) the instance starts as Ray starts it.
    Ray's node object is private: if its methods move, the start is as before."""
    try:
        from ray._private.node import Node

        originals = {name: getattr(Node, name) for name in UNWATCHED}
    except (ImportError, AttributeError):
        yield
        return
    for name in UNWATCHED:
        setattr(Node, name, lambda self, *args, **kwargs: None)
    try:
        yield
    finally:
        for name, method in originals.items():
            setattr(Node, name, method)


# The raylet connects to its object store, which it starts on a thread a moment before, through Ray's socket retry:
# the first attempt often comes too early, and the next waited Ray's 1 s. Retries every 0.1 s, as many seconds in all.
SOCKET_RETRIES = {"RAY_raylet_client_connect_timeout_milliseconds": "100",
                  "RAY_raylet_client_num_connect_attempts": "100"}


@contextlib.contextmanager
def raylet_polled_finely(every: float = 0.02, within: float = 5.0):
    """While a local instance starts: `ray.init` waits for its raylet to register with GCS through a C++ call that
    looks again once a second (`GlobalStateAccessor::GetNode`), so a raylet that registered 0.7 s after it started
    was seen at 1.1 s, one at 1.2 s at 2.1 s; here the node table is read every 20 ms first, and Ray's own call then
    finds the raylet at once. A raylet not registered within `within` seconds (a loaded machine, a raylet that died)
    is left to Ray's own call, as before: a start that fails is reported at most `within` seconds later than Ray alone
    would. Ray's helper is private: if it moves, the start is as before."""
    try:
        from ray._private import services, state

        original = services.get_node
    except (ImportError, AttributeError):
        yield
        return

    def get_node(gcs_address, node_id):
        with contextlib.suppress(Exception):  # an optimisation only: Ray's own call decides
            table = state.GlobalState()
            table._initialize_global_state(services._get_gcs_client_options(gcs_address))
            deadline = time.monotonic() + within
            while not any(n["NodeID"] == node_id and n["Alive"] for n in table.node_table()):
                if time.monotonic() > deadline:
                    break
                time.sleep(every)
        return original(gcs_address, node_id)

    services.get_node = get_node
    try:
        yield
    finally:
        services.get_node = original


def answers(address: str, wait: float | None = None, silent_ok: bool = False) -> None:
    """Raise OSError unless Ray's GCS could be at a cluster address (`host:port`): something takes a TCP connection
    within 5 s and speaks first, as a gRPC server does (`not_a_gcs`). Ray's own attempts to reach an address where
    nothing listens, or something else does, go on for minutes."""
    import socket

    try:
        target = split(address)
    except ValueError:  # not host:port: Ray judges it
        return
    host, port = target.hostname, target.port  # ValueError: a port out of range
    if host and port is not None:
        with socket.create_connection((host, port), timeout=5) as conn:
            if uses_tls():
                return  # a TLS server waits for the client's hello: nothing to tell by
            if reason := not_a_gcs(conn, SPEAKS_WITHIN if wait is None else wait, silent_ok):
                raise ConnectionError(reason)


def split(address: str):
    """A cluster address (`host:port`, or with a scheme) as urllib's parts (ValueError where it cannot be read)."""
    from urllib.parse import urlsplit

    return urlsplit(address if "://" in address else f"//{address}")


def uses_tls() -> bool:
    """Whether Ray speaks TLS to its GCS (as Ray reads RAY_USE_TLS): its server then waits for the client's hello."""
    return os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true")


def not_a_gcs(conn, wait: float, silent_ok: bool = False) -> str | None:
    """Why the server at the other end of a new connection is not Ray's GCS, or None. The GCS, a gRPC server, sends
    its HTTP/2 settings as soon as a connection opens (a frame whose header's fourth byte is 4, SETTINGS); an HTTP/1
    server (the dashboard, the address `ray job submit` takes) waits for a request and answers it with `HTTP/`; a
    tunnel with nothing behind it closes the connection; other services say something else first. `silent_ok`: a
    server that says nothing in `wait` seconds is not judged (a GCS on a loaded head may be slow)."""
    first = receive(conn, 4, wait)
    if first is None:  # silent: is it waiting for an HTTP request?
        with contextlib.suppress(OSError):
            conn.sendall(b"HEAD / HTTP/1.0\r\n\r\n")
        first = receive(conn, 5, 1.0)
        if first and first.startswith(b"HTTP/"):
            return ("it answers HTTP: a dashboard's port, the address `ray job submit` takes? A driver joins the "
                    "head's GCS port (6379 unless `ray start --port` set another)")
        if first is None:
            return None if silent_ok else (f"it says nothing in {wait:g} s, where Ray's GCS speaks at once: not a Ray "
                                           f"head's GCS port (6379 unless `ray start --port` set another)?")
    if len(first) >= 4 and first[3] == 4:
        return None
    if not first:
        return "it closes the connection at once, where Ray's GCS speaks: a tunnel or forward with nothing behind it?"
    said = first[:32].decode("ascii", "replace").strip()
    return f"it speaks another protocol (it says {said!r} first), not Ray's GCS: a port of another service?"


def gcs_refusal(address: str, wait: float = 5.0) -> str | None:
    """Why Ray's driver could not join the gRPC server at `address`, asked what Ray asks a GCS first (the cluster's
    id), or None: a gRPC server without Ray's GCS service (the Ray Client server's port, 10001 by default), or a
    cluster with token authentication where this process would present no token (Ray presents one to an address
    given explicitly only with RAY_AUTH_MODE=token). Ray retried either for 20 s or more, then blamed a crashed
    instance. Anything else (no answer in `wait` seconds, TLS) is Ray's to judge."""
    if uses_tls():
        return None
    try:
        import grpc
    except ImportError:
        return None
    token = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
    try:  # the header Ray sends with the token where RAY_AUTH_MODE=token (none otherwise)
        from ray._private.authentication.grpc_authentication_client_interceptor import (
            _get_authentication_metadata_tuple,
        )

        metadata = _get_authentication_metadata_tuple()
    except Exception:  # noqa: BLE001 - Ray's private helper moved: with a token, Ray judges
        if token:
            return None
        metadata = ()
    channel = grpc.insecure_channel(split(address).netloc)
    try:
        ask = channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId", request_serializer=bytes,
                                  response_deserializer=bytes)
        ask(b"", timeout=wait, metadata=metadata)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.UNIMPLEMENTED:
            return ("it is a gRPC server without Ray's GCS service: the Ray Client server's port (10001 unless `ray "
                    "start --ray-client-server-port` set another)? A driver joins the head's GCS port (6379 unless "
                    "`ray start --port` set another)")
        if e.code() == grpc.StatusCode.UNAUTHENTICATED and metadata:
            return ("the cluster refuses the token this machine presents (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
                    "~/.ray/auth_token): it is not the cluster's; `ray get-auth-token` on the head prints that one")
        if e.code() == grpc.StatusCode.UNAUTHENTICATED and not token:
            return ("the cluster uses token authentication, and Ray presents a token to an address only with "
                    "RAY_AUTH_MODE=token: set it, with the cluster's token in ~/.ray/auth_token or RAY_AUTH_TOKEN")
    finally:
        channel.close()
    return None


def receive(conn, size: int, wait: float) -> bytes | None:
    """What a connection sends within `wait` seconds, once it is `size` bytes or more: less where it closes first
    (b"" at once, or when it resets), None where it sends nothing in that time."""
    import time

    data, deadline = b"", time.monotonic() + wait
    while len(data) < size:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        conn.settimeout(left)
        try:
            chunk = conn.recv(256)
        except TimeoutError:
            break
        except OSError:
            return data
        if not chunk:
            return data
        data += chunk
    return data or None


def same_cluster(address: str, found: str) -> bool:
    """Whether `address` names the cluster recorded on this machine (`found`): the same port, on the same host or
    on this machine's loopback."""
    import ipaddress
    import socket

    try:
        given, recorded = split(address), split(found)
        if given.port != recorded.port or given.port is None:
            return False
        hosts, recorded_hosts = ({info[4][0] for info in socket.getaddrinfo(u.hostname or "", u.port)}
                                 for u in (given, recorded))
        return bool(hosts & recorded_hosts) or all(ipaddress.ip_address(h).is_loopback for h in hosts)
    except (OSError, ValueError):
        return False


def token_as_for_auto() -> None:
    """Join the cluster `ray start` recorded on this machine, given its address, as Ray joins it given none (`auto`):
    with this machine's token where one exists. Ray 2.60 starts a cluster with token authentication where a token
    exists (~/.ray/auth_token, which a local `ray.init` writes), and presents it to the recorded cluster, but to an
    address given explicitly only with RAY_AUTH_MODE=token: `--address 127.0.0.1:6379` to this machine's own head
    failed after 20 s of "InvalidAuthToken" warnings. Ray's helper is private: if it moves, joining is as before."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def recorded_cluster() -> str | None:
    """The address of the cluster Ray joins given no address (or `auto`): the one `ray start` last recorded on this
    machine (`/tmp/ray/ray_current_cluster`), which may have stopped since."""
    try:
        from ray._private.utils import read_ray_address

        return read_ray_address() or None
    except Exception:  # noqa: BLE001 - unreadable, or Ray's private helper changed: Ray decides
        return None


def joins_cluster(address: str | None) -> bool:
    """Whether `--address` (else RAY_ADDRESS) names a running cluster to join; otherwise a local instance starts."""
    return (address or os.environ.get("RAY_ADDRESS") or None) not in (None, "local")


def stop_ray() -> None:
    """Stop (or leave) Ray now, not from its exit hook, which first sleeps half a second for late log lines."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            settle_ray_data()
            kill_autoscaler_monitor()
            ray.shutdown()


def settle_ray_data(timeout: float = 10.0) -> None:
    """Before Ray is stopped: wait for Ray Data's scheduling thread (and the thread that fetches its blocks'
    metadata) to end. When a run is interrupted or fails, Ray Data asks that thread to stop and waits 2 s for it; on
    a loaded machine its step outlasted that, it called into Ray after `ray.shutdown`, and Ray ended the process with
    exit code 1 and no message (7 of 7 interrupted runs beside two busy processes) instead of the interrupt's 130.
    After a run that finished, the thread has ended already. The threads go by the names Ray Data gives them; if
    those change, nothing waits, as before."""
    import threading
    import time

    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread.name.startswith(("StreamingExecutor-", "ray-data-metadata-prefetch")):
            thread.join(max(0.0, deadline - time.monotonic()))


def kill_autoscaler_monitor() -> None:
    """A local instance's autoscaler monitor (it has nothing to scale; started with `-v` only, see
    `without_unwatched_processes`) is killed first: Ray's shutdown stops
    GCS before it, and its SIGTERM handler then waits on GCS until Ray kills it a second later (1.35 s
    -> ~0.2 s for the whole shutdown). Ray's node object is private: if it changes, shutdown is as before."""
    from ray._private import worker

    try:
        for info in worker._global_node.all_processes.get("monitor", ()):  # empty when joining a cluster
            info.process.kill()
    except Exception:  # noqa: BLE001 - an optimisation only
        pass


def stops_ray(command):
    """A command that may start Ray: Ray is shut down when it returns, however it returns."""
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return command(args)
        finally:
            stop_ray()

    wrapper.__name__, wrapper.__doc__ = command.__name__, command.__doc__
    return wrapper
