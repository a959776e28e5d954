"""The SLURM launcher on a real single-node cluster (slurmctld, slurmd, munge: scripts/slurm-local).

Without SLURM these tests skip with the reason; `.ci/run` installs and starts it and sets
LABBOOK_REQUIRE_SLURM=1, so that in CI they fail instead. Every job a test submits is cancelled
when it ends, whatever happened.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from pipelines.specs.spec import PROJECT_ROOT
from tests.conftest import LABBOOK, labbook

SLURM_LOCAL = PROJECT_ROOT / "scripts" / "slurm-local"


def _unavailable(reason: str) -> None:
    if os.environ.get("LABBOOK_REQUIRE_SLURM") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture
def slurm(tmp_path: Path) -> Iterator[None]:
    """A cluster whose node is idle (started with scripts/slurm-local if it is installed but down)."""
    if shutil.which("sbatch") is None:
        _unavailable("SLURM is not installed (no sbatch): apt-get install slurm-wlm munge")
    up = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    if up.returncode != 0 or not up.stdout.strip():
        started = subprocess.run([str(SLURM_LOCAL), "start"], capture_output=True, text=True, timeout=120)
        if started.returncode != 0:
            _unavailable(f"the local SLURM cluster did not start: {started.stderr.strip()[-300:]}")
    yield
    leftover = _my_jobs(tmp_path)
    if leftover:
        subprocess.run(["scancel", *leftover], timeout=30)


def _my_jobs(under: Path) -> set[str]:
    """This test's jobs still queued: labbook's, whose working folder (`--chdir`, the job's folder
    in this test's store) is under `under`. Never another test's: under `pytest -n 2` the other
    worker's SLURM test runs at the same time, and cancelling "every job that appeared since"
    cancelled its jobs (CI, 2026-12-02: two jobs CANCELLED mid-test)."""
    listed = subprocess.run(["squeue", "-h", "-o", "%F|%j|%Z"], capture_output=True, text=True, timeout=30)
    found = set()
    for line in listed.stdout.splitlines():
        job, name, folder = (line.split("|") + ["", ""])[:3]
        if "labbook" in name and Path(folder).is_relative_to(under):
            found.add(job.strip())
    return found


def study_spec(tmp_path: Path, name: str, n_trials: int, epochs: int = 2) -> Path:
    """A cheap study (regression MLP, no pruning): every trial finishes."""
    raw = yaml.safe_load((PROJECT_ROOT / "pipelines" / "regression_tune.yaml").read_text())
    raw["name"] = raw["experiment"] = name
    raw["trainer"]["max_epochs"] = epochs
    raw["tune"] |= {"n_trials": n_trials, "pruner": {"name": "none"}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def driver(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    log = open("driver.log", "w")  # noqa: SIM115 - the process holds it
    return subprocess.Popen(
        [str(LABBOOK), *args], stdout=log, stderr=log, env={**os.environ, **(env or {})}, start_new_session=True
    )


def slurm_states(array: str) -> dict[str, str]:
    listed = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", array, "-o", "%i %T"], capture_output=True,
                            text=True, timeout=30)  # fmt: skip
    return dict(line.split() for line in listed.stdout.splitlines() if len(line.split()) == 2)


def test_a_study_through_a_two_worker_job_array_runs_exactly_its_budget(slurm: None, store: str, tmp_path: Path):
    spec = study_spec(tmp_path, "slurm_study", n_trials=4)
    done = labbook("tune", str(spec), "--launcher", "slurm", "--workers", "2", "--time", "10", "--no-register",
                   "--no-report")  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "submitted 2 workers as SLURM job array" in done.stdout
    assert "· slurm " in done.stdout and "RUNNING" in done.stdout  # the array's states beside the progress
    assert "trial 4/4" in done.stdout

    trials = optuna.load_study(study_name="slurm_study", storage="sqlite:///mlruns/optuna.db").trials
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert {t.state.name for t in trials} == {"COMPLETE"}
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("slurm_study").experiment_id])
    parents = [r for r in runs if r.data.tags.get("labbook.kind") == "study"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 4
    array = parents[0].data.tags["labbook.slurm_job_id"]
    # Every trial ran inside a task of that array, and each task's worker was its own process.
    assert {c.data.tags["labbook.slurm_job_id"].split("_")[0] for c in children} == {array}
    assert len({t.user_attrs["worker"] for t in trials}) >= 1
    assert not any(state in ("RUNNING", "PENDING") for state in slurm_states(array).values())

    jobs = labbook("jobs")
    assert jobs.returncode == 0, jobs.stderr[-2000:]
    for child in children:
        assert child.data.tags["labbook.slurm_job_id"] in jobs.stdout


def _study_made(path: str = "mlruns/optuna.db", name: str = "slurm_cancel") -> bool:
    """Whether the driver has created the study, read through a read-only connection (no migration)."""
    import sqlite3

    if not Path(path).exists():
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
            return db.execute("SELECT 1 FROM studies WHERE study_name = ?", (name,)).fetchone() is not None
    except sqlite3.Error:
        return False


def test_a_cancelled_workers_trial_is_retried_and_sigterm_on_the_driver_cancels_the_array(
    slurm: None, store: str, tmp_path: Path
):
    spec = study_spec(tmp_path, "slurm_cancel", n_trials=2, epochs=12)  # trials long enough to cancel one mid-fit
    env = {"LABBOOK_HEARTBEAT_SECONDS": "2"}  # a silent worker is declared dead after 6 s
    # The store made here first: a client opened while the driver creates it would migrate it too.
    storage, client = "sqlite:///mlruns/optuna.db", MlflowClient(store)
    client.search_experiments()
    process = driver("tune", str(spec), "--launcher", "slurm", "--workers", "2", "--no-register", "--no-report",
                     env=env)  # fmt: skip
    cancelled, deadline = None, time.monotonic() + 300
    while cancelled is None and time.monotonic() < deadline:
        assert process.poll() is None, Path("driver.log").read_text()[-3000:]
        # Only once the driver made the study: opening a storage still being created would run
        # Optuna's migrations here too, racing the driver's ("UNIQUE constraint failed: alembic_version").
        trials = optuna.load_study(study_name="slurm_cancel", storage=storage).trials if _study_made() else []
        for t in trials:
            running_for = time.time() - t.datetime_start.timestamp() if t.datetime_start else 0
            if t.state.name == "RUNNING" and t.user_attrs.get("mlflow_run_id") and running_for > 3:
                task = client.get_run(t.user_attrs["mlflow_run_id"]).data.tags["labbook.slurm_job_id"]
                subprocess.run(["scancel", task], check=True, timeout=30)  # SIGTERM, then SIGKILL
                cancelled = t.number
                break
        time.sleep(0.5)
    assert cancelled is not None, Path("driver.log").read_text()[-3000:]
    assert process.wait(timeout=400) == 0, Path("driver.log").read_text()[-3000:]

    study = optuna.load_study(study_name="slurm_cancel", storage=storage)
    states = {t.number: t.state.name for t in study.trials}
    assert states[cancelled] == "FAIL"
    retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == cancelled]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE"
    assert retry[0].params == study.trials[cancelled].params
    assert list(states.values()).count("COMPLETE") == 2  # the budget, nothing lost, nothing extra

    # SIGTERM on a driver (Ctrl-C the same) cancels its whole array and closes the study's run.
    spec = study_spec(tmp_path, "slurm_stop", n_trials=4, epochs=12)
    process = driver("tune", str(spec), "--launcher", "slurm", "--workers", "2", "--no-register", "--no-report")
    deadline = time.monotonic() + 120
    while "RUNNING" not in Path("driver.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    os.kill(process.pid, signal.SIGTERM)
    assert process.wait(timeout=120) == 143, Path("driver.log").read_text()[-3000:]
    [parent] = client.search_runs(
        [client.get_experiment_by_name("slurm_stop").experiment_id], "tags.`labbook.kind` = 'study'"
    )
    assert parent.info.status == "FAILED"
    array = parent.data.tags["labbook.slurm_job_id"]
    deadline = time.monotonic() + 30
    while any(s in ("RUNNING", "PENDING", "COMPLETING") for s in slurm_states(array).values()):
        assert time.monotonic() < deadline, slurm_states(array)
        time.sleep(0.5)
    assert set(slurm_states(array).values()) <= {"CANCELLED"}


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--partition", "no_such_partition"], "--partition: got 'no_such_partition'; this cluster has"),
        (["--time", "ten minutes"], "--time: got 'ten minutes'; expected minutes"),
        (["--time", "99-00:00:00"], "over partition"),  # the test cluster's MaxTime is 60 minutes
        (["--mem", "999999G"], "SLURM refuses the request"),
        (["--cpus-per-worker", "512"], "SLURM refuses the request"),
        (["--launcher", "sge"], "--launcher: got 'sge'; expected local or slurm"),
        (["--launcher", "local", "--time", "10"], "--time: only with --launcher slurm"),
    ],
)
def test_bad_slurm_settings_exit_2_before_any_study_exists(
    slurm: None, store: str, tmp_path: Path, flags: list[str], says: str
):
    spec = study_spec(tmp_path, "slurm_bad", n_trials=2)
    done = labbook("tune", str(spec), *(["--launcher", "slurm"] if "--launcher" not in flags else []), *flags)
    assert done.returncode == 2, done.stdout + done.stderr
    assert says in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "mlruns" / "optuna.db").exists()
    assert not (tmp_path / "mlruns" / "slurm").exists()


def test_no_sbatch_on_path_exits_2(store: str, tmp_path: Path):
    spec = study_spec(tmp_path, "slurm_none", n_trials=2)
    bare = tmp_path / "bin"
    bare.mkdir()
    done = labbook("tune", str(spec), "--launcher", "slurm", env={"PATH": str(bare)})
    assert done.returncode == 2, done.stdout + done.stderr
    assert "`sbatch` is not on PATH" in done.stderr
    assert not (tmp_path / "mlruns" / "optuna.db").exists()


def test_a_ddp_training_on_two_srun_tasks_is_one_mlflow_run(slurm: None, store: str, tmp_path: Path):
    """`labbook run --launcher slurm --devices 2`: two gloo ranks under srun, rank 0 alone logging."""
    spec = str(PROJECT_ROOT / "pipelines" / "regression_mlp.yaml")
    done = labbook("run", spec, "--set", "max_epochs=2", "--set", "enable_progress_bar=false",
                   "--launcher", "slurm", "--devices", "2", "--time", "10")  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    client = MlflowClient(store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [r.info.run_name for r in runs]  # rank 1 made none
    [run] = runs
    job = run.data.tags["labbook.slurm_job_id"]
    log = next((tmp_path / "mlruns" / "slurm").glob(f"run-*/slurm-{job}.log")).read_text()
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log  # two processes really trained
    assert run.info.status == "FINISHED"
    assert run.data.params["strategy"] == "ddp" and run.data.params["devices"] == "2"
    assert len(client.get_metric_history(run.info.run_id, "val_loss")) == 2
    assert {"script/train.py", f"script/slurm-{job}.log"} <= {
        a.path for a in client.list_artifacts(run.info.run_id, "script")
    }


def test_a_requeued_training_continues_its_epochs_in_the_same_run(slurm: None, store: str, tmp_path: Path):
    """SIGUSR1 (what `--signal` sends before the time limit or preemption) makes the training save
    and requeue the job at a batch end both DDP ranks agree on (`lightning_modules.requeue`, not
    Lightning's handler, which saves inside the signal and can hang a rank in an all-reduce); the
    requeued job resumes from that checkpoint into the same run."""
    spec = str(PROJECT_ROOT / "pipelines" / "regression_mlp.yaml")
    epochs = 12
    # 4,000 samples: ~0.3 s epochs, so the signal lands mid-fit (at the default 1,000 the fused
    # optimizer step made the 12 epochs of 2 ranks last under a second: the fit ended first).
    process = driver("run", spec, "--set", f"max_epochs={epochs}", "--set", "enable_progress_bar=false",
                     "--set", "n_samples=4000",
                     "--launcher", "slurm", "--devices", "2", "--time", "10")  # fmt: skip
    deadline, client, job = time.monotonic() + 300, None, None
    while job is None:
        assert process.poll() is None and time.monotonic() < deadline, Path("driver.log").read_text()[-3000:]
        time.sleep(0.25)
        if "submitted SLURM job" not in Path("driver.log").read_text():
            continue  # the store exists (and is migrated) once the job is submitted
        client = client or MlflowClient(store)
        [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
        if len(client.get_metric_history(run.info.run_id, "val_loss")) >= 2:  # mid-fit
            job = run.data.tags["labbook.slurm_job_id"]
            subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30)
    while "PENDING (restart 1)" not in Path("driver.log").read_text():
        assert process.poll() is None and time.monotonic() < deadline, Path("driver.log").read_text()[-3000:]
        time.sleep(0.5)
    # SLURM holds a requeued job for 2 minutes before it may start again: start it now.
    subprocess.run(["scontrol", "update", f"jobid={job}", "starttime=now"], check=True, timeout=30)
    assert process.wait(timeout=400) == 0, Path("driver.log").read_text()[-3000:]

    log = next((tmp_path / "mlruns" / "slurm").glob(f"run-*/slurm-{job}.log")).read_text()
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log  # two ranks, before and after the requeue
    assert log.count("Requeued SLURM job") == 1 and "requeue signal: saved" in log  # rank 0 alone requeued
    assert "Handling auto-requeue signal" not in log  # Lightning's own handler stayed out of it
    assert "resumed from" in log and "hpc_ckpt_1.ckpt" in log  # saved, then resumed from it
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [r.info.run_name for r in runs]  # the requeued attempt made no run of its own
    [run] = runs
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "val_loss")
    # Continued, not restarted: no epoch logged twice, the last one reached. The epoch the signal cut
    # short has no validation of its own: Lightning resumes a mid-epoch checkpoint at the next epoch.
    assert len({m.step for m in history}) == len(history) >= epochs - 1
    assert int(run.data.tags["labbook.resumed_at_epoch"]) >= 2  # the requeued attempt started mid-fit
    assert max(m.value for m in client.get_metric_history(run.info.run_id, "epoch")) >= epochs - 1


def test_a_specs_launcher_section_launches_on_slurm_and_is_checked_like_the_flags(
    slurm: None, store: str, tmp_path: Path
):
    spec = study_spec(tmp_path, "slurm_spec", n_trials=2)
    raw = yaml.safe_load(spec.read_text())
    for launcher, says in [
        ({"name": "slurm", "partition": "no_such_partition"}, "launcher.partition: got 'no_such_partition'"),
        ({"name": "slurm", "time": "99:00:00"}, "launcher.time: 99:00:00 is over partition"),
        ({"name": "slurm", "time": "soon"}, "launcher.time: got 'soon'; expected minutes"),
        ({"name": "slurm", "mem": "999999G"}, "launcher: SLURM refuses the request"),
        ({"name": "sge"}, "launcher.name: got 'sge'; input should be 'local' or 'slurm'"),
    ]:
        spec.write_text(yaml.safe_dump(raw | {"launcher": launcher}))
        done = labbook("tune", str(spec))
        assert done.returncode == 2 and says in done.stderr and "error: --" not in done.stderr, done.stderr
    assert not (tmp_path / "mlruns" / "optuna.db").exists()


def slurm_pipeline(tmp_path: Path, search: dict, train: dict) -> Path:
    """A 2-step pipeline: a study of 2 trials, then a training with its best parameters; each step's
    `launcher:` as given."""
    study_spec(tmp_path, "slurm_pipe", n_trials=2)
    pipeline = {
        "name": "slurm_pipe",
        "report": False,
        "steps": [
            {"name": "search", "kind": "tune", "spec": "spec.yaml", "n_trials": 2, "workers": 2, "report": False,
             "launcher": search},
            {"name": "train", "kind": "train", "spec": "spec.yaml", "set": ["${search.best_params}"],
             "launcher": train},
        ],
    }  # fmt: skip
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    return path


def test_a_pipelines_tune_and_train_steps_run_on_slurm_under_the_pipeline_run(slurm: None, store: str, tmp_path: Path):
    """`launcher: {name: slurm, ...}` on a tune step (its workers a job array) and a train step (one
    sbatch job): what a scheduled nightly pipeline needs to run its study on the cluster."""
    search = {"name": "slurm", "partition": "debug", "time": "10"}
    path = slurm_pipeline(tmp_path, search, {"name": "slurm", "time": 10})  # YAML's 10 is an int: minutes
    done = labbook("run", str(path))
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "submitted 2 workers as SLURM job array" in done.stdout and "submitted SLURM job" in done.stdout

    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("slurm_pipe").experiment_id])
    [pipeline] = [r for r in runs if r.data.tags.get("labbook.kind") == "pipeline"]
    assert pipeline.info.status == "FINISHED"
    [study] = [r for r in runs if r.data.tags.get("labbook.kind") == "study"]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == study.info.run_id]
    [train] = [r for r in runs if r.data.tags.get("labbook.step") == "train"]
    assert study.data.tags["mlflow.parentRunId"] == pipeline.info.run_id and len(trials) == 2
    array = study.data.tags["labbook.slurm_job_id"]
    assert {t.data.tags["labbook.slurm_job_id"].split("_")[0] for t in trials} == {array}  # trials ran in the array
    assert train.data.tags["mlflow.parentRunId"] == pipeline.info.run_id and train.info.status == "FINISHED"
    assert train.data.tags["labbook.launcher"] == "slurm" and train.data.tags["labbook.slurm_job_id"] != array
    best = optuna.load_study(study_name=study.data.tags["labbook.study_name"], storage="sqlite:///mlruns/optuna.db")
    assert float(train.data.params["lr"]) == pytest.approx(best.best_params["lr"])  # ${search.best_params} reached it
    assert len(client.get_metric_history(train.info.run_id, "val_loss")) == 2
    assert not _my_jobs(tmp_path)


@pytest.mark.parametrize(
    ("search", "train", "says"),
    [
        (
            {"name": "slurm", "partition": "no_such_partition"},
            None,
            "steps.search.launcher.partition: got 'no_such_partition'; this cluster has",
        ),
        (None, {"name": "slurm", "time": "99:00:00"}, "steps.train.launcher.time: 99:00:00 is over partition"),
        ({"name": "slurm", "time": "ten minutes"}, None, "launcher.time: got 'ten minutes'; expected minutes"),
        ({"name": "slurm", "cpus_per_task": 512}, None, "steps.search.launcher: SLURM refuses the request"),
        ({"name": "sge"}, None, "launcher.name: got 'sge'; input should be 'local' or 'slurm'"),
        ({"name": "local", "partition": "debug"}, None, "partition: a SLURM setting; only with name: slurm"),
    ],
)
def test_a_bad_step_launcher_exits_2_at_validate_and_run_before_any_run_exists(
    slurm: None, store: str, tmp_path: Path, search: dict | None, train: dict | None, says: str
):
    path = slurm_pipeline(tmp_path, search, train)
    for verb in ("validate", "run"):
        done = labbook(verb, str(path))
        assert done.returncode == 2, done.stdout + done.stderr
        assert says in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "mlruns" / "mlflow.db").exists() and not (tmp_path / "mlruns" / "optuna.db").exists()
    assert not (tmp_path / "mlruns" / "slurm").exists()
