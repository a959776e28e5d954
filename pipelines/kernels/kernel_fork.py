"""Kernels forked from one warm process: a pool pays the heavy imports once, not once per trial.

Starting kernels early (kernel_pool.py) hides their ~6-8 s of imports behind the running trial,
but the CPU is still spent once per trial, and on a busy 2-core machine that CPU is the trial's.
Here one "zygote" process imports what every training notebook needs (WARM_MODULES: torch,
Lightning, MLflow, Optuna, ...) and each kernel is an `os.fork()` of it: a new process with its
own pid, session, user namespace and sockets, running in ~0.1 s with the modules already in
memory (copy-on-write). Isolation is unchanged: the zygote never runs a notebook, so every kernel
starts from the state of a cold kernel that has imported the same modules, and each still runs
one notebook and is shut down. PyTorch's DataLoader workers and gunicorn's `--preload` start
their processes the same way.

Written here because neither jupyter_client nor papermill forks kernels; jupyter_client's hook
for how a kernel process starts is the kernel provisioner, so this is a provisioner whose launch
asks the zygote to fork, with a Popen-like handle for the rest of jupyter_client. It is used the
public way: registered as an entry point (`jupyter_client.kernel_provisioners`, pyproject.toml),
named in the kernel spec's metadata (kernel_pool.py's `ForkingKernelSpecs`), and handed its
zygote through `KernelManager.start_kernel(zygote=...)`, whose keyword arguments reach the
provisioner's launch.

Safe by construction: a fork copies only the thread that calls it, so a process whose other
threads hold locks (OpenMP's worker pool, a BLAS pool) gives children that can hang on them
(measured: a child using 2 OpenMP threads, forked after its parent ran a 2-thread matmul, hung
until killed at 60 s). The zygote therefore runs single-threaded (`_one_thread`: OpenBLAS and
torch pinned to 1 thread while it imports, each child then takes its own share), checks after
its warm-up and after each `--preload` that no other thread started (`unsafe_threads`), and
checks again before every fork. A kernel server whose preload started one refuses to start
(exit 2); a pool's zygote then says why and its pool starts cold kernels; a fork refused later
is started cold by the client.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import pkgutil
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning import LocalProvisioner

from pipelines.errors import reason
from pipelines.kernels import socket_claim
from pipelines.kernels.env import interpreter, trusted_connection

LAUNCHER = "ipykernel_launcher"
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"
# What `labbook` commands import beyond a kernel's modules, imported once by a kernel server so
# that the commands it forks (launch.py) start at once. The command line itself (`--commands`,
# `pipelines.cli:app`) is imported by each command: its consoles look at the command's own terminal.
PROVISIONER = "labbook-fork"  # ForkProvisioner's entry point name (pyproject.toml), named in kernel specs
COMMAND_MODULES = (
    "typer",
    "rich.table",
    "papermill",
    "nbconvert",
    "pipelines.execution.run",
    "pipelines.study.tune",
    "pipelines.pipeline.pipeline",
    "pipelines.reports.compare",
    "pipelines.schedule.schedule",
)
# Threads a fork is known to survive: jemalloc's background thread (pyarrow's allocator, which
# MLflow imports) is stopped before a fork and restarted in the child as needed (pthread_atfork).
FORK_SAFE_THREADS = frozenset({"jemalloc_bg_thd"})
_default_threads = 1  # torch's thread count before the zygote pinned it to 1: a child's default share


# --- in the zygote ----------------------------------------------------------------------------


def serve(
    listen: str | None = None, preload: tuple[str, ...] = (), parent: int | None = None, commands: str | None = None
) -> None:
    """The zygote: import once, then fork a kernel for every request.

    Requests are JSON lines (`args`, `cwd`, `env`); each reply is the kernel's pid. A pool's
    zygote reads them from stdin and exits when stdin closes, i.e. when the process that started
    it closes its pool or dies. A kernel server (`listen`, `labbook kernel-server`) takes them on
    a Unix socket instead, one per connection, from any labbook process of this user on this
    machine; it exits when `parent` does, on SIGTERM/Ctrl-C, or when its own code was edited.
    `commands` ("module:object", the CLI's `pipelines.cli:app`) is what a forked `labbook` command
    runs; a server given none refuses commands (their clients run them themselves). It is named,
    not imported, here: the CLI imports this module, never the other way round.
    """
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # what a kernel prints before ipykernel captures it goes to stderr, not the replies
    if sys.path and Path(sys.path[0] or ".").resolve() == Path.cwd():
        del sys.path[0]  # as ipykernel_launcher does: a kernel's path gets its own cwd back from IPython
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # exited kernels are reaped by the system: no zombies
    if listen:
        from pipelines.kernels.env import quiet_defaults

        quiet_defaults()  # as every command sets before its imports: its forked commands inherit them
    _one_thread()
    from pipelines.kernels.warm import warm_up

    warm_up()
    _still_one_thread("the warm-up")
    for name in preload:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - whatever the user's module raised: one line, exit 2
            _refuse_to_start(f"--preload {name}: importing it failed: {reason(exc)}")
        _still_one_thread(f"--preload {name}")
    for name in COMMAND_MODULES if listen else ():
        importlib.import_module(name)
    import ipykernel.kernelapp  # noqa: F401 - the kernel's own start-up modules, also shared

    _still_one_thread("importing labbook's command modules")
    sources = _own_sources() if listen else {}  # only a long-lived server checks for edits
    events = selectors.DefaultSelector()
    server = None
    claimed: socket_claim.Claim | None = None
    if not listen:
        events.register(sys.stdin, selectors.EVENT_READ, "stdin")
    else:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # and remove the socket on the way out
        try:  # never a user's file or a live server's socket; this user's alone: a request runs code as them
            server, claimed = socket_claim.claim(listen, mode=0o600)
        except socket_claim.SocketPathTaken as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        server.listen(16)
        events.register(server, selectors.EVENT_READ, "socket")
    replies.write("ready\n")
    try:
        while True:
            for key, _ in events.select(timeout=1.0):
                if key.data == "stdin":
                    line = sys.stdin.readline()
                    if not line:
                        return  # stdin closed: the pool (or the server's starter) is gone
                    unsafe = unsafe_threads()  # cold kernels rather than one that hangs
                    pid = _fork(json.loads(line), [replies, server]) if unsafe is None else f"refused: {unsafe}"
                    replies.write(f"{pid}\n")
                else:
                    assert server is not None
                    if not _answer(server, sources, replies, commands):
                        return
            if parent is not None and not _running(parent):
                return
    finally:
        if server is not None:
            server.close()
            with contextlib.suppress(OSError):
                if claimed is not None:
                    socket_claim.release(claimed)  # only while the path is still our socket


def _one_thread() -> None:
    """Keep the zygote single-threaded while it imports: forking is safe only then (see above).

    OpenBLAS (numpy's and scipy's) starts its thread pool when it loads, so it is told to start
    none; torch's OpenMP pool starts at the first parallel op, so torch runs on 1 thread here
    (the warm-up's and a preloaded module's ops included). Each child sets its own share
    (`_threads_from_env`). Must run before numpy or torch is imported; if either already was,
    the checks below still see any pool that started.
    """
    global _default_threads
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    import torch

    _default_threads = torch.get_num_threads()  # OMP_NUM_THREADS, else torch's default: a child's share
    torch.set_num_threads(1)


def unsafe_threads() -> str | None:
    """Why forking this process now could hang the child, or None when it is safe.

    Safe: no thread besides the calling one, except those in FORK_SAFE_THREADS. Any other thread
    (OpenMP's or a BLAS pool's workers, a module's own thread) may hold a lock the child then
    waits for forever. Where the threads cannot be listed (no /proc), forking is never safe.
    """
    me = threading.get_native_id()
    try:
        tasks = [int(task) for task in os.listdir("/proc/self/task")]
    except OSError:
        return "this process's threads cannot be listed (no /proc/self/task)"
    others = 0
    for task in tasks:
        if task == me:
            continue
        try:
            name = Path(f"/proc/self/task/{task}/comm").read_text().strip()
        except OSError:
            continue  # it has exited meanwhile
        others += name not in FORK_SAFE_THREADS
    if others:
        return f"{others} other thread(s) run in it (an OpenMP or BLAS pool, or a module's own thread)"
    return None


def _still_one_thread(what: str) -> None:
    """Stop the zygote before it forks anything if `what` left it multi-threaded."""
    why = unsafe_threads()
    if why is not None:
        _refuse_to_start(f"{what} left the fork server multi-threaded: {why}, and a fork of it can hang")


def _refuse_to_start(why: str) -> None:
    """One line on stderr, exit 2: a kernel server is not started; a pool's zygote never says ready
    (its pool then starts every kernel cold)."""
    print(reason(f"error: {why}; kernels will start cold without this server"), file=sys.stderr)
    raise SystemExit(2)


def _own_sources() -> dict[str, int]:
    """Source files of the imported modules that live outside the Python installation (this
    project's `lightning_modules/` and `pipelines/`, preloaded modules), with their mtimes."""
    installed = tuple(str(Path(p).resolve()) for p in {sys.prefix, sys.base_prefix, sys.exec_prefix})
    found: dict[str, int] = {}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and path.endswith(".py") and not str(Path(path).resolve()).startswith(installed):
            with contextlib.suppress(OSError):
                found[path] = os.stat(path).st_mtime_ns
    return found


def _stale(sources: dict[str, int]) -> str | None:
    """The first imported source file edited since the server imported it, if any."""
    for path, mtime in sources.items():
        try:
            if os.stat(path).st_mtime_ns != mtime:
                return path
        except OSError:
            return path
    return None


def _answer(server: socket.socket, sources: dict[str, int], replies, commands: str | None = None) -> bool:
    """Fork a kernel, or a command, for one socket request; False when the server must stop (its code changed)."""
    connection, _ = server.accept()
    fds: list[int] = []
    with connection:
        connection.settimeout(10)
        try:
            request, fds = _request(connection)
        except (OSError, ValueError):
            _close(fds)
            return True
        try:
            if request.get("python") != interpreter():
                connection.sendall(f"refused: this server runs {interpreter()}\n".encode())
                return True
            unsafe = unsafe_threads()
            if unsafe is not None:  # never reached while the start-up checks hold; cold kernels, never a hang
                connection.sendall(f"refused: cannot fork safely: {unsafe}\n".encode())
                return True
            edited = _stale(sources)
            if edited is not None:
                # Its kernels would run the code as it was when the server started: refuse, and stop,
                # so that every later command starts its kernels cold until the server is restarted.
                print(f"labbook kernel server: {edited} changed since it was imported; stopping", file=sys.stderr)
                connection.sendall(f"stale: {edited}\n".encode())
                return False
            if "command" in request:
                if not commands:
                    connection.sendall(b"refused: this server forks kernels only\n")
                    return True
                _fork_command(request, fds, connection, [replies, server], commands)
                return True
            pid = _fork(request, [replies, server, connection])
            connection.sendall(f"{pid}\n".encode())
        finally:
            _close(fds)
    return True


def _request(connection: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """One JSON line, with the file descriptors sent along with it (a command's stdin/out/err)."""
    data, fds = b"", []
    while not data.endswith(b"\n"):
        chunk, received, _, _ = socket.recv_fds(connection, 1 << 16, 3)
        fds += received
        if not chunk:
            raise ValueError("the request ended early")
        data += chunk
    return json.loads(data), fds


def _close(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _fork(request: dict[str, Any], close: list) -> int:
    """A kernel forked for `request`; in the child, the zygote's own files are closed first."""
    pid = os.fork()
    if pid == 0:
        for item in close:
            if item is not None:
                with contextlib.suppress(OSError):
                    item.close()
        _become_kernel(request)
    return pid


def _become_kernel(request: dict[str, Any]) -> None:
    """In the forked child: the process a kernel launch would have started, then the kernel. Never returns."""
    code = 1
    try:
        code = _status(lambda: _run_kernel(request))
    finally:
        os._exit(code)


def _run_kernel(request: dict[str, Any]) -> None:
    os.setsid()  # its own process group, as jupyter_client starts kernels: signals reach its children
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a kernel server's own handler is not the kernel's
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the kernel waits for its own subprocesses
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # the zygote's request pipe is not the kernel's stdin
    os.close(null)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    watched = request["env"].get("JPY_PARENT_PID", "")
    if watched.isdigit():
        # The process that asked for this kernel may not be its parent (a kernel server's
        # kernels are the server's children): exit when it is gone, as a cold kernel does.
        threading.Thread(target=_exit_without, args=(int(watched),), daemon=True).start()
    if "matplotlib" in sys.modules:
        # matplotlib read MPLBACKEND when the zygote imported it, before ipykernel sets it to
        # the inline backend (kernelapp does, unless set): choose it as a cold kernel would.
        # The backend loads at the notebook's first figure, once the shell exists.
        import matplotlib

        matplotlib.rcParams["backend"] = request["env"].get("MPLBACKEND") or INLINE_BACKEND
    _threads_from_env()
    args = list(request["args"])
    parent = request["env"].get("JPY_PARENT_PID", "")
    if parent.isdigit():
        # ipykernel read JPY_PARENT_PID when the zygote imported it; a kernel whose parent is
        # not that pid exits once it is orphaned (the zygote exits with the pool).
        args.append(f"--IPKernelApp.parent_handle={parent}")
    sys.argv = [LAUNCHER, *args]
    from ipykernel import kernelapp

    kernelapp.launch_new_instance(argv=args)


def _exit_without(pid: int) -> None:
    while _running(pid):
        time.sleep(1.0)
    os._exit(1)


def _fork_command(
    request: dict[str, Any], fds: list[int], connection: socket.socket, close: list, commands: str
) -> None:
    """A `labbook` command forked for a client (launch.py), under a supervisor that reports its end.

    The supervisor (a fork of the zygote) forks the command, tells the client its pid, and waits:
    it sends `exit N` when the command ends (128 + the signal if one killed it), and kills the
    command's process group when the client goes away (`kill -9` of the client included).
    """
    if os.fork() != 0:
        return  # the server: its copies of the descriptors and the connection are closed by the caller
    code = 1
    try:
        for item in close:
            with contextlib.suppress(OSError):
                item.close()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # this process waits for the command
        pid = os.fork()
        if pid == 0:
            connection.close()
            _become_command(request, fds, commands)
        _close(fds)
        connection.settimeout(None)
        connection.sendall(f"pid {pid}\n".encode())
        status = _supervise(pid, connection)
        with contextlib.suppress(OSError):
            connection.sendall(f"exit {status}\n".encode())
        code = 0
    finally:
        os._exit(code)


def _supervise(pid: int, connection: socket.socket) -> int:
    """Wait for the command; kill its process group if the client hangs up first. Its exit status."""
    events = selectors.DefaultSelector()
    events.register(connection, selectors.EVENT_READ)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            return code if code >= 0 else 128 - code
        if events.select(timeout=0.2):
            try:
                gone = connection.recv(1) == b""
            except OSError:
                gone = True
            if gone:  # the client died or was killed: so is its command, as if it were the client
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
                events.unregister(connection)


def _become_command(request: dict[str, Any], fds: list[int], commands: str) -> None:
    """In the forked child: `labbook <command>` with the client's cwd, environment and stdio. Never returns."""
    code = 1
    try:
        code = _status(lambda: _run_command(request, fds, commands))
    finally:
        # What the interpreter does on exit (its threads joined, atexit handlers run), short of
        # tearing down the modules the zygote imported: pyzmq's teardown can hang (see main()).
        with contextlib.suppress(BaseException):
            # CPython's private `threading._shutdown`, as the interpreter's exit calls it: it first
            # runs the hooks registered with `threading._register_atexit` (concurrent.futures tells
            # its pool workers to stop there), then joins the threads. Joining them with public calls
            # alone waits forever on an idle ThreadPoolExecutor worker (MLflow's artifact uploads:
            # `labbook rerun` hung for 10 minutes); no public API runs those hooks.
            threading._shutdown()  # type: ignore[attr-defined]
        with contextlib.suppress(BaseException):
            import atexit

            # No public API runs the atexit handlers short of the interpreter's own exit (which
            # would tear the modules down): CPython's private `_run_exitfuncs` is the way.
            atexit._run_exitfuncs()
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _run_command(request: dict[str, Any], fds: list[int], commands: str) -> None:
    os.setpgid(0, 0)  # its own process group: the supervisor kills it with everything it started
    for target, fd in enumerate(fds[:3]):
        os.dup2(fd, target)
    _close(fds)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    _threads_from_env()
    import logging

    # MLflow configured its loggers when the server imported it: this command's setting instead.
    logging.getLogger("mlflow").setLevel(os.environ.get("MLFLOW_LOGGING_LEVEL", "WARNING").upper())
    if "matplotlib" in sys.modules and os.environ.get("MPLBACKEND"):
        import matplotlib

        matplotlib.rcParams["backend"] = os.environ["MPLBACKEND"]
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.argv = ["labbook", *request["command"]]
    pkgutil.resolve_name(commands)()


def _status(work: Callable[[], object]) -> int:
    """The exit status `work` gives the process it runs in: 0, its SystemExit's, or 1 (with the
    traceback on stderr). A forked child must never return to the zygote's loop, whatever happens."""
    try:
        work()
        return 0
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:  # noqa: BLE001 - whatever it was: said on stderr, then the exit status says it
        import traceback

        traceback.print_exc()
        return 1


def _threads_from_env() -> None:
    """This child's thread share, as a cold process of its environment would take it: the zygote
    ran on 1 thread (`_one_thread`). torch: OMP_NUM_THREADS, else the zygote's default; the BLAS
    libraries: OPENBLAS_NUM_THREADS, else OMP_NUM_THREADS, else every core this process may use."""
    import threadpoolctl
    import torch

    def share(*names: str, default: int) -> int:
        for name in names:
            value = os.environ.get(name, "").strip()
            if value.isdigit() and int(value) > 0:
                return int(value)
        return default

    torch.set_num_threads(share("OMP_NUM_THREADS", default=_default_threads))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threadpoolctl.threadpool_limits(share("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", default=cores), user_api="blas")


# --- in the process that starts kernels -------------------------------------------------------


class Zygote:
    """A started zygote process; `fork()` returns a new kernel's pid. Thread-safe."""

    def __init__(self, env: dict[str, str] | None = None, timeout: float = 300) -> None:
        self._lock = threading.Lock()
        self._pending = b""
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pipelines.kernels.kernel_fork"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self.ready = self._read(timeout) == "ready"

    def _read(self, timeout: float) -> str:
        """The zygote's next line, or "" if none came in `timeout` s. A zygote that missed one is
        not asked again: its late reply would be read as the answer to the next request."""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._pending:
                left = deadline - time.monotonic()
                chunk = os.read(fd, 4096) if left > 0 and selector.select(left) else b""
                if not chunk:
                    self.ready = False
                    return ""
                self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line.decode().strip()

    def fork(self, args: list[str], cwd: str, env: dict[str, str]) -> int | None:
        """A kernel forked with these launcher arguments, cwd and environment; None if the zygote is gone."""
        with self._lock:
            if not self.ready or self.process.poll() is not None:
                return None
            assert self.process.stdin is not None
            try:
                self.process.stdin.write((json.dumps({"args": args, "cwd": cwd, "env": env}) + "\n").encode())
                self.process.stdin.flush()
            except OSError:
                return None
            reply = self._read(30)
        return int(reply) if reply.isdigit() else None

    def close(self) -> None:
        """Stop forking; kernels already forked live on until they are shut down."""
        with self._lock:
            self.ready = False
            with contextlib.suppress(OSError):
                if self.process.stdin:
                    self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            if self.process.stdout:
                self.process.stdout.close()


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


class ForkedProcess:
    """The Popen-like handle jupyter_client keeps for a kernel, for a process this one did not start.

    The zygote is its parent (and reaps it), so there is no exit status to read: an exited
    kernel reports -1.
    """

    stdin = stdout = stderr = None

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and not _running(self.pid):
            self.returncode = -1
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
            time.sleep(0.05)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


class ForkProvisioner(LocalProvisioner):
    """LocalProvisioner, except that the kernel process is a fork of the zygote given to
    `KernelManager.start_kernel(zygote=...)` (a `Zygote` or `RemoteZygote`) where it can be.

    No zygote, a kernel command other than `<this python> ... -m ipykernel_launcher ...`, or a
    zygote that is gone or refuses: the kernel starts as LocalProvisioner starts it.
    """

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        zygote: Zygote | RemoteZygote | None = kwargs.pop("zygote", None)  # never a Popen argument
        args = _launcher_args(cmd)
        pid = None
        if args is not None and zygote is not None:
            cwd = str(kwargs.get("cwd") or Path.cwd())
            # What jupyter_client's launcher sets: the kernel exits when this process is gone.
            env = {**(kwargs.get("env") or os.environ), "JPY_PARENT_PID": str(os.getpid())}
            pid = zygote.fork(args, cwd, env)
        if pid is None:
            return await super().launch_kernel(cmd, **kwargs)
        # LocalProvisioner's own (public) attributes, as its launch sets them: the rest of it
        # (poll, wait, signals, shutdown) then works on the forked process.
        self.process = ForkedProcess(pid)
        # The child makes itself a process-group leader; until it has, killpg(pid) finds no group
        # and LocalProvisioner falls back to signalling the process alone.
        self.pid = self.pgid = pid
        self.cwd = kwargs.get("cwd", Path.cwd())
        return self.connection_info


def _launcher_args(cmd: list[str]) -> list[str] | None:
    """The arguments after `-m ipykernel_launcher` when `cmd` runs it with this Python, else None."""
    if len(cmd) < 3 or Path(cmd[0]).resolve() != Path(sys.executable).resolve():
        return None
    for i in range(1, len(cmd) - 1):
        if cmd[i] == "-m" and cmd[i + 1] == LAUNCHER:
            return cmd[i + 2 :]
    return None


class RemoteZygote:
    """A kernel server's zygote, reached on its Unix socket (`LABBOOK_KERNEL_SERVER`)."""

    ready = True

    def __init__(self, path: str) -> None:
        self.path = path

    def fork(self, args: list[str], cwd: str, env: dict[str, str]) -> int | None:
        """A kernel forked by the server; None when it is gone, refuses or is stale (start one cold)."""
        request = {"args": args, "cwd": cwd, "env": env, "python": interpreter()}
        connection = trusted_connection(self.path)  # the environment goes to this user's own server only
        if connection is None:
            return None
        try:
            with connection:
                connection.sendall((json.dumps(request) + "\n").encode())
                with connection.makefile("r") as stream:
                    reply = stream.readline().strip()
        except (OSError, ValueError):
            return None
        return int(reply) if reply.isdigit() else None

    def close(self) -> None:
        """The server outlives this process's pools."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.kernels.kernel_fork")
    parser.add_argument("--listen", help="also take requests on this Unix socket (a kernel server)")
    parser.add_argument("--preload", action="append", default=[], help="a module to import once, too")
    parser.add_argument("--parent", type=int, help="exit when this process does")
    parser.add_argument("--commands", help="module:object that runs a forked `labbook` command (pipelines.cli:app)")
    options = parser.parse_args(argv)
    code = 1
    try:
        code = _status(
            lambda: serve(options.listen, tuple(options.preload), options.parent, options.commands)
        )  # SIGTERM: 0
    finally:
        # Leave without the interpreter's exit handlers: pyzmq's wait for sockets that the
        # imported modules hold kept a stopped server alive, orphaned, holding ~500 MB.
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    main()
