"""One run at a time per output path.

A run holds `OUT/.lock` while it works: created exclusively (O_EXCL on a local disk, a conditional
`If-None-Match` write on S3), holding the run id, host, pid and a heartbeat time the run refreshes.
A second run of any job into the same path is refused with one line naming the holder. A lock left
behind by a run that died is taken over: at once when its process is gone from this host, else once
its heartbeat is older than `stale_after` seconds.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any

from pipeline.io.output import RunOutput

LOCK = ".lock"
HEARTBEAT_S = 30.0
STALE_S = 120.0


class OutputLocked(RuntimeError):
    """Another run is writing to the same output path."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    def __init__(self, output: RunOutput, run_id: str, stale_after: float = STALE_S, heartbeat: float = HEARTBEAT_S):
        self.output, self.run_id = output, run_id
        self.stale_after, self.heartbeat = stale_after, heartbeat
        self.path = output.path(LOCK)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def record(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(), "heartbeat_at": time.time()}

    def _create(self) -> bool:
        try:
            with self.output.fs.open(self.path, "xb") as f:
                f.write(json.dumps(self.record()).encode())
            return True
        except FileExistsError:
            return False

    def holder(self) -> dict[str, Any] | None:
        """The lock's record, or None when it is gone; {} when it cannot be read (being written)."""
        try:
            with self.output.fs.open(self.path, "rb") as f:
                return json.loads(f.read() or b"{}")
        except FileNotFoundError:
            return None
        except ValueError:
            return {}

    def stale(self, held: dict[str, Any]) -> bool:
        if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int) and not _alive(held["pid"]):
            return True
        heartbeat = held.get("heartbeat_at")
        return isinstance(heartbeat, (int, float)) and time.time() - heartbeat > self.stale_after

    def acquire(self) -> None:
        self.output.fs.makedirs(self.output.root, exist_ok=True)
        for _ in range(2):
            if self._create():
                self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
                self._thread.start()
                return
            held = self.holder()
            if held is None:
                continue  # released in between
            self.refuse_if_held(held)
            self.output.fs.rm(self.path)  # a dead run's lock
        raise OutputLocked(f"output.path {self.output.url}: another run took the lock at the same time")

    def refuse_if_held(self, held: dict[str, Any] | None = None) -> None:
        """OutputLocked naming the run that holds the lock, if a live one does."""
        held = self.holder() if held is None else held
        if held is None or self.stale(held):
            return
        age = time.time() - held["heartbeat_at"] if isinstance(held.get("heartbeat_at"), (int, float)) else 0
        raise OutputLocked(
            f"output.path {self.output.url} is in use by run {held.get('run_id', '?')} on {held.get('host', '?')} "
            f"(pid {held.get('pid', '?')}, seen {age:.0f}s ago); wait for it to end (if that run is gone, "
            f"its lock expires {self.stale_after:.0f}s after its last heartbeat, or delete {self.path})")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                with self.output.fs.open(self.path, "wb") as f:
                    f.write(json.dumps(self.record()).encode())
            except OSError:
                pass  # the next beat tries again; a missed beat only makes the lock look older

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            held = self.holder()
            if held is not None and held.get("run_id") == self.run_id:
                self.output.fs.rm(self.path)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
