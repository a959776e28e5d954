"""Concurrent processes on one resource: checkpoint folders, study samplers, the champion alias, sockets.

Each test runs real processes on real stores and names the case of the reliability issue it covers
(see README, "What happens when…").
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import nbformat
import optuna
import pytest
import yaml
from mlflow import MlflowClient

from pipelines.kernels import socket_claim
from pipelines.specs.spec import PROJECT_ROOT
from pipelines.specs.tune_spec import SamplerSpec
from pipelines.study import study as studies
from pipelines.tracking import champion
from pipelines.tracking.tags import Attr
from tests.conftest import LABBOOK, labbook, metric_only_notebook
from tests.test_scale_out import database  # noqa: F401 - fresh PostgreSQL databases, dropped after

SPECS = PROJECT_ROOT / "pipelines"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A folder with a short path: a Unix socket's path has ~100 bytes."""
    folder = Path(tempfile.mkdtemp(prefix="lb-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _listening_socket(path: Path) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    return listener


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def test_10_a_kernel_server_never_takes_a_file_or_a_live_socket_and_removes_only_its_own(short_dir: Path) -> None:
    # A regular file, a folder, a live socket: refused in one line, exit 2, left as they were.
    taken = short_dir / "f.txt"
    taken.write_text("the user's notes\n")
    (short_dir / "folder").mkdir()
    live = _listening_socket(short_dir / "live.sock")
    try:
        cases = [(taken, "not a socket"), (short_dir / "folder", "a folder"), (short_dir / "live.sock", "listening")]
        for path, said in cases:
            done = labbook("kernel-server", "--socket", str(path))
            assert done.returncode == 2, (path, done.stdout, done.stderr)
            assert said in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert taken.read_text() == "the user's notes\n" and (short_dir / "folder").is_dir()
        assert _accepts(short_dir / "live.sock")
    finally:
        live.close()

    # A stale socket (its server died) is taken over; a second server on the live one is refused,
    # also when it gets past the command's check (two started at once): the server checks as it binds.
    path = short_dir / "k.sock"
    stale = _listening_socket(path)
    stale.close()  # the file stays, nobody listens
    command = [str(LABBOOK), "kernel-server", "--socket", str(path)]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while not _accepts(path):
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read() if first.stdout else ""
            time.sleep(0.2)
        inode = path.stat().st_ino
        second = labbook("kernel-server", "--socket", str(path))
        assert second.returncode == 2 and "already listening" in second.stderr, second.stderr
        racing = subprocess.run(
            [sys.executable, "-m", "pipelines.kernels.kernel_fork", "--listen", str(path)],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert racing.returncode == 2 and "already listening" in racing.stderr, racing.stderr[-2000:]
        assert path.stat().st_ino == inode and _accepts(path)  # the first server's socket, still reachable

        # The path now holds another server's socket (replaced behind the first one's back): stopping
        # the first leaves it there.
        path.unlink()
        other = _listening_socket(path)
        try:
            first.send_signal(signal.SIGTERM)
            assert first.wait(timeout=30) in (0, 143)
            assert path.is_socket() and _accepts(path), "the stopped server removed another server's socket"
        finally:
            other.close()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()


def test_10_a_stopped_server_removes_its_own_socket(short_dir: Path) -> None:
    path = short_dir / "own.sock"
    server, claimed = socket_claim.claim(str(path))
    server.listen(1)
    with pytest.raises(socket_claim.SocketPathTaken, match="already listening"):
        socket_claim.claim(str(path))
    server.close()
    assert socket_claim.release(claimed) and not path.exists()
    assert not socket_claim.release(claimed)  # gone already: nothing else is touched


def test_7_two_drivers_of_one_study_sample_apart(store: str, tmp_path: Path) -> None:
    raw = yaml.safe_load((SPECS / "regression_tune.yaml").read_text())
    raw["notebook"] = str(metric_only_notebook(tmp_path, seconds=3))  # the sampling is under test, not training
    raw["tune"]["sampler"] = {"name": "random", "seed": 1}
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(raw))
    command = [str(LABBOOK), "tune", str(spec), "--n-trials", "4", "--no-register", "--no-report"]
    env = {**os.environ, "LABBOOK_WARM_KERNELS": "0"}
    drivers = [subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for driver in drivers:
        _, stderr = driver.communicate(timeout=600)
        assert driver.returncode == 0, stderr[-3000:]
    storage = f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}"
    trials = optuna.load_study(study_name="regression_tune", storage=storage).trials
    run = [t for t in trials if not t.user_attrs.get(Attr.OVER_BUDGET)]
    assert len(run) == 4 and all(t.state.name == "COMPLETE" for t in run), [t.state.name for t in trials]
    assert len({t.user_attrs["worker"] for t in run}) == 2  # both drivers ran trials
    assert len({t.params["lr"] for t in run}) == 4, [t.params for t in run]  # none sampled twice


@pytest.mark.parametrize("name", ["random", "tpe", "gp"])
def test_7_a_trial_draws_from_its_own_seed_however_many_processes_sample(name: str) -> None:
    """Trial n gets the same point from one sampler or from two taking turns: reproducible, and apart."""
    spec = SamplerSpec(name=name, seed=1, n_startup_trials=2)

    def points(samplers: list[optuna.samplers.BaseSampler]) -> list[float]:
        storage = optuna.storages.InMemoryStorage()
        optuna.create_study(study_name="s", storage=storage, direction="maximize")
        found = []
        for number in range(4):
            study = optuna.load_study(study_name="s", storage=storage, sampler=samplers[number % len(samplers)])
            trial = study.ask()
            lr = trial.suggest_float("lr", 1e-5, 1.0, log=True)
            study.tell(trial, -abs(lr - 0.01))
            found.append(lr)
        return found

    alone = points([studies.sampler(spec)])
    assert points([studies.sampler(spec), studies.sampler(spec)]) == alone
    assert len(set(alone)) == 4


_PROMOTER = """
import json, os, sys, time
from pipelines.tracking.champion import promote
run_id, folder, rounds = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
open(os.path.join(folder, f"ready-{os.getpid()}"), "w").close()
while not os.path.exists(os.path.join(folder, "go")):
    time.sleep(0.01)
start = float(open(os.path.join(folder, "go")).read())
for number, value in enumerate(rounds):
    time.sleep(max(0.0, start + number - time.time()))  # every process promotes round n at the same moment
    promote(f"race-{number}", run_id, "val_acc", "maximize", value)
"""


def _logged_model(uri: str) -> str:
    """A run with a tiny logged model (a pyfunc that returns its input): what promote registers."""
    import mlflow.pyfunc

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input):  # noqa: ANN001, ANN201 - MLflow's signature
            return model_input

    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("promotions") or client.get_experiment(
        client.create_experiment("promotions")
    )
    with mlflow.start_run(experiment_id=experiment.experiment_id) as run:
        mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=["mlflow"])
    return run.info.run_id


def _champion_value(client: MlflowClient, name: str) -> float:
    return float(client.get_model_version_by_alias(name, champion.CHAMPION).tags["labbook.val_acc"])


def _race(uri: str, folder: Path, processes: int = 6, rounds: int = 3) -> None:
    """`processes` real processes promote one model name at the same moment, `rounds` times (a
    NaN among each round's values); the champion must end on the best finite value every time."""
    run_id = _logged_model(uri)
    values = [[0.80 + 0.01 * ((p * 7 + r * 3) % processes) for r in range(rounds)] for p in range(processes)]
    for r in range(rounds):
        values[r % processes][r] = float("nan")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    command = [sys.executable, "-c", _PROMOTER, run_id, str(folder)]
    started = [
        subprocess.Popen([*command, json.dumps(v)], env=env, cwd=folder, stderr=subprocess.PIPE, text=True)
        for v in values
    ]
    deadline = time.monotonic() + 180
    while len(list(folder.glob("ready-*"))) < processes:
        assert time.monotonic() < deadline and all(p.poll() is None for p in started)
        time.sleep(0.1)
    (folder / "go.tmp").write_text(str(time.time() + 0.5))
    os.replace(folder / "go.tmp", folder / "go")  # whole or absent: a promoter read it half-written once
    for process in started:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
    client = MlflowClient(uri)
    for r in range(rounds):
        best = max(v[r] for v in values if not math.isnan(v[r]))
        assert _champion_value(client, f"race-{r}") == pytest.approx(best), f"round {r}: {[v[r] for v in values]}"


def test_8_concurrent_promotions_on_sqlite_leave_the_champion_on_the_best_model(store: str, tmp_path: Path) -> None:
    _race(store, tmp_path)


def test_8_concurrent_promotions_on_postgresql_leave_the_champion_on_the_best_model(
    database,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    uri = database("mlflow")
    monkeypatch.chdir(tmp_path)
    MlflowClient(uri).search_experiments()  # the store's tables made once, before the racers open it
    _race(uri, tmp_path)


def test_8_a_non_finite_value_is_never_champion_and_a_non_finite_champion_is_replaced(store: str) -> None:
    run_id = _logged_model(store)
    client = MlflowClient(store)
    first = champion.promote("m", run_id, "val_acc", "maximize", float("nan"))
    assert not first["promoted"] and first["champion_version"] is None and "never promoted" in first["reason"]
    assert champion.promote("m", run_id, "val_acc", "maximize", 0.5)["promoted"]
    assert not champion.promote("m", run_id, "val_acc", "maximize", float("inf"))["promoted"]
    assert not champion.promote("m", run_id, "val_acc", "maximize", 0.4)["promoted"]
    assert _champion_value(client, "m") == 0.5

    # A champion recorded with NaN (as an older labbook promoted it): any finite value replaces it.
    stuck = champion.promote("n", run_id, "val_loss", "minimize", 1.0)
    client.set_model_version_tag("n", str(stuck["version"]), "labbook.val_loss", "nan")
    replaced = champion.promote("n", run_id, "val_loss", "minimize", 7.0)
    assert replaced["promoted"] and replaced["previous_value"] is None
    assert int(client.get_model_version_by_alias("n", champion.CHAMPION).version) == replaced["version"]
    with pytest.raises(ValueError, match="direction: got 'max'"):
        champion.promote("n", run_id, "val_loss", "max", 1.0)


def _gated_train_notebook(tmp_path: Path, gate: Path) -> Path:
    """The train notebook, waiting after its second epoch (a checkpoint written) until `gate` exists."""
    nb = nbformat.read(PROJECT_ROOT / "notebooks" / "train.ipynb", as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if "trainer.fit(" in c.source)
    wait = (
        "import os, time\nfrom lightning.pytorch.callbacks import Callback\n\n"
        "class _Gate(Callback):\n"
        "    def on_train_epoch_end(self, trainer, pl_module):\n"
        f"        while trainer.current_epoch >= 1 and not os.path.exists({str(gate)!r}):\n"
        "            time.sleep(0.05)\n\n"
        "_callbacks = nb.callbacks\nnb.callbacks = lambda *args, **kwargs: [*_callbacks(*args, **kwargs), _Gate()]"
    )
    nb.cells.insert(index, nbformat.v4.new_code_cell(wait))
    path = tmp_path / "gated_train.ipynb"
    nbformat.write(nb, path)
    return path


EPOCHS = 6


def _tiny_resumable(tmp_path: Path, gate: Path) -> dict:
    raw = yaml.safe_load((SPECS / "regression_mlp.yaml").read_text())
    raw["notebook"] = str(_gated_train_notebook(tmp_path, gate))
    raw["data"] |= {"n_samples": 200}
    raw["trainer"] |= {"max_epochs": EPOCHS, "ckpt_path": "last", "enable_progress_bar": False}
    return raw


def _wait_for(ready: Callable[[], bool], process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_6_two_runs_of_one_resumable_training_at_once_keep_their_own_checkpoints(store: str, tmp_path: Path) -> None:
    gate = tmp_path / "go"
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(_tiny_resumable(tmp_path, gate)))
    folders = tmp_path / "mlruns" / "checkpoints" / "regression"
    command = [str(LABBOOK), "run", str(spec)]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: len(list(folders.rglob("last.ckpt"))) == 1, first)  # the first one's live checkpoint
    second = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: len(list(folders.rglob("last.ckpt"))) == 2, second)  # the second one's, elsewhere
    gate.touch()  # both go on to the end
    results = [process.communicate(timeout=600) for process in (first, second)]
    assert first.returncode == 0, results[0][1][-3000:]
    assert second.returncode == 0, results[1][1][-3000:]
    assert "another live training" in results[1][1] and "holds its folder" in results[1][1]

    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("regression").experiment_id])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    for run in runs:  # neither resumed the other's training: every epoch trained and logged
        assert "labbook.resumed_from" not in run.data.tags, run.data.tags
        assert len(client.get_metric_history(run.info.run_id, "val_loss")) == EPOCHS
    assert not any(folders.rglob("*.ckpt"))  # both ended: nothing left to resume


def test_6_a_new_study_never_resumes_another_studys_training(store: str, tmp_path: Path) -> None:
    gate = tmp_path / "go"
    raw = _tiny_resumable(tmp_path, gate)
    raw["tune"] = {
        "metric": "val_r2",
        "direction": "maximize",
        "n_trials": 1,
        "sampler": {"name": "random", "seed": 1},
        "pruner": "none",
        "space": {"lr": {"type": "float", "low": 0.001, "high": 0.01, "log": True}},
    }
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(raw))
    folders = tmp_path / "mlruns" / "checkpoints"
    tune = [str(LABBOOK), "tune", str(spec), "--no-register", "--no-report", "--study-name"]
    stopped = subprocess.Popen([*tune, "exp b"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: any(folders.rglob("last.ckpt")), stopped)
    stopped.send_signal(signal.SIGTERM)
    _, stderr = stopped.communicate(timeout=120)
    assert stopped.returncode == 143, stderr[-3000:]
    (left,) = folders.rglob("last.ckpt")  # the stopped study's training, kept for its own resume

    gate.touch()
    done = labbook(*tune[1:], "exp_b")  # a name that cleans up to the same folder name
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(store)
    runs = client.search_runs(
        [client.get_experiment_by_name("regression").experiment_id], "tags.`labbook.study_name` = 'exp_b'"
    )
    (trial,) = [r for r in runs if "labbook.trial_number" in r.data.tags]
    assert "labbook.resumed_from" not in trial.data.tags, trial.data.tags  # trained from epoch 0
    assert len(client.get_metric_history(trial.info.run_id, "val_loss")) == EPOCHS
    assert left.exists()  # the other study's checkpoint is untouched


def test_6_a_held_checkpoint_folder_is_never_given_to_a_second_training(tmp_path: Path) -> None:
    from pipelines.execution import resume

    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    first = resume.claim(uri, "e/spec-1")
    second = resume.claim(uri, "e/spec-1")  # the first is live: another folder of the same training
    assert not first.extra and second.extra and second.path != first.path
    (second.path / "last.ckpt").write_bytes(b"a crashed attempt's")
    second.release(finished=False)  # it crashed: its checkpoints stay to be resumed
    first.release(finished=True)  # it ended: its folder goes
    assert not first.path.exists() and (second.path / "last.ckpt").exists()
    third = resume.claim(uri, "e/spec-1")  # the next attempt resumes the crashed one
    assert third.path == second.path
    third.release(finished=True)
    assert resume.trial_key("exp b", _frozen(0)) != resume.trial_key("exp_b", _frozen(0))
    assert resume.trial_key("Exp", _frozen(0)) != resume.trial_key("exp", _frozen(0))  # case-insensitive disks
    assert len(resume.trial_key("x" * 500, _frozen(0)).split("/")[0]) < 255


def _frozen(number: int) -> optuna.trial.FrozenTrial:
    study = optuna.create_study()
    for _ in range(number + 1):
        trial = study.ask()
    return study._storage.get_trial(trial._trial_id)
