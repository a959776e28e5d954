"""The `labbook` entry point: hand the command to a kernel server when one runs, else run it here.

Every `labbook` command pays 3-5 s of CPU importing MLflow, papermill and nbconvert before it
does anything (measured with -X importtime on a 2-core machine). A kernel server
(`labbook kernel-server`, LABBOOK_KERNEL_SERVER) has imported them already, so this process asks
it to fork the command instead: the fork runs the real CLI with this process's arguments,
working directory, environment, stdin, stdout and stderr (passed over the Unix socket), and this
process waits, forwards Ctrl-C and SIGTERM, and exits with the command's status. When this
process dies (`kill -9` included), the command is killed too. No server, a refusing or stale
one, or LABBOOK_FORK_KERNELS=0: the command runs here, as it always did.

A request carries this process's whole environment (credentials included) and its terminal, and
the server runs code as whoever started it: nothing is sent to a socket, or a process behind it,
that is not this user's own (`trusted_connection`); such a server is refused in one line on
stderr and the command runs here.

Only the standard library is imported here: this module is what every command starts with.
Written by hand because nailgun-style forking servers exist for the JVM, not for Python CLIs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import struct
import sys
from pathlib import Path

ENV_SERVER = "LABBOOK_KERNEL_SERVER"
ENV_FORK = "LABBOOK_FORK_KERNELS"
ENV_PID = "LABBOOK_COMMAND_PID"  # the pid the user started: what a forked command calls itself
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
NOT_FORKED = ("kernel-server",)  # the server itself; a command that starts one must not ask one


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


def interpreter() -> str:
    """This Python, as a kernel server compares it: `.venv/bin/python` and the `python3.11` of a
    console script are the same interpreter, the same file outside the environment is not."""
    return f"{os.path.realpath(sys.executable)} in {sys.prefix}"


def main() -> None:
    """Console entry point (`labbook`)."""
    os.environ.pop(ENV_PID, None)  # inherited from a forked command that started this one
    arguments = sys.argv[1:]
    with contextlib.suppress(ValueError):  # a bad LABBOOK_FORK_KERNELS: the CLI says so, running here
        path = server_path()
        if path is not None and not (arguments[:1] and arguments[0] in NOT_FORKED):
            code = delegate(path, arguments)
            if code is not None:
                sys.stdout.flush()
                sys.exit(code)
    from pipelines.cli import app

    app()


def delegate(path: str, arguments: list[str]) -> int | None:
    """Run `labbook <arguments>` forked by the server at `path`; its exit status, or None if it
    was not started there (no server, refused, stale): the caller then runs it itself."""
    request = {
        "command": arguments,
        "cwd": os.getcwd(),
        "env": {**os.environ, ENV_PID: str(os.getpid())},
        "python": interpreter(),
    }
    connection = trusted_connection(path)
    if connection is None:
        return None
    try:
        # This process's stdin, stdout and stderr become the command's (SCM_RIGHTS).
        socket.send_fds(connection, [(json.dumps(request) + "\n").encode()], [0, 1, 2])
        replies = connection.makefile("r")
        first = replies.readline().split()
    except (OSError, ValueError):
        connection.close()
        return None
    if first[:1] != ["pid"] or not first[1:2] or not first[1].isdigit():
        connection.close()
        return None  # refused (another Python) or stale (its code was edited): run it here
    command = int(first[1])
    previous = {}
    for signum in FORWARDED:  # Ctrl-C reaches this process only: the command is the server's child
        previous[signum] = signal.signal(signum, lambda signum, frame: _forward(command, signum))
    connection.settimeout(None)
    try:
        last = replies.readline().split()  # "exit N" once the command has ended
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        connection.close()
    if last[:1] == ["exit"] and last[1:2] and last[1].lstrip("-").isdigit():
        return int(last[1])
    print("labbook: the kernel server ended before the command did", file=sys.stderr)
    return 1


def _forward(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
