"""Scaling out on real servers: Optuna studies in PostgreSQL, runs through an MLflow server.

Each test creates fresh PostgreSQL databases and drops them afterwards, starts `labbook server`
(MLflow's server, PostgreSQL backend, proxied artifacts) on a free 127.0.0.1 port, and runs
workers as separate processes in separate folders: as if on separate machines, no shared files.
Without PostgreSQL these tests skip with the reason; `.ci/run` sets LABBOOK_REQUIRE_POSTGRES=1
so that in CI they fail instead.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow.pytorch
import optuna
import pytest
import torch
import yaml
from mlflow import MlflowClient

from pipelines.specs.spec import PROJECT_ROOT
from tests.conftest import LABBOOK

POSTGRES = os.environ.get("LABBOOK_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")


def _admin():
    """An autocommit connection to the server's `postgres` database, or a skip (a failure in CI)."""
    try:
        import psycopg

        connection = psycopg.connect(f"{POSTGRES}/postgres", connect_timeout=5, autocommit=True)
    except Exception as exc:
        reason = f"PostgreSQL not reachable at {POSTGRES} ({type(exc).__name__}: {str(exc).strip()})"
        if os.environ.get("LABBOOK_REQUIRE_POSTGRES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return connection


@pytest.fixture
def database() -> Iterator[Callable[[str], str]]:
    """Make fresh databases by role (`database("optuna")` → its URL); all dropped afterwards."""
    admin = _admin()
    made: list[str] = []

    def make(role: str) -> str:
        name = f"labbook_test_{role}_{uuid.uuid4().hex[:10]}"
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return f"{POSTGRES}/{name}"

    yield make
    with admin.cursor() as cursor:
        for name in made:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request(url: str, auth: tuple[str, str] | None = None) -> int:
    """The HTTP status of a GET (an error status too)."""
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture
def server(tmp_path: Path, database: Callable[[str], str]) -> Iterator[Callable[..., str]]:
    """Start `labbook server` on a PostgreSQL database; returns its URL once it answers."""
    started: list[subprocess.Popen] = []

    def start(auth: tuple[str, str] | None = None) -> str:
        home = tmp_path / "server"
        home.mkdir()
        port = free_port()
        command = [str(LABBOOK), "server", "--backend-store-uri", database("mlflow")]
        command += ["--artifacts-destination", str(home / "artifacts"), "--port", str(port), "--workers", "2"]
        env = dict(os.environ)
        if auth:
            command += ["--auth", "--auth-db", database("auth")]
            env |= {"MLFLOW_TRACKING_USERNAME": auth[0], "MLFLOW_TRACKING_PASSWORD": auth[1]}
        log = (home / "server.log").open("w")
        process = subprocess.Popen(command, cwd=home, env=env, stdout=log, stderr=log, start_new_session=True)
        started.append(process)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert process.poll() is None, (home / "server.log").read_text()[-3000:]
            try:
                request(f"{url}/health")
                return url
            except OSError:
                time.sleep(0.5)
        raise AssertionError("the MLflow server did not answer in 120 s:\n" + (home / "server.log").read_text()[-3000:])

    yield start
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)


def study_spec(name: str, n_trials: int) -> dict:
    """A cheap study (regression MLP, 3 epochs, no pruning): every trial finishes."""
    raw = yaml.safe_load((PROJECT_ROOT / "pipelines" / "regression_tune.yaml").read_text())
    raw["name"] = raw["experiment"] = name
    raw["trainer"]["max_epochs"] = 3
    raw["tune"] |= {"n_trials": n_trials, "pruner": {"name": "none"}}
    return raw


def machine(tmp_path: Path, name: str, spec: dict) -> Path:
    """A folder of its own for one worker, holding its copy of the spec: nothing is shared."""
    home = tmp_path / name
    home.mkdir()
    (home / "spec.yaml").write_text(yaml.safe_dump(spec))
    return home


def worker(home: Path, env: dict[str, str], *args: str) -> subprocess.Popen:
    log = (home / "worker.log").open("w")
    command = [str(LABBOOK), *args]
    return subprocess.Popen(
        command, cwd=home, env={**os.environ, **env}, stdout=log, stderr=log, start_new_session=True
    )


def finished(process: subprocess.Popen, home: Path, timeout: float = 400) -> None:
    code = process.wait(timeout=timeout)
    assert code == 0, (home / "worker.log").read_text()[-4000:]


def children_of(client: MlflowClient, experiment: str) -> tuple[list, list]:
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [r for r in runs if r.data.tags.get("labbook.kind") == "study"]
    return parents, [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def test_two_workers_on_postgres_and_an_mlflow_server_share_one_study(
    tmp_path: Path, server: Callable[..., str], database: Callable[[str], str]
) -> None:
    url = server()
    storage = database("optuna")
    spec = study_spec("scale_out", n_trials=6)
    a, b = machine(tmp_path, "machine_a", spec), machine(tmp_path, "machine_b", spec)
    env = {"MLFLOW_TRACKING_URI": url, "LABBOOK_OPTUNA_STORAGE": ""}
    driver = worker(a, env, "tune", "spec.yaml", "--storage", storage, "--no-register", "--no-report")
    joiner = worker(b, env, "worker", "spec.yaml", "--storage", storage, "--wait", "120")
    finished(driver, a)
    finished(joiner, b)

    trials = optuna.load_study(study_name="scale_out", storage=storage).trials
    assert sorted(t.number for t in trials) == list(range(6))
    assert all(t.state.name == "COMPLETE" for t in trials)
    assert {t.user_attrs["worker"].split(":")[1] for t in trials} == {str(driver.pid), str(joiner.pid)}

    client = MlflowClient(url)
    parents, children = children_of(client, "scale_out")
    assert len(parents) == 1 and len(children) == 6
    assert {c.info.status for c in children} == {"FINISHED"}
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    for child in children:  # every executed notebook, downloaded through the server
        assert child.info.artifact_uri.startswith("mlflow-artifacts:")
        path = client.download_artifacts(child.info.run_id, "notebook/train.ipynb", str(tmp_path / "download"))
        assert json.loads(Path(path).read_text())["metadata"]["papermill"]["parameters"]["trial_number"] >= 0
    # The artifacts live where the server keeps them, never in a worker's folder.
    assert list((tmp_path / "server" / "artifacts").rglob("train.ipynb"))
    assert not list(a.rglob("mlruns/artifacts")) and not list(b.rglob("mlruns/artifacts"))


def test_basic_auth_server_and_a_killed_worker_whose_trial_is_retried(
    tmp_path: Path, server: Callable[..., str], database: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    login = ("labbook-admin", "s3cret-" + uuid.uuid4().hex[:8])
    url = server(auth=login)
    assert request(f"{url}/api/2.0/mlflow/experiments/search?max_results=1") == 401
    assert request(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", ("labbook-admin", "wrong")) == 401
    assert request(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", login) == 200
    # Without credentials a worker is refused at once, and records nothing.
    storage = database("optuna")
    spec = study_spec("survivors", n_trials=2)
    spec["trainer"]["max_epochs"] = 10  # a trial long enough to be killed while it trains (~10 s)
    a, b = machine(tmp_path, "machine_a", spec), machine(tmp_path, "machine_b", spec)
    refused = subprocess.run(
        [str(LABBOOK), "tune", "spec.yaml", "--storage", storage, "--no-register", "--no-report"],
        cwd=a,
        env={**os.environ, "MLFLOW_TRACKING_URI": url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode != 0 and "401" in refused.stderr + refused.stdout

    env = {
        "MLFLOW_TRACKING_URI": url,
        "MLFLOW_TRACKING_USERNAME": login[0],
        "MLFLOW_TRACKING_PASSWORD": login[1],
        "LABBOOK_HEARTBEAT_SECONDS": "2",  # a silent worker is declared dead after 6 s
    }
    driver = worker(a, env, "tune", "spec.yaml", "--storage", storage, "--no-register", "--no-report")
    victim = worker(b, env, "worker", "spec.yaml", "--storage", storage, "--wait", "120")
    victim_mark = f":{victim.pid}"
    deadline = time.monotonic() + 240
    killed = None
    while killed is None and time.monotonic() < deadline:  # kill -9 the worker (and its kernel) mid-trial
        try:
            trials = optuna.load_study(study_name="survivors", storage=storage).trials
        except KeyError:
            trials = []
        for t in trials:
            running_for = time.time() - t.datetime_start.timestamp() if t.datetime_start else 0
            mine = t.state.name == "RUNNING" and t.user_attrs.get("worker", "").endswith(victim_mark)
            # Once its MLflow run exists (a loaded server may take seconds to create it) and it trains.
            if mine and t.user_attrs.get("mlflow_run_id") and running_for > 4:
                os.killpg(victim.pid, signal.SIGKILL)
                killed = t.number
        time.sleep(0.5)
    assert killed is not None, (b / "worker.log").read_text()[-3000:]
    victim.wait(timeout=30)
    finished(driver, a)

    study = optuna.load_study(study_name="survivors", storage=storage)
    states = {t.number: t.state.name for t in study.trials}
    assert states[killed] == "FAIL"
    retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE"
    assert list(states.values()).count("COMPLETE") == 2  # the requested budget, nothing lost
    assert list(states.values()).count("FAIL") == 1

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", login[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", login[1])
    client = MlflowClient(url)
    _, children = children_of(client, "survivors")
    by_trial = {int(c.data.tags["labbook.trial_number"]): c for c in children}
    dead = by_trial[killed]
    assert dead.info.status == "FAILED" and "died (no heartbeat)" in dead.data.tags["labbook.error"]
    assert sorted(c.info.status for c in children) == ["FAILED"] + ["FINISHED"] * 2


def test_torchrun_launches_the_notebooks_code_on_two_ranks_and_rank_zero_alone_logs(store: str, tmp_path: Path) -> None:
    """Multi-node training of one trial, on one machine: the script `labbook script` writes,
    launched by torchrun as on every node of a cluster, is one MLflow run with the full history."""
    spec = str(PROJECT_ROOT / "pipelines" / "digits_mlp.yaml")
    sets = ["max_epochs=3", "strategy=ddp", "devices=2", "accelerator=cpu", "enable_progress_bar=false"]
    written = subprocess.run(
        [str(LABBOOK), "script", spec, *[a for s in sets for a in ("--set", s)], "-o", "train.py",
         "--output-dir", str(tmp_path / "shared")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert written.returncode == 0, written.stderr[-2000:]
    assert "torchrun --nnodes 1 --nproc-per-node 2" in written.stdout
    launched = subprocess.run(
        [str(LABBOOK.with_name("torchrun")), "--standalone", "--nproc-per-node", "2", "train.py"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    output = launched.stdout + launched.stderr
    assert launched.returncode == 0, output[-3000:]
    assert "[rank: 1]" in output  # two processes really trained

    client = MlflowClient(store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [r.info.run_name for r in runs]  # rank 1 created nothing
    [run] = runs
    assert run.data.params["strategy"] == "ddp" and run.data.params["devices"] == "2"
    assert len(client.get_metric_history(run.info.run_id, "val_acc")) == 3
    assert run.data.metrics["test_acc"] > 0.5
    assert list((tmp_path / "shared" / "checkpoints").glob("best-*.ckpt"))  # rank 0 wrote where asked
    assert {"checkpoints", "plots"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    model_uri = run.data.tags["labbook.model_uri"]  # the model rank 0 logged reloads
    assert mlflow.pytorch.load_model(model_uri)(torch.zeros(2, 64)).shape == (2, 10)


def test_processes_opening_a_new_postgresql_store_at_once_all_succeed(database: Callable[[str], str]) -> None:
    """MLflow migrates a new PostgreSQL store in every process that opens it: 4 at once raced on
    alembic's tables. `tracking.client` takes a database-wide advisory lock while opening one."""
    from mlflow import MlflowClient

    from tests.test_run import open_at_once

    uri = database("mlflow").replace("postgresql://", "postgresql+psycopg://", 1)
    assert open_at_once(uri) == ["ok"] * 4
    assert len(MlflowClient(uri).search_experiments()) == 5  # theirs and Default
