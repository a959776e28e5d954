"""`labbook reap`: close the runs whose driver died, and the kernel files their kernels left.

A run stays RUNNING when the process driving it is `kill -9`ed or its machine is lost: nothing
else closes it. Here every RUNNING run whose driver is provably gone (pipelines/tracking/driver.py) is
closed FAILED "driver died: …", its executed-so-far notebook (papermill writes it to the run's
output folder after every cell) attached, and a trial's run tagged `labbook.trial_state=FAIL`
(Optuna fails the trial when its heartbeat stops). `labbook run`, `tune`, `worker`, `compare`
and `ui` do this on the way in; `labbook reap [--dry-run]` does it on demand.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Run, ViewType

from pipelines.errors import reason as one_line
from pipelines.tracking import driver, staged, tracking
from pipelines.tracking.tags import Tag

CONNECTION_FILE_MIN_AGE = 30.0  # seconds: a younger file may belong to a kernel still starting


@dataclass(frozen=True)
class Reaped:
    """A run whose driver is gone: closed, or (dry run) to be closed."""

    run_id: str
    experiment: str
    run_name: str
    reason: str
    notebook: str | None  # the partial notebook attached, if one was found
    closed: bool = False  # False in a dry run, or when the store refused the write (`reason` says why)


def dead_runs(client: MlflowClient) -> Iterator[tuple[Run, str, str]]:
    """Every RUNNING run whose driver is provably gone, with its experiment's name and the reason."""
    names = {}
    token = None
    while True:
        page = client.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
        names |= {e.experiment_id: e.name for e in page}
        token = page.token
        if not token:
            break
    if not names:
        return
    token = None
    while True:
        page = client.search_runs(
            list(names), filter_string="attributes.status = 'RUNNING'", max_results=1000, page_token=token
        )
        for run in page:
            reason = driver.gone(run.data.tags)
            if reason:
                yield run, names.get(run.info.experiment_id, "?"), reason
        token = page.token
        if not token:
            break


def reap(uri: str | None = None, dry_run: bool = False) -> list[Reaped]:
    """Close (unless `dry_run`) every run of the store whose driver is gone; what was found.

    Raises what the store raises when it cannot be read; a run that cannot be closed (a
    read-only or full store) is left as it is and reported with why.
    """
    uri = uri or tracking.tracking_uri()
    client = tracking.client(uri)
    found = []
    for run, experiment, reason in dead_runs(client):
        notebook, closed = None, False
        if not dry_run:
            closed, reason, notebook = _close(client, uri, run, reason)
        found.append(Reaped(run.info.run_id, experiment, run.info.run_name or "", reason, notebook, closed))
    if not dry_run:
        with contextlib.suppress(OSError):
            remove_stale_connection_files()
            tracking.remove_dead_reserves(uri)
    return found


def _close(client: MlflowClient, uri: str, run: Run, reason: str) -> tuple[bool, str, str | None]:
    """FAILED first (the state is what matters), then the reason, the trial state and the notebook."""
    run_id = run.info.run_id
    again = client.get_run(run_id)  # re-read: it may have been reopened by a new driver meanwhile
    if again.info.status != "RUNNING" or driver.gone(again.data.tags) is None:
        return False, "not closed: it has a live driver again", None
    try:
        tracking.finish_run(client, run_id, reason)
    except Exception as exc:  # noqa: BLE001 - a store that takes no writes: say so, close nothing
        return False, f"not closed ({tracking.store_problem(exc, uri) or type(exc).__name__}): {reason}", None
    with contextlib.suppress(Exception):
        # A trial told to Optuna (COMPLETE, PRUNED) keeps that state: its value is real, only the
        # closing was cut. A trial still RUNNING in the record is what the stale-trial check fails.
        state = again.data.tags.get(Tag.TRIAL_STATE)
        if state is not None and state not in ("COMPLETE", "PRUNED"):
            client.set_tag(run_id, Tag.TRIAL_STATE, "FAIL")
    return True, reason, _attach_partial(client, uri, run_id)


def _attach_partial(client: MlflowClient, uri: str, run_id: str) -> str | None:
    """The executed-so-far notebook papermill left in the run's output folder, attached with its HTML,
    and the plots, tables and checkpoints its kernel staged for the dead driver to upload."""
    folder = tracking.output_dir(uri, run_id)
    attached = None
    try:  # the model a study's kernel asked its dead driver to log (the same rules as the driver's)
        from pipelines.execution.closing import log_requested_model

        log_requested_model(client, run_id, staged.folder(folder))
    except Exception as exc:  # noqa: BLE001 - the run is closed already; say what was not logged
        with contextlib.suppress(Exception):
            client.set_tag(run_id, Tag.UPLOAD_ERROR, one_line(f"logging the model from its staged checkpoint: {exc}"))
    with contextlib.suppress(Exception):  # what the kernel staged for its dead driver to upload
        staged.upload(client, run_id, staged.folder(folder))
    for ipynb in sorted(folder.glob("*.ipynb")) if folder.is_dir() else []:
        with contextlib.suppress(Exception):  # the run is closed already; a notebook is a bonus
            client.log_artifact(run_id, str(ipynb), "notebook")
            attached = str(ipynb)
            from pipelines.execution.notebook import render_html

            client.log_artifact(run_id, str(render_html(ipynb)), "notebook")
    return attached


def _connection_files() -> Iterator[Path]:
    """Where jupyter_client writes kernel connection files: the temp folder and Jupyter's runtime folder."""
    yield from Path(tempfile.gettempdir()).glob("tmp*.json")
    with contextlib.suppress(Exception):
        from jupyter_core.paths import jupyter_runtime_dir

        yield from Path(jupyter_runtime_dir()).glob("kernel-*.json")


def _cmdlines() -> str:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            found.append(cmdline.read_bytes().decode(errors="replace"))
    return "\n".join(found)


def _listening(ip: str, port: int) -> bool:
    import socket

    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((ip, port)) == 0


def remove_stale_connection_files() -> int:
    """Remove connection files of labbook kernels that are gone; how many.

    A driver killed with `kill -9` never removes the file it wrote for its kernel (jupyter_client
    does that at shutdown), and its kernel exits without it. A file is the labbook kernel's
    (`kernel_name`), older than 30 s, named by no live process's command line, with none of its
    ports listening: nobody can use it again. Written by hand: Jupyter has no such clean-up.
    """
    removed = 0
    commands = None
    now = time.time()
    for path in _connection_files():
        try:
            if path.stat().st_size > 4096 or now - path.stat().st_mtime < CONNECTION_FILE_MIN_AGE:
                continue
            info = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(info, dict) or info.get("kernel_name") != "labbook" or "hb_port" not in info:
            continue
        commands = _cmdlines() if commands is None else commands
        if str(path) in commands or os.path.realpath(path) in commands:
            continue
        ports = [info.get(k) for k in ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")]
        ip = str(info.get("ip") or "127.0.0.1")
        if info.get("transport", "tcp") != "tcp" or any(isinstance(p, int) and _listening(ip, p) for p in ports):
            continue
        with contextlib.suppress(OSError):
            path.unlink()
            removed += 1
    return removed


def reap_quietly(say: object = None) -> list[Reaped]:
    """`reap()` on the way into another command: never fails it; `say(line)` hears each closed run."""
    try:
        found = reap()
    except Exception:  # noqa: BLE001 - a store that cannot be read now is the command's own problem
        return []
    for item in found:
        if item.closed and callable(say):
            say(f"closed run {item.run_id} ({item.experiment}/{item.run_name}) FAILED: {item.reason}")
    return found
