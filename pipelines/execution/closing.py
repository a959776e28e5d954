"""Closing a run after its notebook ran: HTML page, staged uploads, executed notebook, status.

`close` does it all in the calling thread. A study's driver hands it to a `RunCloser` instead:
one background thread closes trial n's run while trial n+1's notebook already runs, so the HTML
render (0.2-0.4 s for the train notebook) and the uploads are off the trial's critical path
(issue 26). The trial's outcome is the notebook's and is told to Optuna at once; the run is
closed only after every upload finished, and a failed upload closes it FAILED with the reason
(`labbook.trial_state` still says what Optuna holds). The driver waits for every pending close
before it exits, Ctrl-C included; a driver killed before that leaves its runs RUNNING, and
`labbook reap` closes them FAILED with their staged files and notebook.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from pipelines.errors import reason
from pipelines.execution import notebook
from pipelines.execution.notebook import ExecutedNotebook
from pipelines.tracking import staged, tracking
from pipelines.tracking.tags import Tag


def close(mlflow: MlflowClient, run_id: str, executed: ExecutedNotebook, staging: Path) -> tuple[str | None, bool]:
    """Render, upload what the kernel staged, attach the executed notebook, and close the run.

    Returns `(error, pruned)`: the run's one-line error (None: FINISHED) and whether the
    notebook's outcome was a pruned trial (FINISHED, tagged `labbook.pruned`). An upload or
    attach failure is added to the error: the run ends FAILED, saying where its files are kept.
    """
    error = executed.error
    html = executed.html
    if html is None and executed.ipynb.exists():
        try:
            html = notebook.render_html(executed.ipynb)
        except Exception as exc:  # a rendering problem must not hide the run's own outcome
            error = error or f"rendering the executed notebook failed: {reason(exc)}"
    uploading = attaching = None
    try:
        log_requested_model(mlflow, run_id, staging)  # before the upload removes the staged checkpoint
    except Exception as exc:  # a refused request or a store problem: the run fails, saying which
        uploading = f"logging the model from its staged checkpoint (kept at {staging}) failed: {reason(exc)}"
    try:
        staged.upload(mlflow, run_id, staging)
    except Exception as exc:  # an unwritable or full artifact store: the run fails, saying where
        uploading = uploading or (
            f"uploading the run's plots, tables and checkpoints (kept at {staging}) failed: {reason(exc)}"
        )
    try:
        notebook.attach(mlflow, run_id, replace(executed, html=html))
    except Exception as exc:
        where = mlflow.get_run(run_id).info.artifact_uri
        attaching = (
            f"attaching the executed notebook to {where} failed: {type(exc).__name__}: {exc}; "
            f"it is kept at {executed.ipynb}"
        )
    if uploading and attaching:  # one store problem twice: the error keeps the notebook's, the tag the rest
        with contextlib.suppress(Exception):
            mlflow.set_tag(run_id, Tag.UPLOAD_ERROR, reason(uploading))
    problems = [attaching] if attaching else [uploading] if uploading else []
    if problems:
        error = "; ".join(([error] if error else []) + problems)
    pruned = executed.pruned and error == executed.error
    if pruned:
        mlflow.set_tag(run_id, Tag.PRUNED, executed.error)
        tracking.finish_run(mlflow, run_id)
    else:
        tracking.finish_run(mlflow, run_id, error)
    return error, pruned


def log_requested_model(mlflow: MlflowClient, run_id: str, staging: Path) -> str | None:
    """The model the run's kernel asked its driver to log (`pipelines.nb.logged_model`), logged.

    Returns its model URI, or None when none was requested (then nothing heavy is imported: torch
    and Lightning load only in a driver that logs a model). Raises what `log_requested` raises.
    """
    from pipelines.nb import logged_model

    run = mlflow.get_run(run_id)
    return logged_model.log_requested(mlflow.tracking_uri, run_id, run.info.experiment_id, staging, run.data.tags)


class RunCloser:
    """One background thread that closes runs in the order they were handed over.

    Use as a context manager: leaving it waits for every close (also on an exception or
    Ctrl-C). A close that raises (the store went away) is reported on stderr in one line; the
    run then stays RUNNING until `labbook reap` closes it.
    """

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="labbook-close")

    def submit(self, close_run: Callable[[], Any], run_id: str) -> Future:
        """Queue `close_run()` (the run `run_id`'s close); returns its future."""
        future = self._executor.submit(close_run)
        future.add_done_callback(lambda done: _report(done, run_id))
        return future

    def __enter__(self) -> RunCloser:
        return self

    def __exit__(self, *exc: object) -> None:
        self._executor.shutdown(wait=True)


def _report(done: Future, run_id: str) -> None:
    if not done.cancelled() and done.exception() is not None:
        print(f"closing run {run_id} failed: {reason(done.exception())}", file=sys.stderr)
