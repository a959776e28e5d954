"""Shared fixtures: a fresh SQLite tracking store per test and a way to call the real CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

# One compute thread per process, inherited by every CLI, worker and kernel a test starts: the
# suite runs 2 tests at once on 2 cores (`-n 2`), and torch's OpenMP threads contending for taken
# cores stall instead of sharing them (a 1.5 s fit took 8-15 s), as `labbook tune --workers` knows.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import mlflow  # noqa: E402
import nbformat  # noqa: E402
import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LABBOOK = Path(sys.executable).with_name("labbook")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "fast: no notebook, no kernel server; `make test-fast` runs only these (the inner loop)"
    )


@pytest.fixture(autouse=True)
def _kernel_server_unless_fast(request: pytest.FixtureRequest) -> None:
    """Every test but the `fast` ones gets the session's kernel server, started on first need."""
    if request.node.get_closest_marker("fast") is None:
        request.getfixturevalue("kernel_server")


@pytest.fixture(scope="session")
def kernel_server() -> Iterator[str | None]:
    """One kernel server per test process (`labbook kernel-server`), used by every command a test starts.

    Each notebook still runs in a fresh kernel process of its own; only the ~8 s of CPU a cold
    kernel spends importing torch, Lightning and MLflow is paid once per test process instead of
    once per notebook (most of the suite's CPU); `labbook` commands are forked from it too
    (launch.py). The session waits for it to listen. The default path (no server) keeps its own
    tests: `no_kernel_server` below. LABBOOK_TEST_KERNEL_SERVER=0 runs the whole suite without it.
    """
    if os.environ.get("LABBOOK_TEST_KERNEL_SERVER", "1") == "0":
        yield None
        return
    folder = tempfile.mkdtemp(prefix="labbook-kernels-")  # short: a Unix socket path has ~100 bytes
    path = os.path.join(folder, "kernels.sock")
    command = [sys.executable, "-m", "pipelines.kernels.kernel_fork", "--listen", path, "--parent", str(os.getpid())]
    command += ["--commands", "pipelines.cli:app"]  # it forks `labbook` commands too
    with open(os.path.join(folder, "server.log"), "w") as log:
        server = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
    # Wait for it: tests started meanwhile would import in their own processes what it is
    # importing, on the same 2 cores, and gain nothing from it.
    deadline = time.monotonic() + 300
    while not os.path.exists(path) and server.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.environ["LABBOOK_KERNEL_SERVER"] = path
    yield path
    os.environ.pop("LABBOOK_KERNEL_SERVER", None)
    server.terminate()
    server.wait(timeout=30)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def no_kernel_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernels as labbook starts them by default: cold, or forked by the pool's own zygote."""
    monkeypatch.delenv("LABBOOK_KERNEL_SERVER", raising=False)


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh embedded store (`<tmp>/mlruns/mlflow.db`), set as the tracking URI, cwd = tmp."""
    (tmp_path / "mlruns").mkdir()
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # MLflow's fluent API keeps a process-wide URI, and `compare()`/`promote()` pin it: point it
    # at this test's store, or `load_model("runs:/...")` would search the previous test's store.
    mlflow.set_tracking_uri(uri)
    monkeypatch.chdir(tmp_path)
    return uri


def labbook(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the installed `labbook` command as a user would."""
    return subprocess.run(
        [str(LABBOOK), *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


def metric_only_notebook(tmp_path: Path, seconds: float = 0.0) -> Path:
    """A trial notebook that logs its metric and nothing else: the stores' concurrency is under test.

    It imports MLflow only (not torch or Lightning): for tests of how studies share their stores,
    not of training (run them with `LABBOOK_WARM_KERNELS=0`: warm kernels would import torch).
    `seconds` keeps each trial running that long (idle), so that every worker gets trials.
    """
    nb = nbformat.v4.new_notebook()
    parameters = nbformat.v4.new_code_cell('lr = 0.01\ntracking_uri = ""\nrun_id = ""')
    parameters.metadata.tags = ["parameters"]
    log = "from mlflow import MlflowClient\n\nMlflowClient(tracking_uri).log_metric(run_id, 'val_r2', -abs(lr - 0.01))"
    log += f"\n__import__('time').sleep({seconds})"
    nb.cells = [parameters, nbformat.v4.new_code_cell(log)]
    nb.metadata.kernelspec = {"name": "labbook", "display_name": "labbook", "language": "python"}
    path = tmp_path / "metric_only.ipynb"
    nbformat.write(nb, path)
    return path
