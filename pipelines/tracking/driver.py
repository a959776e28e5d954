"""Who drives a run, and whether that driver still lives: the tags every run carries for it.

The process that creates a run (the driver: `labbook run`, `tune`, `worker`, a pipeline) tags it
with where it runs (host, boot id, pid namespace), the processes that drive it (pid and start
time from /proc, so a reused pid is not taken for the driver) and a heartbeat it refreshes every
`LABBOOK_RUN_HEARTBEAT_SECONDS` (default 30) while the run is open. A later labbook command
(`labbook reap`, and run/tune/worker/compare/ui on the way in) calls a RUNNING run's driver dead
only when that is provable: on the same machine, none of its processes lives; elsewhere, its
heartbeat is older than 10 intervals. A live driver on another machine is never touched.

Imports only the standard library, the tag names (`pipelines/tracking/tags.py`) and where
LABBOOK_* variables are read (`pipelines/specs/environment.py`); the heartbeat thread is handed
an MLflow client.
Written by hand: MLflow has no notion of a run's owner process or of liveness.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from pipelines.specs import environment
from pipelines.tracking.tags import Tag

PREFIX = Tag.DRIVER_PREFIX
HOST_TAG = Tag.DRIVER_HOST
MACHINE_TAG = Tag.DRIVER_MACHINE
PROCESSES_TAG = Tag.DRIVER_PROCESSES
HEARTBEAT_TAG = Tag.DRIVER_HEARTBEAT
INTERVAL_TAG = Tag.DRIVER_HEARTBEAT_SECONDS
HEARTBEAT_ENV = environment.RUN_HEARTBEAT_ENV
HEARTBEAT_SECONDS = environment.RUN_HEARTBEAT_SECONDS
STALE_INTERVALS = 10  # another machine's driver is dead once this many beats are missing
COMMAND_PID_ENV = "LABBOOK_COMMAND_PID"  # launch.py: the pid the user started, for a forked command


# `LABBOOK_RUN_HEARTBEAT_SECONDS`, else 30. Raises ValueError (one line) unless a whole number 1..3600.
heartbeat_seconds = environment.run_heartbeat_seconds


def start_time(pid: int) -> str | None:
    """The process's start time (clock ticks after boot, /proc/PID/stat field 22); None if it is gone."""
    try:
        stat = open(f"/proc/{pid}/stat", encoding="ascii", errors="replace").read()  # noqa: SIM115 - one read
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # the command name in parentheses may hold spaces
    return fields[19] if len(fields) > 19 else None


def _machine() -> str:
    """This kernel's boot id and this process's pid namespace: equal only where pids mean the same process."""
    parts = []
    with contextlib.suppress(OSError):
        parts.append(open("/proc/sys/kernel/random/boot_id", encoding="ascii").read().strip())  # noqa: SIM115
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    return "/".join(parts) or "unknown"


def _processes() -> list[int]:
    """This process and, for a command forked by a kernel server, the one the user started."""
    pids = [os.getpid()]
    caller = os.environ.get(COMMAND_PID_ENV, "").strip()
    if caller.isdigit() and int(caller) not in pids:
        pids.append(int(caller))
    return pids


def tags(interval: int | None = None) -> dict[str, str]:
    """The tags that name this process as a run's driver, with a first heartbeat."""
    found = [f"{pid}:{start}" for pid in _processes() if (start := start_time(pid)) is not None]
    return {
        HOST_TAG: socket.gethostname(),
        MACHINE_TAG: _machine(),
        PROCESSES_TAG: ",".join(found),
        HEARTBEAT_TAG: str(int(time.time())),
        INTERVAL_TAG: str(interval or heartbeat_seconds()),
    }


def gone(run_tags: dict[str, str], now: float | None = None) -> str | None:
    """Why the driver of a run with these tags is provably dead, in one line; None while it may live.

    A run without driver tags (made by another tool or an older labbook) is never called dead.
    """
    host, processes = run_tags.get(HOST_TAG), run_tags.get(PROCESSES_TAG)
    if not host or processes is None:
        return None
    if host == socket.gethostname() and run_tags.get(MACHINE_TAG) == _machine() and processes:
        for entry in processes.split(","):
            pid, _, started = entry.partition(":")
            if pid.isdigit() and start_time(int(pid)) == started:
                return None  # alive (a reused pid has another start time)
        shown = ", ".join(entry.split(":")[0] for entry in processes.split(","))
        return f"driver died: process {shown} on {host} is gone"
    try:
        beat, interval = float(run_tags[HEARTBEAT_TAG]), float(run_tags[INTERVAL_TAG])
    except (KeyError, ValueError):
        return None
    age = (time.time() if now is None else now) - beat
    if interval > 0 and age > STALE_INTERVALS * interval:
        return f"driver died: no heartbeat from {host} for {age:.0f} s (expected every {interval:.0f} s)"
    return None


@dataclass
class _Beat:
    client: Any
    run_id: str


class _Heartbeats:
    """One daemon thread per process refreshing the heartbeat tag of every run this process drives."""

    def __init__(self) -> None:
        self._runs: dict[str, _Beat] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def add(self, client: Any, run_id: str, interval: int) -> None:
        with self._lock:
            if self._pid != os.getpid():  # a forked child: the parent's thread is not ours
                self._runs, self._thread, self._pid = {}, None, os.getpid()
            self._runs[run_id] = _Beat(client, run_id)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, args=(interval,), name="labbook-run-heartbeat", daemon=True
                )
                self._thread.start()

    def remove(self, run_id: str) -> None:
        with self._lock:
            self._runs.pop(run_id, None)

    def _loop(self, interval: int) -> None:
        while not self._wake.wait(interval):
            with self._lock:
                beats = list(self._runs.values())
            now = str(int(time.time()))
            for beat in beats:
                # A store that is briefly unreachable or busy: the next beat tries again.
                with contextlib.suppress(Exception):
                    beat.client.set_tag(beat.run_id, HEARTBEAT_TAG, now)


_heartbeats = _Heartbeats()


def drive(client: Any, run_id: str, tag: bool = True) -> None:
    """Make this process the driver of `run_id`: its tags (unless just written), then a beat every interval."""
    interval = heartbeat_seconds()
    if tag:
        from mlflow.entities import RunTag

        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags(interval).items()])
    _heartbeats.add(client, run_id, interval)


def release(run_id: str) -> None:
    """This process no longer drives `run_id` (it was closed): its heartbeat stops."""
    _heartbeats.remove(run_id)
