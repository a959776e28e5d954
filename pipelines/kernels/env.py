"""What every labbook process reads from its environment about kernels and forked commands.

Standard library only (and `pipelines/specs/environment.py`, which imports no more, where every
LABBOOK_* variable is read): `pipelines.launch` (the `labbook` entry point, which must start fast)
imports it, and so do the kernel pool, the fork server and the study driver. It lived in
`launch.py` until issue 24; the kernel modules importing it from there made them import the
entry point, and through it the CLI, back.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
import sys
from pathlib import Path

from pipelines.specs import environment

ENV_SERVER = environment.KERNEL_SERVER_ENV
ENV_FORK = environment.FORK_KERNELS_ENV
ENV_PID = "LABBOOK_COMMAND_PID"  # the pid the user started: what a forked command calls itself


def quiet_defaults() -> None:
    """Process-wide settings of every labbook command, made before MLflow and nbformat are imported
    (in a kernel server too, so that its forked commands start with them). A user's own setting wins."""
    # MLflow's INFO lines ("Creating initial MLflow database tables...") are noise in a CLI.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # bars for kilobytes are noise
    environment.telemetry_off()  # so the kernels and `mlflow server` a command starts inherit it
    # nbformat (papermill's notebook reader) imports jsonschema, which imports `rfc3987_syntax` when
    # installed (jupyter-events installs it) only to offer an "iri" format check, and that import
    # builds a Lark grammar: 1.0-1.8 s of every command's start, measured with -X importtime.
    # Format checks are off unless asked for, and nothing here asks: a None entry makes that one
    # optional import fail, so jsonschema goes without the check in this process.
    sys.modules.setdefault("rfc3987_syntax", None)  # type: ignore[arg-type]


fork_enabled = environment.fork_kernels  # `LABBOOK_FORK_KERNELS` (default 1): fork kernels and commands


def server_path() -> str | None:
    """The kernel server's socket (LABBOOK_KERNEL_SERVER) when it exists, is this user's own
    (`untrusted_socket`) and forking is on; an untrusted one is refused in one line on stderr."""
    path = os.environ.get(ENV_SERVER, "").strip()
    if not path or not fork_enabled() or not Path(path).is_socket():
        return None
    problem = untrusted_socket(path)
    if problem is not None:
        _refuse(path, problem)
        return None
    return path


def untrusted_socket(path: str) -> str | None:
    """Why the socket file at `path` may not be this user's kernel server, or None when it may.

    It must be owned by this user (the symlink's target, when it is one) and writable by nobody
    else (anyone who can connect to it can run code as its owner), in a folder that others cannot
    swap it out of (not world-writable without the sticky bit, as /tmp has). The process that
    listens on it is checked on each connection (`trusted_connection`).
    """
    try:
        info = os.stat(path)
        folder = os.stat(os.path.dirname(os.path.realpath(path)) or ".")
    except OSError as exc:
        return f"cannot stat it ({exc.strerror})"
    if info.st_uid != os.getuid():
        return f"the socket belongs to uid {info.st_uid}, not to this user (uid {os.getuid()})"
    if info.st_mode & 0o022:
        return f"the socket is writable by other users (mode {stat.S_IMODE(info.st_mode):o})"
    if folder.st_mode & stat.S_IWOTH and not folder.st_mode & stat.S_ISVTX:
        return "its folder is world-writable without the sticky bit (anyone can replace the socket)"
    return None


def trusted_connection(path: str, timeout: float = 30) -> socket.socket | None:
    """A connection to the kernel server at `path` whose listening process runs as this user
    (SO_PEERCRED), checked before anything is sent; None when it is not, or cannot be reached.

    Refusing to hand over this process's environment and terminal says so in one line on stderr.
    Used by `pipelines.launch.delegate` and by the fork server's clients (`kernel_fork.RemoteZygote`).
    """
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.settimeout(timeout)
        connection.connect(path)
        uid = peer_uid(connection)
    except OSError:
        connection.close()
        return None
    if uid != os.getuid():
        connection.close()
        who = "an unknown user" if uid is None else f"uid {uid}"
        _refuse(path, f"the process listening on it runs as {who}, not as this user (uid {os.getuid()})")
        return None
    return connection


def peer_uid(connection: socket.socket) -> int | None:
    """The user id of the process at the other end of a Unix socket (Linux SO_PEERCRED), None where unknown."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None  # no way to tell on this system: never trusted
    _pid, uid, _gid = struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i")))
    return uid


_refused: set[str] = set()


def _refuse(path: str, why: str) -> None:
    """One line on stderr, once per process and socket: the kernel server is not used."""
    if path not in _refused:
        _refused.add(path)
        print(f"labbook: not using the kernel server {path}: {why}; running without it", file=sys.stderr)


PROJECT_ROOT = Path(__file__).resolve().parents[2]


def interpreter() -> str:
    """This Python and this copy of labbook, as a kernel server compares them: `.venv/bin/python`
    and the `python3.11` of a console script are the same interpreter, the same file outside the
    environment is not; and a server started from another checkout (another worktree, an editable
    install pointing elsewhere) would run that checkout's code, so the project root must match too."""
    return f"{os.path.realpath(sys.executable)} in {sys.prefix} for {PROJECT_ROOT}"
