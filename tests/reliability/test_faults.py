"""Faults inside a trial, bad input and hostile values: real notebooks, real stores, nothing lost.

Each test names the fault of the reliability issue it covers (see README, "What happens when…").
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import nbformat
import optuna
import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient

from pipelines.execution import notebook
from pipelines.specs.spec import PROJECT_ROOT
from tests.conftest import LABBOOK, labbook, metric_only_notebook

SPECS = PROJECT_ROOT / "pipelines"


def _spec(tmp_path: Path, raw: dict, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def _train_notebook_with(tmp_path: Path, source: str, after: str = "trainer.fit(") -> Path:
    """The train notebook with one extra cell after the cell containing `after`."""
    nb = nbformat.read(PROJECT_ROOT / "notebooks" / "train.ipynb", as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if after in c.source)
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(source))
    path = tmp_path / "faulty.ipynb"
    nbformat.write(nb, path)
    return path


def _tiny_study(tmp_path: Path, **changes: object) -> dict:
    raw = yaml.safe_load((SPECS / "regression_tune.yaml").read_text())
    raw["trainer"]["max_epochs"] = 2
    raw["tune"]["pruner"] = "none"
    raw.update(changes)
    return raw


def _trials(store: str, tmp_path: Path, name: str = "regression_tune") -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}").trials


def test_2_a_kernel_that_dies_fails_its_trial_and_the_study_goes_on(store: str, tmp_path: Path) -> None:
    nb = _train_notebook_with(tmp_path, "import os\nif trial_number == 0:\n    os._exit(1)  # the kernel dies")
    spec = _spec(tmp_path, _tiny_study(tmp_path, notebook=str(nb)))
    done = labbook("tune", str(spec), "--n-trials", "2", "--no-report", "--no-register")
    assert done.returncode == 0, done.stderr[-2000:]
    first, second = _trials(store, tmp_path)
    assert first.state.name == "FAIL" and first.user_attrs["error"].startswith("kernel died"), first.user_attrs
    assert second.state.name == "COMPLETE"  # the study went on with the next trial
    client = MlflowClient(store)
    run = client.get_run(first.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["labbook.error"].startswith("kernel died")
    assert "notebook/faulty.ipynb" in [a.path for a in client.list_artifacts(run.info.run_id, "notebook")]


def test_3_a_non_finite_loss_stops_the_trial_at_once_and_fails_it_with_the_reason(store: str, tmp_path: Path) -> None:
    raw = _tiny_study(tmp_path)
    raw["trainer"]["max_epochs"] = 5
    raw["optim"] = {"optimizer": "sgd", "lr": 1.0, "momentum": 0.0}
    raw["tune"]["space"] = {"lr": {"type": "float", "low": 1.0e12, "high": 1.0e13, "log": True}}  # diverges
    spec = _spec(tmp_path, raw)
    done = labbook("tune", str(spec), "--n-trials", "2", "--no-report", "--no-register")
    assert done.returncode == 1  # no trial completed: said in one line
    assert "non-finite loss" in done.stderr
    client = MlflowClient(store)
    for trial in _trials(store, tmp_path):
        assert trial.state.name == "FAIL" and trial.value is None
        assert trial.user_attrs["error"].startswith("FloatingPointError: non-finite loss"), trial.user_attrs
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "FAILED"
        history = client.get_metric_history(run.info.run_id, "train_loss")
        assert len(history) <= 1  # stopped in its first epoch, not after 5 epochs of NaN


BAD_SPECS = [
    ("name: x\nmodel: [unclosed\n", "line 3: malformed YAML"),
    ("model: !!python/object/apply:os.system ['touch pwned']\n", "could not determine a constructor"),
    ({"model": {"name": "mlp_regressor", "hiden": 3}}, "model: 'hiden' is not a setting"),
    ({"optim": {"lr": "fast"}}, "optim.lr: Input should be a valid number"),
    ({"model": {"name": "resnet9000"}}, "model: unknown model 'resnet9000'; known: cnn"),
    ({"data": {"name": "imagenet"}}, "data: unknown data 'imagenet'"),
    ({"tune": {"sampler": "bogus"}}, "sampler"),
    ({"tune": {"pruner": "bogus"}}, "pruner"),
    ({"tune": {"space": {"lr": {"type": "float", "low": 1.0, "high": 0.1}}}}, "empty range"),
    ({"tune": {"space": {"lr": {"type": "float", "low": 0.0, "high": 1.0, "log": True}}}}, "needs low > 0"),
    ({"notebook": "notebooks/nope.ipynb"}, "notebook: no such notebook"),
    ({"trainer": {"ckpt_path": "latest"}}, "trainer.ckpt_path: expected 'last' or a path to a .ckpt file"),
]


def _bad_spec(tmp_path: Path, edit: str | dict) -> Path:
    spec = tmp_path / "bad.yaml"
    if isinstance(edit, str):
        spec.write_text(edit)
        return spec
    raw = yaml.safe_load((SPECS / "regression_tune.yaml").read_text())
    for section, value in edit.items():
        if isinstance(value, dict) and isinstance(raw.get(section), dict):
            raw[section] = {**raw[section], **value}
        else:
            raw[section] = value
    return _spec(tmp_path, raw, "bad.yaml")


@pytest.mark.parametrize(("edit", "expected"), BAD_SPECS)
def test_7_bad_specs_are_one_line_naming_the_file_and_field(tmp_path: Path, edit: str | dict, expected: str) -> None:
    from pipelines.specs.spec import SpecError, load_spec

    with pytest.raises(SpecError) as raised:
        load_spec(_bad_spec(tmp_path, edit))
    message = str(raised.value)
    assert "\n" not in message and "bad.yaml" in message, message
    assert expected in message, message
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(("edit", "expected"), [BAD_SPECS[0], BAD_SPECS[4], BAD_SPECS[8]])
def test_7_bad_specs_exit_2_from_the_command_line_and_write_nothing(
    store: str, tmp_path: Path, edit: str | dict, expected: str
) -> None:
    done = labbook("tune", str(_bad_spec(tmp_path, edit)), "--n-trials", "1")
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "bad.yaml" in lines[0], lines
    assert expected in lines[0], lines[0]
    assert not (tmp_path / "mlruns" / "mlflow.db").exists() and not (tmp_path / "mlruns" / "optuna.db").exists()


HOSTILE = {
    "quotes": "it's \"quoted\" '''triple''' \"\"\"",
    "newlines": "line one\nline two\r\n\tend",
    "code": "__import__('os').system('touch pwned')",
    "breakout": '"; __import__("os").system("touch pwned"); x = "',
    "backslashes": "C:\\path\\to\\file\\",
    "long": "x" * 100_000,
    "unicode": "ünïcödé 🧪 中文 \u202e",
}


def test_8_hostile_parameter_values_reach_the_notebook_as_data_never_as_code(tmp_path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    parameters = nbformat.v4.new_code_cell("\n".join(f"{name} = ''" for name in HOSTILE))
    parameters.metadata.tags = ["parameters"]
    echo = nbformat.v4.new_code_cell(f"import json\nprint(json.dumps({{n: globals()[n] for n in {list(HOSTILE)!r}}}))")
    nb.cells = [parameters, echo]
    nb.metadata.kernelspec = {"name": "labbook", "display_name": "labbook", "language": "python"}
    path = tmp_path / "echo.ipynb"
    nbformat.write(nb, path)

    executed = notebook.execute(path, tmp_path / "out", dict(HOSTILE), cwd=tmp_path, progress_bar=False)
    assert executed.ok, executed.error
    cells = nbformat.read(executed.ipynb, as_version=4).cells
    assert json.loads(cells[2].outputs[0]["text"]) == HOSTILE  # every value exactly as given
    injected = cells[1]
    assert "injected-parameters" in injected.metadata.tags
    assert not (tmp_path / "pwned").exists()  # nothing was executed


def test_8_hostile_values_from_a_spec_and_set_are_data(store: str, tmp_path: Path) -> None:
    raw = yaml.safe_load((SPECS / "digits_mlp.yaml").read_text())
    raw["experiment"] = HOSTILE["breakout"]
    raw["trainer"]["max_epochs"] = 1
    done = labbook("run", str(_spec(tmp_path, raw)), "--set", "hidden_sizes=[8]")
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (tmp_path / "pwned").exists()
    client = MlflowClient(store)
    assert client.get_experiment_by_name(HOSTILE["breakout"]) is not None  # the name, as data


def test_9_specs_are_read_with_a_safe_loader(tmp_path: Path) -> None:
    spec = tmp_path / "evil.yaml"
    spec.write_text("name: evil\nmodel: !!python/object/new:os.system ['touch pwned']\n")
    done = labbook("validate", str(spec))
    assert done.returncode == 2 and "malformed YAML" in done.stderr
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_10_an_unwritable_artifact_store_fails_the_run_saying_where_and_keeps_its_metrics(
    store: str, tmp_path: Path
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the artifact folder should be")  # unwritable, even for root
    client = MlflowClient(store)
    client.create_experiment("unwritable", artifact_location=str(blocker / "artifacts"))
    raw = yaml.safe_load((SPECS / "digits_mlp.yaml").read_text())
    raw["experiment"] = "unwritable"
    raw["trainer"]["max_epochs"] = 2
    done = labbook("run", str(_spec(tmp_path, raw)))
    assert done.returncode == 1
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("error: notebook failed:") and str(blocker) in message, message
    (run,) = client.search_runs([client.get_experiment_by_name("unwritable").experiment_id])
    assert run.info.status == "FAILED"
    error = run.data.tags["labbook.error"]
    assert f"attaching the executed notebook to {blocker / 'artifacts'}" in error and "it is kept at" in error
    assert len(client.get_metric_history(run.info.run_id, "val_loss")) == 2  # what was logged remains
    kept = Path(error.rsplit("it is kept at ", 1)[1])
    assert kept.exists() and nbformat.read(kept, as_version=4).cells  # the partial notebook, on disk


def _open_fds() -> list[str]:
    found = []
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            found.append(str(fd.readlink()))
    return found


def _kernels_under(root: int) -> list[int]:
    """The kernel processes descending from `root`, read from /proc: ipykernels, and forked kernels
    and their zygote (which carry the zygote's command line); not the test session's kernel server."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])

    def descends(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == root:
                return True
        return False

    found = []
    for pid in filter(descends, parents):
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"ipykernel" in cmdline or (b"pipelines.kernels.kernel_fork" in cmdline and b"--listen" not in cmdline):
                found.append(pid)
    return found


@pytest.mark.slow
def test_15_fifty_sequential_notebook_runs_leave_no_kernels_files_or_connections(
    store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel_server: str | None, no_kernel_server: None
) -> None:
    from pipelines.execution.run import run_notebook

    runtime = tmp_path / "runtime"  # this test's kernels' connection files, apart from other tests'
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(runtime))

    nb = nbformat.v4.new_notebook()
    parameters = nbformat.v4.new_code_cell("n = 0")
    parameters.metadata.tags = ["parameters"]
    nb.cells = [parameters, nbformat.v4.new_code_cell("print(n * n)")]
    nb.metadata.kernelspec = {"name": "labbook", "display_name": "labbook", "language": "python"}
    path = tmp_path / "tiny.ipynb"
    nbformat.write(nb, path)

    with monkeypatch.context() as warming:  # first-use caches, before counting (its kernel: any)
        if kernel_server:
            warming.setenv("LABBOOK_KERNEL_SERVER", kernel_server)
        run_notebook(path, {"n": -1}, "leaks", progress_bar=False)
    fds = len(_open_fds())
    with notebook.warm_kernels(1) as kernels:  # as studies run them: forked from the pool's zygote
        results = [run_notebook(path, {"n": n}, "leaks", progress_bar=False, kernels=kernels) for n in range(50)]
        assert len(set(kernels.handed_out)) == 50
    assert [r.status for r in results] == ["FINISHED"] * 50
    assert _kernels_under(os.getpid()) == []
    assert list(runtime.glob("kernel-*.json")) == []  # every connection file removed
    # This test's store only: earlier tests in the same pytest worker keep their own stores' pools.
    db_handles = [f for f in _open_fds() if f.startswith(str(tmp_path.resolve())) and f.endswith("mlflow.db")]
    assert len(db_handles) <= 2, db_handles  # SQLAlchemy's pool, not one per run
    assert len(_open_fds()) <= fds + 5, sorted(_open_fds())


@pytest.mark.parametrize("command", ["run", "tune"])
def test_11_an_unreachable_tracking_server_fails_fast_in_one_line_and_starts_nothing(
    tmp_path: Path, command: str
) -> None:
    import socket
    import time

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    spec = _spec(tmp_path, _tiny_study(tmp_path))
    started = time.monotonic()
    done = labbook(command, str(spec), cwd=tmp_path, env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"})
    assert time.monotonic() - started < 60  # MLflow's own retries would take minutes
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: MLflow server http://127.0.0.1:{port}: unreachable"), done.stderr[-2000:]
    assert not (tmp_path / "mlruns" / "optuna.db").exists()  # no study, so no trial counted without its run


@pytest.mark.slow
def test_5_four_workers_on_the_embedded_store_finish_exactly_20_trials_each_run_once(
    store: str, tmp_path: Path
) -> None:
    raw = _tiny_study(tmp_path, notebook=str(metric_only_notebook(tmp_path)))
    spec = _spec(tmp_path, raw)
    # Each worker's kernels are forked from its pool's zygote (one import of torch & co. per worker).
    done = labbook("tune", str(spec), "--n-trials", "20", "--workers", "4", "--no-report", "--no-register")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "database is locked" not in done.stderr
    trials = _trials(store, tmp_path)
    assert sorted(t.number for t in trials) == list(range(len(trials)))  # no duplicate trial numbers
    # Two workers may both create a last trial; the one past the budget is dropped before it runs.
    unrun = [t for t in trials if t.user_attrs.get("over_budget")]
    assert all(t.state.name == "FAIL" and "mlflow_run_id" not in t.user_attrs for t in unrun)
    trials = [t for t in trials if t not in unrun]
    assert [t.state.name for t in trials].count("COMPLETE") == 20 and len(trials) == 20
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name(raw["experiment"]).experiment_id
    children = [r for r in client.search_runs([experiment]) if "mlflow.parentRunId" in r.data.tags]
    numbers = sorted(int(r.data.tags["labbook.trial_number"]) for r in children)
    assert numbers == list(range(20))  # every trial's run, exactly once
    assert {t.user_attrs["mlflow_run_id"] for t in trials} == {r.info.run_id for r in children}


def _kill_kernel_when(process: subprocess.Popen, ready: Callable[[], bool], timeout: float = 180) -> None:
    """SIGKILL the notebook kernel under `process` (an OOM kill, a preempted node) once `ready()`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if ready():
            for kernel in _kernels_under(process.pid):
                os.kill(kernel, signal.SIGKILL)
                return
        time.sleep(0.05)
    raise AssertionError(f"never ready to kill the kernel; exit code {process.poll()}")


def test_6_a_crashed_training_resumes_from_its_last_checkpoint_with_the_epoch_count_going_on(
    store: str, tmp_path: Path, kernel_server: str | None, no_kernel_server: None
) -> None:
    raw = yaml.safe_load((SPECS / "regression_mlp.yaml").read_text())
    raw["trainer"] |= {"max_epochs": 12, "ckpt_path": "last", "enable_progress_bar": False}
    spec = _spec(tmp_path, raw)
    resumable = tmp_path / "mlruns" / "checkpoints" / "regression"

    crashed = subprocess.Popen([str(LABBOOK), "run", str(spec)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _kill_kernel_when(crashed, lambda: any(resumable.rglob("last.ckpt")))
    _, stderr = crashed.communicate(timeout=120)
    assert crashed.returncode == 1 and b"kernel died" in stderr, stderr[-2000:]
    (last,) = resumable.rglob("last.ckpt")
    reached = torch.load(last, weights_only=False)["epoch"]  # the epoch the last checkpoint closed
    assert reached < 11

    # The crash needed the kernel under the command (to kill it); the resume may use the server.
    done = labbook("run", str(spec), env={"LABBOOK_KERNEL_SERVER": kernel_server} if kernel_server else None)
    assert done.returncode == 0, done.stderr[-2000:]
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("regression").experiment_id
    first, second = sorted(client.search_runs([experiment]), key=lambda r: r.info.start_time)
    assert first.info.status == "FAILED" and first.data.tags["labbook.error"].startswith("kernel died")
    assert len(client.get_metric_history(first.info.run_id, "val_loss")) >= reached + 1  # kept, not overwritten
    assert second.info.status == "FINISHED"
    assert second.data.tags["labbook.resumed_from"] == str(last)
    assert second.data.tags["labbook.resumed_at_epoch"] == str(reached + 1)
    # The count went on from the checkpoint to max_epochs: only the epochs left were trained and logged.
    assert len(client.get_metric_history(second.info.run_id, "val_loss")) == 12 - (reached + 1)
    curves = client.download_artifacts(second.info.run_id, "tables/metrics_per_epoch.csv", str(tmp_path))
    assert pd.read_csv(curves)["epoch"].tolist() == list(range(reached + 1, 12))
    assert not last.exists()  # the training ended: nothing is left to resume, a third run starts afresh


def test_6_a_retried_trial_resumes_the_checkpoints_of_the_trial_it_retries(tmp_path: Path) -> None:
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    from pipelines.execution import resume

    study = optuna.create_study(study_name="s/../x", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    original = study.ask()
    retry = RetryHeartbeatStaleTrialCallback(max_retry=2)
    retry(study, study._storage.get_trial(original._trial_id))  # its worker died: a retry is enqueued
    retried = study.ask()
    retry(study, study._storage.get_trial(retried._trial_id))  # and that worker died too
    again = study.ask()
    keys = {resume.trial_key("s/../x", study._storage.get_trial(t._trial_id)) for t in (original, retried, again)}
    (key,) = keys  # one folder for the trial and its retries, inside the store, named apart from `s_.._x`
    assert key.startswith("s_.._x-") and key.endswith("/trial-0") and ".." not in key.split("/")

    settings = {"lr": 0.01, "max_epochs": 10}
    assert resume.run_key("e", "spec", settings) == resume.run_key("e", "spec", {**settings, "max_epochs": 20})
    assert resume.run_key("e", "spec", settings) != resume.run_key("e", "spec", {**settings, "lr": 0.02})
    assert "/" not in resume.run_key("../../etc", "spec", settings).split("/", 1)[0]
