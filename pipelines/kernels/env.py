"""What every labbook process reads from its environment about kernels and forked commands.

Standard library only: `pipelines.launch` (the `labbook` entry point, which must start fast)
imports it, and so do the kernel pool, the fork server and the study driver. It lived in
`launch.py` until issue 24; the kernel modules importing it from there made them import the
entry point, and through it the CLI, back.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV_SERVER = "LABBOOK_KERNEL_SERVER"
ENV_FORK = "LABBOOK_FORK_KERNELS"
ENV_PID = "LABBOOK_COMMAND_PID"  # the pid the user started: what a forked command calls itself


def quiet_defaults() -> None:
    """Process-wide settings of every labbook command, made before MLflow and nbformat are imported
    (in a kernel server too, so that its forked commands start with them). A user's own setting wins."""
    # MLflow's INFO lines ("Creating initial MLflow database tables...") are noise in a CLI.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # bars for kilobytes are noise
    # nbformat (papermill's notebook reader) imports jsonschema, which imports `rfc3987_syntax` when
    # installed (jupyter-events installs it) only to offer an "iri" format check, and that import
    # builds a Lark grammar: 1.0-1.8 s of every command's start, measured with -X importtime.
    # Format checks are off unless asked for, and nothing here asks: a None entry makes that one
    # optional import fail, so jsonschema goes without the check in this process.
    sys.modules.setdefault("rfc3987_syntax", None)  # type: ignore[arg-type]


def fork_enabled() -> bool:
    """`LABBOOK_FORK_KERNELS` (default 1): fork kernels (and commands) from one warm process."""
    raw = os.environ.get(ENV_FORK, "1").strip().lower()
    if raw not in ("0", "1", "true", "false", "yes", "no", ""):
        raise ValueError(f"{ENV_FORK}={raw!r}: expected 1 or 0")
    return raw in ("1", "true", "yes", "")


def server_path() -> str | None:
    """The kernel server's socket (LABBOOK_KERNEL_SERVER) when it exists and forking is on."""
    path = os.environ.get(ENV_SERVER, "").strip()
    if not path or not fork_enabled() or not Path(path).is_socket():
        return None
    return path


PROJECT_ROOT = Path(__file__).resolve().parents[2]


def interpreter() -> str:
    """This Python and this copy of labbook, as a kernel server compares them: `.venv/bin/python`
    and the `python3.11` of a console script are the same interpreter, the same file outside the
    environment is not; and a server started from another checkout (another worktree, an editable
    install pointing elsewhere) would run that checkout's code, so the project root must match too."""
    return f"{os.path.realpath(sys.executable)} in {sys.prefix} for {PROJECT_ROOT}"
