"""Warm kernels: the next trial's kernel starts, and does its heavy imports, while this one trains.

A notebook trial pays ~6-8 s before its first batch on a 2-core machine (kernel start, importing
torch/Lightning/MLflow/Optuna, opening the tracking store). The pool moves that work off the
critical path without giving up isolation: every kernel runs exactly one notebook and is shut
down after it; the pool only starts kernels early. Size 0 is the plain behaviour (papermill
starts a kernel per notebook).

Each kernel is forked from one process that did the heavy imports once (kernel_fork.py), so a
pool pays them once rather than once per trial; `LABBOOK_FORK_KERNELS=0` starts every kernel as
its own process instead (the imports then run in each, at idle priority, while a trial trains).

Written here because neither papermill nor jupyter_client pre-warms kernels: nbclient accepts
an already started kernel manager (`km=`), and this module supplies one.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager

from pipelines.kernels.env import fork_enabled, server_path
from pipelines.kernels.kernel_fork import PROVISIONER, ForkedProcess, RemoteZygote, Zygote
from pipelines.kernels.warm import warm_code

ENV_SIZE = "LABBOOK_WARM_KERNELS"


def default_size() -> int:
    """`LABBOOK_WARM_KERNELS` (0 turns the pool off), else 1: one kernel warming while one trains."""
    from pipelines.specs import environment

    return environment.warm_kernels()


def kernel_server() -> RemoteZygote | None:
    """The kernel server named by `LABBOOK_KERNEL_SERVER` (a Unix socket), when forking is on."""
    path = server_path()
    return RemoteZygote(path) if path else None


def trial_threads() -> int:
    """Threads a trial's kernel gets when a pool is on: its worker's share, less one core.

    Warming next to a trial that uses every core stalls the trial's OpenMP threads (measured on
    2 cores: a 1.5 s fit took 8-15 s, even with the warming kernel at idle priority). With one
    core left to warming the same fit took 1.6 s: small models gain nothing from a second thread.
    Forked kernels import nothing while they warm, but the core still serves the worker itself
    (papermill, the next fork, MLflow); a 1-worker study of the bench trial took the same time
    with 1 or 2 trial threads (`make bench`, R3: 199 s vs 202 s for 10 trials), so the rule stays.
    """
    return max(1, default_threads() - 1)


def default_threads() -> int:
    """This process's thread share: `OMP_NUM_THREADS` (set per worker by `labbook tune --workers`) or every core."""
    share = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(share) if share.isdigit() and int(share) > 0 else (os.cpu_count() or 1)


def _set_policy(pid: int | None, policy: int) -> bool:
    """Put every thread of process `pid` under scheduling `policy`; False where not allowed.

    A kernel warms under SCHED_IDLE: its imports use only CPU the running trial leaves idle.
    Warming at normal priority next to a trial made that trial's fit 7× slower on 2 cores
    (its OpenMP threads lost their cores to the import work).
    """
    if pid is None or not hasattr(os, "sched_setscheduler"):
        return False
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            os.sched_setscheduler(int(task.name), policy, os.sched_param(0))
    except (OSError, ValueError):
        return False
    return True


class ForkingKernelSpecs(KernelSpecManager):
    """The installed kernel specs, each naming labbook's fork provisioner in its metadata:
    jupyter_client's public way to say how a kernel's process starts (its provisioner factory
    finds the class by the entry point). Given only to the pool's own kernel managers: papermill's
    cold kernels, and Jupyter's, keep the installed spec as it is."""

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        spec = super().get_kernel_spec(kernel_name)
        spec.metadata = {**spec.metadata, "kernel_provisioner": {"provisioner_name": PROVISIONER}}
        return spec


@functools.cache
def provisioner_registered() -> bool:
    """Whether ForkProvisioner's entry point is installed; an install older than it (pyproject.toml
    changed since `make setup`) starts every kernel cold, and says so once."""
    from importlib.metadata import entry_points

    if entry_points(group="jupyter_client.kernel_provisioners", name=PROVISIONER):
        return True
    print(
        f"labbook: kernels start cold: the {PROVISIONER!r} kernel provisioner is not installed (run `make setup`)",
        file=sys.stderr,
    )
    return False


def _pid(km: KernelManager) -> int | None:
    return getattr(km.provisioner, "pid", None)


class _PoolKernelManager(KernelManager):
    """A KernelManager that remembers the clients it made, so the pool can close them.

    nbclient closes its client's channels only when it started the kernel itself; given a
    manager (`km=`), it leaves them open, and each client's own zmq context kept ~10 file
    descriptors (sockets, eventfds) per notebook: a long study would run out of descriptors.
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.clients: list = []

    def client(self, **kwargs: object):  # noqa: ANN201 - jupyter_client's own return type
        made = super().client(**kwargs)
        self.clients.append(made)
        return made


@dataclass
class _Warming:
    pid: int | None = None
    awaited: bool = False  # a trial waits for this kernel: never (again) at idle priority
    lock: threading.Lock = field(default_factory=threading.Lock)


class KernelPool:
    """Hands out fresh, pre-warmed kernel managers; each is used for one notebook, then shut down."""

    def __init__(
        self,
        size: int,
        kernel_name: str,
        cwd: Path | None = None,
        tracking_uri: str | None = None,
        expected: int | None = None,
        threads: int | None = None,
    ) -> None:
        self.size = size
        # How many more notebooks will ask for a kernel (None: unknown). The pool never warms
        # more than that: a kernel nobody takes costs a core for its imports (~5 s) for nothing.
        self.expected = expected
        self.kernel_name = kernel_name
        self.cwd = str(cwd or Path.cwd())
        self.tracking_uri = tracking_uri
        self._starter = ThreadPoolExecutor(max_workers=max(1, size), thread_name_prefix="labbook-warm-kernel")
        # Each warming kernel with its process id, once known: a trial waiting for it promotes it.
        self._ready: deque[tuple[Future[KernelManager], _Warming]] = deque()
        self._lock = threading.Lock()
        self.idle_priority = hasattr(os, "SCHED_IDLE")
        self.fork = fork_enabled()
        self.threads = threads or trial_threads()
        self.handed_out: list[int | None] = []  # kernel process ids, in order: none may repeat
        self.started = 0  # kernels the pool has started (handed out, warming or wasted)
        self._zygote: Zygote | None = None
        self._zygote_lock = threading.Lock()
        for _ in range(size if expected is None else min(size, expected)):
            self._submit()

    def _submit(self) -> None:
        self.started += 1
        warming = _Warming()
        self._ready.append((self._starter.submit(self._start, warming), warming))

    def _start(self, warming: _Warming) -> KernelManager:
        """A kernel started and warmed at idle priority, handed back when its imports are done."""
        zygote = self._zygote_started()
        if zygote is not None and provisioner_registered():
            # The spec names the fork provisioner; start_kernel's keyword arguments reach its launch.
            km = _PoolKernelManager(kernel_name=self.kernel_name, kernel_spec_manager=ForkingKernelSpecs())
            launch = {"zygote": zygote}
        else:
            km, launch = _PoolKernelManager(kernel_name=self.kernel_name), {}
        # nbclient drives the kernel with asyncio; the manager itself only starts and stops it.
        km.client_class = "jupyter_client.asynchronous.AsyncKernelClient"
        threads = str(self.threads)
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        km.start_kernel(cwd=self.cwd, env=env, **launch)
        with warming.lock:
            warming.pid = _pid(km)
            if self.idle_priority and not warming.awaited:
                _set_policy(warming.pid, os.SCHED_IDLE)
        client = km.blocking_client()
        client.start_channels()
        try:
            client.wait_for_ready(timeout=120)
            forked = isinstance(getattr(km.provisioner, "process", None), ForkedProcess)
            code = warm_code(self.tracking_uri, caches=not forked)
            reply = client.execute_interactive(code, silent=True, store_history=False, timeout=300)
            if reply["content"]["status"] != "ok":
                content = reply["content"]
                raise RuntimeError(f"warming a kernel failed: {content.get('ename')}: {content.get('evalue')}")
        except BaseException:
            client.stop_channels()
            km.shutdown_kernel(now=True)
            raise
        client.stop_channels()
        return km

    def _zygote_started(self) -> Zygote | None:
        """The kernel server, else the pool's zygote, started on first use (its imports are the
        first kernel's warming)."""
        if not self.fork:
            return None
        server = kernel_server()
        if server is not None:
            return server
        with self._zygote_lock:
            if self._zygote is None and self.size > 0:
                self._zygote = Zygote()
            return self._zygote

    def take(self) -> KernelManager | None:
        """The oldest warm kernel (waiting for it if need be), and a replacement starts warming.

        None when the pool is off; a kernel that failed to warm is reported by the notebook run
        that would have used it, since papermill then starts its own.
        """
        if self.size <= 0:
            return None
        with self._lock:
            if self.expected is not None:
                self.expected = max(0, self.expected - 1)
            if not self._ready:
                return None  # more notebooks than expected: papermill starts this one cold
            future, warming = self._ready.popleft()
            if self.expected is None or len(self._ready) < min(self.size, self.expected):
                self._submit()
        if not future.done():
            # A trial now waits for this kernel: it is on the critical path, so it warms at normal
            # priority. At idle priority, other workers' trials would starve it for minutes.
            with warming.lock:
                warming.awaited = True
                if self.idle_priority and warming.pid is not None:
                    _set_policy(warming.pid, os.SCHED_OTHER)
        try:
            km = future.result()
        except Exception:
            return None  # papermill starts a cold kernel: slower, never wrong
        if not km.is_alive():
            return None
        if self.idle_priority and not _set_policy(_pid(km), os.SCHED_OTHER):
            # Not allowed back to normal priority (RLIMIT_NICE): never run a trial at idle
            # priority; warm the next kernels at normal priority instead.
            self.idle_priority = False
            self.release(km)
            return None
        self.handed_out.append(_pid(km))
        return km

    @staticmethod
    def release(km: KernelManager | None) -> None:
        """Shut a used kernel down: it never runs a second notebook."""
        if km is None:
            return
        try:
            km.shutdown_kernel(now=True)
        finally:
            km.cleanup_resources()
            for client in getattr(km, "clients", ()):
                client.stop_channels()  # closes its sockets and its own zmq context

    def close(self) -> None:
        """Shut down every kernel still warming or waiting; the pool hands out nothing after."""
        self.size = 0
        with self._lock:
            pending, self._ready = list(self._ready), deque()
        for future, _ in pending:
            with contextlib.suppress(Exception):  # a kernel that never started needs no shutdown
                self.release(future.result())
        self._starter.shutdown(wait=True)
        with self._zygote_lock:
            if self._zygote is not None:
                self._zygote.close()

    def __enter__(self) -> KernelPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
