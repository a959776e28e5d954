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
that is not this user's own (`trusted_connection`, in `pipelines.kernels.env`, which the fork
server's clients use too); such a server is refused in one line on stderr and the command runs here.

Only the standard library is imported here (and `pipelines.kernels.env`, which imports no more):
this module is what every command starts with. It is the one module besides the CLI's own
package that imports the CLI (`pipelines.cli`); nothing imports this module back.
Written by hand because nailgun-style forking servers exist for the JVM, not for Python CLIs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys

from pipelines.kernels.env import ENV_PID, interpreter, server_path, trusted_connection

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
NOT_FORKED = ("kernel-server",)  # the server itself; a command that starts one must not ask one


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


if __name__ == "__main__":  # python -m pipelines.launch: the `labbook` command without its console script
    main()
