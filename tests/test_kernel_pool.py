"""The warm kernel pool: faster trials, never at the price of isolation."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat
import pytest
from mlflow import MlflowClient

from pipelines.execution import notebook
from pipelines.kernels.kernel_pool import default_size
from tests.conftest import LABBOOK

# The pool's own kernels: its zygote's, or cold ones. The kernel server has its own test below.
pytestmark = pytest.mark.usefixtures("no_kernel_server")


def _notebook(path: Path, parameters: str, code: str) -> Path:
    """A one-cell notebook for the labbook kernel, with its papermill parameters cell."""
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(parameters)
    cell.metadata.tags = ["parameters"]
    nb.cells = [cell, nbformat.v4.new_code_cell(code)]
    nb.metadata.kernelspec = {"name": "labbook", "display_name": "labbook", "language": "python"}
    nbformat.write(nb, path)
    return path


def _probe_notebook(path: Path) -> Path:
    """A notebook that says whether a previous trial's global is visible, then sets its own."""
    return _notebook(
        path,
        "trial = 0",
        "import os, sys\n"
        "print('leaked' if 'secret' in globals() else 'clean', os.getpid(), 'torch' in sys.modules,"
        " os.getppid(), os.getpgid(0), os.getcwd(), __import__('matplotlib').rcParams['backend'])\n"
        "secret = trial",
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # the process can exit between the kill and the read: gone is not alive
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _said(executed: notebook.ExecutedNotebook) -> list[str]:
    return nbformat.read(executed.ipynb, 4).cells[2].outputs[0]["text"].split()


@pytest.mark.parametrize("fork", ["1", "0"])
def test_every_trial_gets_a_fresh_warm_kernel_and_no_globals_leak(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fork: str
) -> None:
    monkeypatch.setenv("LABBOOK_FORK_KERNELS", fork)
    probe = _probe_notebook(tmp_path / "probe.ipynb")
    seen, parents = [], set()
    trials = 3 if fork == "1" else 2  # unforked, each kernel imports torch & co. itself (~8 s of CPU)
    with notebook.warm_kernels(1) as pool:
        for trial in range(trials):
            executed = notebook.execute(probe, tmp_path / f"trial{trial}", {"trial": trial}, False, False, pool)
            assert executed.ok, executed.error
            said, pid, warmed, parent, group, cwd, backend = _said(executed)
            assert said == "clean"  # `secret`, set by the previous trial, is undefined here
            assert warmed == "True"  # the heavy imports were done before the notebook started
            assert group == pid  # its own process group, so a signal reaches what it starts
            assert Path(cwd) == Path.cwd()
            assert backend == "module://matplotlib_inline.backend_inline"  # figures show in the notebook
            seen.append(int(pid))
            parents.add(int(parent))
        handed_out = list(pool.handed_out)
        zygote = pool._zygote.process if pool._zygote else None
    assert len(set(seen)) == trials and seen == handed_out  # never the same kernel twice
    assert not any(_alive(pid) for pid in seen)  # each shut down after its one notebook
    assert not any(_alive(pid) for pid in handed_out)
    if fork == "1":  # every kernel a fork of the one process that imported torch; gone with the pool
        assert zygote is not None and parents == {zygote.pid} and zygote.poll() is not None
    else:
        assert zygote is None and parents == {os.getpid()}


def test_a_forked_kernel_that_dies_is_seen_dead_and_its_trial_fails(tmp_path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import os\nos._exit(3)")]
    nb.metadata.kernelspec = {"name": "labbook", "display_name": "labbook", "language": "python"}
    dies = tmp_path / "dies.ipynb"
    nbformat.write(nb, dies)
    probe = _probe_notebook(tmp_path / "probe.ipynb")
    with notebook.warm_kernels(1, expected=2) as pool:
        died = notebook.execute(dies, tmp_path / "died", {}, False, False, pool)
        after = notebook.execute(probe, tmp_path / "after", {"trial": 1}, False, False, pool)
    assert not died.ok and "died" in str(died.error).lower(), died.error
    assert after.ok and _said(after)[0] == "clean"  # the next kernel, forked as before


def test_the_pool_warms_no_kernel_beyond_the_notebooks_expected(tmp_path: Path) -> None:
    probe = _probe_notebook(tmp_path / "probe.ipynb")
    warm = []
    with notebook.warm_kernels(1, expected=2) as pool:
        for trial in range(3):  # one more than expected: it runs, in a cold kernel
            executed = notebook.execute(probe, tmp_path / f"trial{trial}", {"trial": trial}, False, False, pool)
            assert executed.ok, executed.error
            warm.append(_said(executed)[2])
        started = pool.started
    assert warm == ["True", "True", "False"] and started == 2  # nothing warmed for nobody


def test_a_pool_of_size_0_is_the_plain_behaviour(tmp_path: Path) -> None:
    probe = _probe_notebook(tmp_path / "probe.ipynb")
    with notebook.warm_kernels(0) as pool:
        executed = notebook.execute(probe, tmp_path / "out", {"trial": 1}, False, False, pool)
    assert executed.ok and pool.handed_out == []
    said, _, warmed, parent, *_ = _said(executed)
    assert (said, warmed, parent) == ("clean", "False", str(os.getpid()))  # a cold kernel, started by papermill


def test_the_pool_size_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABBOOK_WARM_KERNELS", "0")
    assert default_size() == 0
    monkeypatch.setenv("LABBOOK_WARM_KERNELS", "two")
    with pytest.raises(ValueError, match="LABBOOK_WARM_KERNELS='two': expected a whole number"):
        default_size()


def _server_probe(path: Path) -> Path:
    """A notebook that prints its pid, its parent's, and the preloaded helper module's VALUE."""
    return _notebook(
        path,
        "trial = 0\nsleep = 0",
        "import os, time, labbook_probe_helper\n"
        "print('leaked' if 'secret' in globals() else 'clean', os.getpid(), os.getppid(), labbook_probe_helper.VALUE)\n"
        "secret = trial\n"
        "time.sleep(sleep)",
    )


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def test_a_kernel_server_forks_every_commands_kernels_and_stops_once_code_it_imported_is_edited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    helper = tmp_path / "lib" / "labbook_probe_helper.py"  # the user's own module, preloaded
    helper.parent.mkdir()
    helper.write_text("VALUE = 'first'\n")
    monkeypatch.setenv("PYTHONPATH", str(helper.parent))
    socket_path = Path(tempfile.mkdtemp(prefix="labbook-test-")) / "k.sock"
    server = subprocess.Popen(
        [str(LABBOOK), "kernel-server", "--socket", str(socket_path), "--preload", "labbook_probe_helper"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not socket_path.is_socket():
            assert server.poll() is None and time.monotonic() < deadline, server.stdout.read()
            time.sleep(0.2)
        monkeypatch.setenv("LABBOOK_KERNEL_SERVER", str(socket_path))
        [zygote] = _children(server.pid)
        probe = _server_probe(tmp_path / "probe.ipynb")
        pids = []
        for trial in range(2):  # `labbook run` and the scheduler's runs execute one notebook like this
            executed = notebook.execute(probe, tmp_path / f"run{trial}", {"trial": trial}, False, False)
            assert executed.ok, executed.error
            said, pid, parent, value = _said(executed)
            assert (said, int(parent), value) == ("clean", zygote, "first")  # forked by the server, fresh
            pids.append(int(pid))
        assert len(set(pids)) == 2 and not any(_alive(pid) for pid in pids)

        # The command that asked for a kernel is killed (OOM, kill -9): its kernel does not live on.
        asking = subprocess.Popen(
            [sys.executable, "-c", "import sys; from pathlib import Path; from pipelines.execution import notebook; "
             "notebook.execute(Path(sys.argv[1]), Path(sys.argv[2]), {'sleep': 300}, None, False)",
             str(probe), str(tmp_path / "killed")],
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while not (orphan := [k for k in _children(zygote) if k not in pids]):
            assert time.monotonic() < deadline and asking.poll() is None
            time.sleep(0.2)
        time.sleep(1)
        asking.kill()
        asking.wait()
        deadline = time.monotonic() + 15
        while _alive(orphan[0]):
            assert time.monotonic() < deadline, "the kernel outlived the command that asked for it"
            time.sleep(0.2)

        # Its code edited, the server refuses, stops, and the notebook runs in a cold kernel with the new code.
        helper.write_text("VALUE = 'second'\n")
        os.utime(helper, ns=(time.time_ns(), time.time_ns() + 10**9))
        executed = notebook.execute(probe, tmp_path / "edited", {"trial": 3}, False, False)
        assert executed.ok, executed.error
        said, _, parent, value = _said(executed)
        assert (said, int(parent), value) == ("clean", os.getpid(), "second")
        assert server.wait(timeout=30) == 0 and not socket_path.exists()
        assert "labbook_probe_helper.py changed since it was imported" in server.stdout.read()
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(timeout=30)


def _parent(pid: int) -> int:
    """Its parent's pid; 0 once it has exited."""
    with contextlib.suppress(OSError):
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return 0


def _listening(socket_path: str) -> int:
    """The pid of the kernel server listening on `socket_path` (its zygote: it forks everything).
    Its forks share its command line; the server is the one whose parent does not."""

    def serves(pid: int) -> bool:
        with contextlib.suppress(OSError, ValueError):
            words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            return words[words.index(b"--listen") + 1] == socket_path.encode()
        return False

    [server] = [p for p in (int(d.name) for d in Path("/proc").glob("[0-9]*")) if serves(p) and not serves(_parent(p))]
    return server


def _started_for(zygote: int, before: list[int], timeout: float = 120) -> tuple[int, int]:
    """The command a `labbook` client got forked (under its supervisor), and the command's kernel."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = [p for p in _children(zygote) if p not in before]
        commands = [c for p in new for c in _children(p)]
        kernels = [p for p in new if not _children(p)]
        if commands and kernels:
            return commands[0], kernels[0]
        time.sleep(0.3)
    raise AssertionError("no forked command and kernel appeared")


def test_a_kernel_server_runs_labbook_commands_forked_with_the_callers_files_signals_and_exit_status(
    store: str, tmp_path: Path, kernel_server: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`labbook` asks the server to fork the command: its imports are done, the rest is as if run here."""
    if kernel_server is None:
        pytest.skip("LABBOOK_TEST_KERNEL_SERVER=0")
    deadline = time.monotonic() + 240
    while not Path(kernel_server).is_socket():
        assert time.monotonic() < deadline, "the session's kernel server did not start"
        time.sleep(0.5)
    monkeypatch.setenv("LABBOOK_KERNEL_SERVER", kernel_server)
    # Bad input: the caller gets the one-line error on its own stderr and exit status 2.
    bad = subprocess.run([str(LABBOOK), "run", "nope.yaml"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1, bad.stderr

    spec = str(Path(__file__).resolve().parents[1] / "pipelines" / "regression_mlp.yaml")
    long_run = ["run", spec, "--set", "max_epochs=500"]
    zygote = _listening(kernel_server)
    before = _children(zygote)
    client = subprocess.Popen([str(LABBOOK), *long_run], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    command, kernel = _started_for(zygote, before)
    # The command is not the caller's child but the server's (through the supervisor that reports its end).
    assert _children(client.pid) == [] and _parent(_parent(command)) == zygote
    time.sleep(2)
    client.send_signal(signal.SIGINT)  # Ctrl-C reaches the caller only; it is forwarded
    stdout, stderr = client.communicate(timeout=120)
    assert client.returncode == 130, stderr[-2000:]
    assert stdout.startswith("running ") and "interrupted: the same command trains from the start again" in stderr
    [cut] = MlflowClient(store).search_runs([e.experiment_id for e in MlflowClient(store).search_experiments()])
    assert cut.info.status in ("FAILED", "KILLED"), cut.info.status
    assert "notebook/train.ipynb" in [a.path for a in MlflowClient(store).list_artifacts(cut.info.run_id, "notebook")]

    # kill -9 of the caller: the command and its kernel do not live on.
    before = _children(zygote)
    client = subprocess.Popen([str(LABBOOK), *long_run], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    command, kernel = _started_for(zygote, before)
    client.kill()
    client.wait()
    deadline = time.monotonic() + 15
    while _alive(command) or _alive(kernel):
        assert time.monotonic() < deadline, "the forked command or its kernel outlived the killed caller"
        time.sleep(0.2)


@pytest.mark.fast
def test_a_kernel_server_answers_only_the_checkout_it_was_started_from() -> None:
    """Client and server each say which Python and which copy of labbook they run; a server
    started from another checkout would run that copy's code, so it refuses (the client runs cold)."""
    from pipelines.kernels import env

    assert Path(__file__).resolve().parents[1] == env.PROJECT_ROOT
    assert env.interpreter().endswith(f" for {env.PROJECT_ROOT}")


def _start_server(socket_path: Path, *preload: str) -> subprocess.Popen:
    """`labbook kernel-server` on `socket_path`, waited for until it listens (or has exited)."""
    command = [str(LABBOOK), "kernel-server", "--socket", str(socket_path)]
    command += [a for module in preload for a in ("--preload", module)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not socket_path.is_socket() and server.poll() is None:
        assert time.monotonic() < deadline, "the kernel server did not start"
        time.sleep(0.2)
    return server


def test_with_2_threads_a_preloaded_tensor_op_never_hangs_a_forked_kernel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fork of a process whose OpenMP pool has started hangs in the child's first 2-thread op
    (measured: until killed at 60 s). The server runs its imports on 1 thread, so a preloaded
    module's tensor op starts no pool and its kernels fork safely with 2 threads; a module that
    starts the pool itself is refused in one line, exit 2, and kernels then start cold."""
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "labbook_tensor_op.py").write_text("import torch\nWEIGHTS = torch.randn(512, 512) @ torch.randn(512, 512)\n")
    (lib / "labbook_omp_pool.py").write_text(
        "import torch\ntorch.set_num_threads(2)\nPRODUCT = torch.randn(512, 512) @ torch.randn(512, 512)\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(lib))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the server's, and every kernel's (conftest pins 1)
    monkeypatch.setenv("MKL_NUM_THREADS", "2")
    socket_path = Path(tempfile.mkdtemp(prefix="labbook-test-")) / "k.sock"

    refused = _start_server(socket_path, "labbook_omp_pool")
    _, stderr = refused.communicate(timeout=60)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode == 2 and len(errors) == 1, stderr[-2000:]
    assert "--preload labbook_omp_pool left the fork server multi-threaded" in errors[0] and len(errors[0]) <= 500
    assert not socket_path.exists()

    probe = _notebook(
        tmp_path / "probe.ipynb",
        "trial = 0",
        "import os, time, torch, labbook_tensor_op\n"
        "start = time.monotonic()\n"
        "for _ in range(5):\n"
        "    torch.randn(512, 512) @ torch.randn(512, 512)\n"
        "print(os.getppid(), torch.get_num_threads(), round(time.monotonic() - start, 2))",
    )
    server = _start_server(socket_path, "labbook_tensor_op")
    try:
        assert server.poll() is None, server.communicate()[1][-2000:]
        monkeypatch.setenv("LABBOOK_KERNEL_SERVER", str(socket_path))
        zygote = _listening(str(socket_path))
        for trial in range(2):
            # In its own process, so that a hung kernel fails the test after 3 minutes instead of hanging it.
            code = (
                "import sys; from pathlib import Path; from pipelines.execution import notebook; "
                "e = notebook.execute(Path(sys.argv[1]), Path(sys.argv[2]), {'trial': int(sys.argv[3])}, None, False); "
                "sys.exit(e.error)"
            )
            command = [sys.executable, "-c", code, str(probe), str(tmp_path / f"run{trial}"), str(trial)]
            run = subprocess.run(command, capture_output=True, text=True, timeout=180)
            assert run.returncode == 0, run.stderr[-2000:]
            executed = nbformat.read(tmp_path / f"run{trial}" / "probe.ipynb", 4)
            parent, threads, seconds = executed.cells[2].outputs[0]["text"].split()
            assert (int(parent), threads) == (zygote, "2"), (parent, threads)  # forked by the server, 2 threads
            assert float(seconds) < 30
    finally:
        with contextlib.suppress(AssertionError, ValueError):
            for kernel in _children(_listening(str(socket_path))):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(kernel, signal.SIGKILL)  # a hung kernel, were there one
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.fast
def test_the_fork_server_sees_a_started_openmp_pool_or_any_other_thread() -> None:
    """`unsafe_threads`: None for a process running only its main thread (and jemalloc's, which
    survives a fork); a reason once OpenMP's pool or any other thread has started."""
    code = (
        "import threading, time, torch\n"
        "from pipelines.kernels.kernel_fork import unsafe_threads\n"
        "print(unsafe_threads())\n"
        "torch.set_num_threads(2)\n"  # torch starts OpenMP's pool here already
        "torch.randn(512, 512) @ torch.randn(512, 512)\n"
        "print(unsafe_threads())\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "1"}
    said = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    before, after = said.stdout.splitlines()
    assert before == "None" and " other thread(s) run in it" in after, said.stdout + said.stderr[-2000:]
    code = "import threading, time\nfrom pipelines.kernels.kernel_fork import unsafe_threads\n"
    code += "t = threading.Thread(target=time.sleep, args=(1,)); t.start(); print(unsafe_threads()); t.join()\n"
    code += "print(unsafe_threads())\n"
    said = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert said.stdout.splitlines() == [
        "1 other thread(s) run in it (an OpenMP or BLAS pool, or a module's own thread)",
        "None",
    ], said
