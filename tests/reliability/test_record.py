"""The record never lies: run and trial state stay true through killed drivers, full and read-only stores.

Real processes, signals, stores and mounts (a tmpfs, a read-only bind mount: the test skips with the
reason where the machine does not let it mount). Each test names the case of the reliability issue it
covers (see README, "What happens when…").
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import nbformat
import optuna
import pytest
import yaml

from pipelines.specs.spec import PROJECT_ROOT
from pipelines.tracking import driver, tracking
from pipelines.tracking.tags import Attr, Tag
from tests.conftest import LABBOOK, labbook

TINY = {
    "name": "tiny",
    "experiment": "tiny",
    "model": {"name": "mlp_regressor", "hidden_sizes": [8]},
    "data": {"name": "regression", "n_samples": 200, "n_features": 4, "batch_size": 64},
    "optim": {"optimizer": "adam", "lr": 0.01},
    "trainer": {"max_epochs": 1, "accelerator": "cpu", "seed": 1, "enable_progress_bar": False},
}


def _spec(tmp_path: Path, name: str = "tiny.yaml", **changes: object) -> Path:
    raw = {**TINY, **changes}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def _train_notebook_with(tmp_path: Path, source: str, after: str) -> Path:
    """The train notebook with one extra cell after the cell containing `after`."""
    nb = nbformat.read(PROJECT_ROOT / "notebooks" / "train.ipynb", as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if after in c.source)
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(source))
    path = tmp_path / "slow_end.ipynb"
    nbformat.write(nb, path)
    return path


def _wait(ready: Callable[[], bool], process: subprocess.Popen | None = None, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if process is not None and process.poll() is not None:
            raise AssertionError(
                f"the command ended first (exit {process.returncode}): {process.stderr.read()[-2000:]}"
            )
        time.sleep(0.2)
    raise AssertionError("timed out")


def _runs(store: str, experiment: str = "tiny") -> list:
    client = tracking.client(store)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def _epochs_logged(store: str, at_least: int) -> bool:
    runs = _runs(store)
    return bool(runs) and len(tracking.client(store).get_metric_history(runs[0].info.run_id, "val_loss")) >= at_least


def _start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [str(LABBOOK), *args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _notebook_artifacts(store: str, run_id: str) -> list[str]:
    return sorted(a.path for a in tracking.client(store).list_artifacts(run_id, "notebook"))


def test_1_a_hung_up_driver_fails_its_run_interrupted_with_the_partial_notebook(store: str, tmp_path: Path) -> None:
    process = _start("run", str(_spec(tmp_path)), "--set", "max_epochs=5000")
    _wait(lambda: _epochs_logged(store, 2), process)
    process.send_signal(signal.SIGHUP)  # the terminal closed
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGHUP, stderr[-2000:]
    (run,) = _runs(store)
    assert run.info.status == "FAILED" and run.data.tags["labbook.error"] == "interrupted"
    assert _notebook_artifacts(store, run.info.run_id) == ["notebook/train.html", "notebook/train.ipynb"]


def test_1_a_killed_driver_s_run_is_closed_failed_by_the_next_command_with_its_partial_notebook(
    store: str, tmp_path: Path, no_kernel_server: None
) -> None:
    # As labbook runs by default (no kernel server): the command's own process writes the kernel's
    # connection file, into this test's temp folder.
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {"TMPDIR": str(temp), "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
    process = _start("run", str(_spec(tmp_path)), "--set", "max_epochs=5000", env=env)
    _wait(lambda: _epochs_logged(store, 2), process)
    assert list(temp.glob("tmp*.json"))  # the kernel's connection file
    process.kill()
    process.wait()
    (run,) = _runs(store)
    assert run.info.status == "RUNNING"  # nobody closed it: the driver is gone
    tags = run.data.tags
    assert tags[driver.HOST_TAG] == socket.gethostname()
    assert str(process.pid) in [entry.split(":")[0] for entry in tags[driver.PROCESSES_TAG].split(",")]

    listed = labbook("reap", "--dry-run", env=env)
    assert listed.returncode == 0 and run.info.run_id in listed.stdout and "would close" in listed.stdout
    assert _runs(store)[0].info.status == "RUNNING"  # a dry run closes nothing

    # Whatever the killed driver's kernel left in the temp folder, as old as a file the next command finds.
    _wait(lambda: not _alive_kernel_files(temp), timeout=30)  # its kernel exited with the driver
    for left in temp.glob("tmp*.json"):
        os.utime(left, (time.time() - 60, time.time() - 60))
    done = labbook("compare", env=env)  # any later command closes it on the way in
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"closed run {run.info.run_id}" in done.stderr and "FAILED" in done.stdout
    (closed,) = _runs(store)
    assert closed.info.status == "FAILED"
    error = closed.data.tags["labbook.error"]
    assert error.startswith("driver died: process ") and str(process.pid) in error, error
    assert _notebook_artifacts(store, run.info.run_id) == ["notebook/train.html", "notebook/train.ipynb"]
    partial = nbformat.read(tracking.output_dir(store, run.info.run_id) / "train.ipynb", as_version=4)
    assert any(c.get("execution_count") for c in partial.cells)  # cells that ran before the kill
    assert list(temp.glob("tmp*.json")) == []  # no connection file of the dead kernel is left


def _alive_kernel_files(folder: Path) -> list[Path]:
    """Connection files in `folder` whose kernel still listens."""
    import json

    alive = []
    for path in folder.glob("tmp*.json"):
        with contextlib.suppress(OSError, ValueError):
            info = json.loads(path.read_text())
            with socket.socket() as probe:
                if probe.connect_ex((info["ip"], info["hb_port"])) == 0:
                    alive.append(path)
    return alive


def test_1_a_live_driver_is_never_closed_and_a_dead_one_only_provably(store: str, tmp_path: Path) -> None:
    client = tracking.client(store)
    mine = tracking.start_run(client, "drivers", run_name="mine")  # this test process drives it: alive
    others = {}
    now = int(time.time())
    cases = {
        "elsewhere-fresh": {driver.HOST_TAG: "another-host", driver.HEARTBEAT_TAG: str(now - 60)},
        "elsewhere-stale": {driver.HOST_TAG: "another-host", driver.HEARTBEAT_TAG: str(now - 301)},
        "pid-reused": {driver.PROCESSES_TAG: f"{os.getpid()}:1"},  # this pid, another start time
        "no-driver-tags": None,  # made by another tool: never provably dead
    }
    for name, changes in cases.items():
        run_id = tracking.start_run(client, "drivers", run_name=name)
        driver.release(run_id)  # this process stops beating it: only its tags say who drives it
        if changes is None:
            for key in (driver.HOST_TAG, driver.PROCESSES_TAG, driver.HEARTBEAT_TAG):
                client.delete_tag(run_id, key)
        else:
            for key, value in {driver.INTERVAL_TAG: "30", **changes}.items():
                client.set_tag(run_id, key, value)
        others[name] = run_id
    done = labbook("reap")
    assert done.returncode == 0, done.stderr[-2000:]
    status = {name: client.get_run(run_id).info.status for name, run_id in others.items()}
    assert status == {
        "elsewhere-fresh": "RUNNING",  # 60 s without a beat, every 30 s: it may well live
        "elsewhere-stale": "FAILED",  # more than 10 beats missed
        "pid-reused": "FAILED",
        "no-driver-tags": "RUNNING",
    }
    assert client.get_run(mine).info.status == "RUNNING"
    assert (
        "no heartbeat from another-host for 3" in client.get_run(others["elsewhere-stale"]).data.tags["labbook.error"]
    )
    tracking.finish_run(client, mine)


@pytest.mark.parametrize("value", ["0", "abc", "-5", "99999"])
def test_1_a_bad_heartbeat_setting_exits_2_before_anything_is_written(store: str, tmp_path: Path, value: str) -> None:
    done = labbook("run", str(_spec(tmp_path)), env={driver.HEARTBEAT_ENV: value})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {driver.HEARTBEAT_ENV}={value!r}: expected a whole number of seconds from 1 to 3600"
    ]
    assert _runs(store) == []


def test_2_a_run_stays_running_until_its_driver_attached_the_notebook(store: str, tmp_path: Path) -> None:
    marker = tmp_path / "after_test"
    nb = _train_notebook_with(
        tmp_path, f"open({str(marker)!r}, 'w').close()\nimport time\ntime.sleep(600)", after="trainer.test("
    )
    process = _start("run", str(_spec(tmp_path, notebook=str(nb))))
    _wait(marker.exists, process)  # fit and test ended; the notebook still runs
    (run,) = _runs(store)
    assert run.info.status == "RUNNING"  # Lightning's logger marked it FINISHED here
    assert "test_loss" in run.data.metrics
    process.kill()  # the driver dies now
    process.wait()
    done = labbook("reap")
    assert done.returncode == 0, done.stderr[-2000:]
    (run,) = _runs(store)
    assert run.info.status == "FAILED" and run.data.tags["labbook.error"].startswith("driver died")
    assert "notebook/slow_end.ipynb" in _notebook_artifacts(store, run.info.run_id)


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """mount(kind, ...) -> the mount point; every mount is undone after the test."""
    points: list[Path] = []

    def mount(*args: str, at: Path) -> Path:
        at.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", *args, str(at)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount here (needs root and mount rights): {done.stderr.strip()[:200]}")
        points.append(at)
        return at

    yield mount
    for point in reversed(points):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def _fill(folder: Path, leave: int) -> None:
    """Fill the file system of `folder` until `leave` bytes are free."""
    stats = os.statvfs(folder)
    free = stats.f_bavail * stats.f_frsize
    with open(folder / "filler", "ab") as filler, contextlib.suppress(OSError):
        filler.write(b"\0" * max(0, free - leave))


def test_3_a_disk_that_fills_during_a_run_fails_it_in_one_line(
    tmp_path: Path, mounted: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = mounted("-t", "tmpfs", "-o", "size=2m", "tmpfs", at=tmp_path / "disk")
    uri = f"sqlite:///{disk / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    stats = "__import__('os').statvfs(disk)"
    fill = f"disk = {str(disk)!r}\nfree = {stats}.f_bavail * {stats}.f_frsize\n"
    fill += "open(disk + '/filler', 'wb').write(bytes(free - 160_000))  # the disk fills during the run"
    nb = _train_notebook_with(tmp_path, fill, after="trainer.test(")
    done = labbook("run", str(_spec(tmp_path, notebook=str(nb))))
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].startswith("error: "), done.stderr[-2000:]
    assert (disk / "filler").exists(), done.stderr[-3000:]  # the disk filled during the run
    (disk / "filler").unlink()  # room to read the record back
    (run,) = _runs(uri)
    assert run.info.status == "FAILED"  # never FINISHED: the status was written before anything else
    assert run.data.tags["labbook.error"]  # and why, in one line
    assert not list((disk / "mlruns").glob(".labbook-reserve-*"))  # the room set aside was used, or freed on exit


def test_3_a_full_store_disk_is_one_line_and_exit_1(
    tmp_path: Path, mounted: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = mounted("-t", "tmpfs", "-o", "size=2m", "tmpfs", at=tmp_path / "disk")
    uri = f"sqlite:///{disk / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    _fill(disk, 0)
    done = labbook("run", str(_spec(tmp_path)))
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: the store {uri}"), done.stderr[-2000:]
    assert "disk is full" in lines[0], lines[0]


def _metric_notebook(tmp_path: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    parameters = nbformat.v4.new_code_cell('lr = 0.01\ntracking_uri = ""\nrun_id = ""')
    parameters.metadata.tags = ["parameters"]
    log = (
        "from mlflow import MlflowClient\n\nMlflowClient(tracking_uri).log_metric(run_id, 'val_r2', 1 - lr)\nprint(lr)"
    )
    nb.cells = [parameters, nbformat.v4.new_code_cell(log)]
    nb.metadata.kernelspec = {"name": "labbook", "display_name": "labbook", "language": "python"}
    path = tmp_path / "metric.ipynb"
    nbformat.write(nb, path)
    return path


def test_4_a_read_only_store_is_read_and_run_says_it_is_read_only(
    tmp_path: Path, mounted: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines.execution.run import run_notebook

    writable = tmp_path / "store"
    uri = f"sqlite:///{writable / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    nb = _metric_notebook(tmp_path)
    a, b = (run_notebook(nb, {"lr": lr}, "tiny", progress_bar=False) for lr in (0.1, 0.2))
    view = mounted("--bind", str(writable), at=tmp_path / "readonly")
    subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True)
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{view / 'mlflow.db'}"}
    compared = labbook("compare", "--format", "csv", env=env)
    assert compared.returncode == 0, compared.stderr[-2000:]
    assert a.run_id in compared.stdout and b.run_id in compared.stdout and "FINISHED" in compared.stdout
    diffed = labbook("diff", a.run_id, b.run_id, env=env)
    assert diffed.returncode == 0, diffed.stderr[-2000:]
    assert "val_r2" in diffed.stdout  # the final metrics, a vs b
    ran = labbook("run", str(_spec(tmp_path)), env=env)
    assert ran.returncode == 1
    assert ran.stderr.strip().splitlines() == [
        f"error: the store sqlite:///{view / 'mlflow.db'} is read-only: "
        "labbook can read it (compare, diff) but not add runs to it"
    ]


def test_5_a_killed_study_driver_s_trial_ends_fail_in_mlflow_as_in_optuna(store: str, tmp_path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    parameters = nbformat.v4.new_code_cell('lr = 0.01\ntracking_uri = ""\nrun_id = ""\ntrial_number = -1')
    parameters.metadata.tags = ["parameters"]
    log = "from mlflow import MlflowClient\n\nMlflowClient(tracking_uri).log_metric(run_id, 'val_r2', -abs(lr - 0.01))"
    log += "\nif trial_number == 2:\n    __import__('time').sleep(600)"
    nb.cells = [parameters, nbformat.v4.new_code_cell(log)]
    nb.metadata.kernelspec = {"name": "labbook", "display_name": "labbook", "language": "python"}
    nbformat.write(nb, tmp_path / "trial.ipynb")
    raw = yaml.safe_load((PROJECT_ROOT / "pipelines" / "regression_tune.yaml").read_text())
    raw |= {"notebook": str(tmp_path / "trial.ipynb"), "experiment": "tiny"}
    raw["tune"] |= {"pruner": "none", "sampler": {"name": "random", "seed": 1}}
    spec = tmp_path / "study.yaml"
    spec.write_text(yaml.safe_dump(raw))
    args = ("tune", str(spec), "--n-trials", "3", "--no-report", "--no-register")
    env = {"LABBOOK_HEARTBEAT_SECONDS": "1"}  # Optuna's: a dead driver's trial is stale after 3 s

    process = _start(*args, env=env)
    _wait(lambda: any(r.data.tags.get("labbook.trial_number") == "2" for r in _runs(store)), process)
    process.kill()
    process.wait()
    done = labbook(*args, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    study = optuna.load_study(study_name="regression_tune", storage=f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}")
    client = tracking.client(store)
    for trial in study.trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        expected = {"COMPLETE": ("FINISHED", "COMPLETE"), "FAIL": ("FAILED", "FAIL")}[trial.state.name]
        assert (run.info.status, run.data.tags["labbook.trial_state"]) == expected, (trial.number, trial.state)
    assert [t.state.name for t in study.trials].count("COMPLETE") == 3
    (failed,) = [t for t in study.trials if t.state.name == "FAIL"]
    assert failed.number == 2
    shown = labbook("compare", "--study", "regression_tune", "--format", "csv")
    row = next(line for line in shown.stdout.splitlines() if failed.user_attrs["mlflow_run_id"] in line)
    assert ",FAIL," in row and "RUNNING" not in row, row


def test_5_a_fail_trial_whose_run_says_finished_is_reconciled_when_the_study_resumes(
    store: str, tmp_path: Path
) -> None:
    from pipelines.study import study as studies

    storage = f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage)
    client = tracking.client(store)
    run_id = tracking.start_run(client, "tiny", tags={Tag.TRIAL_STATE: "RUNNING"})
    tracking.finish_run(client, run_id)  # FINISHED, as Lightning's logger left it
    trial = study.ask()
    trial.set_user_attr(Attr.RUN_ID, run_id)
    trial.set_user_attr("error", "worker host:1 died (no heartbeat); trial retried")
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    studies.reconcile_runs(optuna.load_study(study_name="s", storage=storage))
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags[Tag.TRIAL_STATE] == "FAIL"
    assert run.data.tags["labbook.error"] == "worker host:1 died (no heartbeat); trial retried"


def test_9_compare_shows_an_experiment_whose_runs_are_all_running(store: str, tmp_path: Path) -> None:
    client = tracking.client(store)
    ids = [tracking.start_run(client, "tiny", run_name=f"r{i}") for i in range(2)]  # this process drives them
    for i, run_id in enumerate(ids):
        client.log_metric(run_id, "val_loss", 0.5 + i)
    done = labbook("compare", "--experiment", "tiny", "--format", "csv")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    rows = [line for line in done.stdout.splitlines() if any(run_id in line for run_id in ids)]
    assert len(rows) == 2 and all(",RUNNING," in row for row in rows), done.stdout
    for run_id in ids:
        tracking.finish_run(client, run_id)
