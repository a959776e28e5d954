"""Every `LABBOOK_*` environment variable labbook reads, with what it accepts, checked up front.

Each variable has one reader, here (the kernel modules and the run driver, `pipelines/kernels/env.py`
and `pipelines/tracking/driver.py`, take theirs from here: this module imports no other labbook module,
so every layer may import it); `check()` runs them all
before a command writes anything, so `LABBOOK_HEARTBEAT_SECONDS=abc` is one line and exit 2 at
the start, not a traceback minutes into a study. `tests/test_spec.py` fails when a module reads
a `LABBOOK_*` variable that is not listed in `readers()`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

HEARTBEAT_ENV = "LABBOOK_HEARTBEAT_SECONDS"
WARM_KERNELS_ENV = "LABBOOK_WARM_KERNELS"
OPTUNA_STORAGE_ENV = "LABBOOK_OPTUNA_STORAGE"
SCHEDULER_DB_ENV = "LABBOOK_SCHEDULER_DB"
FORK_KERNELS_ENV = "LABBOOK_FORK_KERNELS"  # pipelines.kernels.env.ENV_FORK
KERNEL_SERVER_ENV = "LABBOOK_KERNEL_SERVER"  # pipelines.kernels.env.ENV_SERVER
RUN_HEARTBEAT_ENV = "LABBOOK_RUN_HEARTBEAT_SECONDS"  # pipelines.tracking.driver.HEARTBEAT_ENV
RUN_HEARTBEAT_SECONDS = 30
# The URLs whose passwords were redacted from a notebook's parameters (a JSON list), for the
# kernels labbook starts (`pipelines.tracking.tracking.notebook_parameter`, `reveal`).
SECRET_URLS_ENV = "LABBOOK_SECRET_URLS"
# Set by labbook itself for the processes it starts, never by a user: not checked.
INTERNAL = frozenset({"LABBOOK_COMMAND_PID", SECRET_URLS_ENV})


def telemetry_off() -> None:
    """Turn MLflow's usage telemetry off in this process and those it starts, unless the user chose.

    MLflow >= 3.2 sends a usage record per tracked API call (`mlflow.telemetry`, opt-out) to
    https://config.mlflow-telemetry.io, and `mlflow server`'s UI to a CDN; it stays off only under
    CI or pytest (`mlflow.telemetry.utils.is_telemetry_disabled`). A labbook user's runs, studies
    and UI talk to their own store and server only: nothing goes off the machine unasked. A user
    who wants MLflow's telemetry sets `MLFLOW_DISABLE_TELEMETRY=false`; `DO_NOT_TRACK` is honoured
    by MLflow itself. Read by MLflow at each call, so setting it after MLflow's import is enough.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def whole_number(name: str, default: int, low: int, high: int, unit: str = "") -> int:
    """`name` as a whole number in [low, high] (of `unit`, as the error says), else `default` when
    unset; `ValueError` in one line."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 9) or not low <= int(raw) <= high:
        of = f" of {unit}" if unit else ""
        raise ValueError(f"{name}={raw[:40]!r}: expected a whole number{of} from {low} to {high}")
    return int(raw)


def heartbeat_seconds() -> int:
    """`LABBOOK_HEARTBEAT_SECONDS`, else 10: how often a study worker tells the storage it is alive."""
    return whole_number(HEARTBEAT_ENV, 10, 1, 3600)


def warm_kernels() -> int:
    """`LABBOOK_WARM_KERNELS`, else 1: kernels a pool keeps warm (0 turns the pool off)."""
    return whole_number(WARM_KERNELS_ENV, 1, 0, 64)


def fork_kernels() -> bool:
    """`LABBOOK_FORK_KERNELS` (default 1): fork kernels (and commands) from one warm process."""
    raw = os.environ.get(FORK_KERNELS_ENV, "1").strip().lower()
    if raw not in ("0", "1", "true", "false", "yes", "no", ""):
        raise ValueError(f"{FORK_KERNELS_ENV}={raw!r}: expected 1 or 0")
    return raw in ("1", "true", "yes", "")


def run_heartbeat_seconds() -> int:
    """`LABBOOK_RUN_HEARTBEAT_SECONDS`, else 30 (a run driver's heartbeat). Raises ValueError (one line)
    unless a whole number 1..3600."""
    return whole_number(RUN_HEARTBEAT_ENV, RUN_HEARTBEAT_SECONDS, 1, 3600, "seconds")


def database_url(raw: str, name: str) -> str:
    """`raw` if SQLAlchemy reads it as a database URL and, for a SQLite file, its folder exists.

    Raises ValueError (one line naming `name`, never the URL's password) otherwise: a bad URL
    found only when the study or store opens it gives a traceback after other stores were written.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(raw)
    except (ArgumentError, ValueError):
        raise ValueError(f"{name}: not a database URL; expected sqlite:///mlruns/x.db, postgresql://...") from None
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        folder = Path(url.database).expanduser().absolute().parent
        # An existing folder is the store's own business (read-only, full: said where it is opened);
        # a missing one is made by labbook, so its nearest existing ancestor must allow that.
        existing = next(f for f in (folder, *folder.parents) if f.exists())
        if not existing.is_dir() or (existing != folder and not os.access(existing, os.W_OK | os.X_OK)):
            raise ValueError(f"{name}: the SQLite file's folder {str(folder)[:200]!r} cannot be made or written")
    return raw


def store_url(name: str) -> str | None:
    """`name` as a database URL SQLAlchemy can open (sqlite:///..., postgresql://...), or None when unset."""
    raw = os.environ.get(name, "").strip()
    return database_url(raw, name) if raw else None


_TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks")


def tracking_uri() -> str | None:
    """`MLFLOW_TRACKING_URI` when set and one labbook can use: a server or a database (not MLflow's
    file store, in maintenance mode in MLflow 3, nor a bare path); ValueError in one line otherwise."""
    raw = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not raw:
        return None
    scheme = raw.split(":", 1)[0].split("+", 1)[0].lower() if ":" in raw else ""
    if scheme not in _TRACKING_SCHEMES:
        raise ValueError(
            "MLFLOW_TRACKING_URI: expected a tracking server (http://HOST:PORT) or a database "
            "(sqlite:///PATH, postgresql://...); unset it for the embedded store under ./mlruns"
        )
    return raw if scheme.startswith(("http", "databricks")) else database_url(raw, "MLFLOW_TRACKING_URI")


def readers() -> dict[str, Callable[[], object]]:
    """Each `LABBOOK_*` variable a user may set → the function that reads (and checks) it."""
    return {
        HEARTBEAT_ENV: heartbeat_seconds,
        WARM_KERNELS_ENV: warm_kernels,
        OPTUNA_STORAGE_ENV: lambda: store_url(OPTUNA_STORAGE_ENV),
        SCHEDULER_DB_ENV: lambda: store_url(SCHEDULER_DB_ENV),
        FORK_KERNELS_ENV: fork_kernels,
        KERNEL_SERVER_ENV: lambda: None,  # checked where it is used: whose socket it is (kernels.env.server_path)
        RUN_HEARTBEAT_ENV: run_heartbeat_seconds,
    }


def check() -> None:
    """Read every `LABBOOK_*` variable that is set; the first bad one raises `ValueError` (one line)."""
    for name, read in readers().items():
        if os.environ.get(name, "").strip():
            read()
    tracking_uri()
