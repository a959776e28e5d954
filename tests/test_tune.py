"""Optuna studies of notebook trials, on a real SQLite storage and real notebook execution."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import mlflow.pytorch
import nbformat
import numpy as np
import optuna
import pytest
import torch
import yaml
from mlflow import MlflowClient

from pipelines.specs.spec import PROJECT_ROOT, SpecError, load_spec
from pipelines.tracking.champion import promote
from pipelines.tracking.records import recorded_parameters
from tests.conftest import LABBOOK, labbook, metric_only_notebook

SPECS = PROJECT_ROOT / "pipelines"


@pytest.fixture
def optuna_url(store: str, tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}"


def runs_of(uri: str, experiment: str) -> tuple[MlflowClient, list, list]:
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [r for r in runs if r.data.tags.get("labbook.kind") == "study"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def write_spec(tmp_path: Path, raw: dict, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def test_known_answer_and_the_mlflow_layout_of_a_study(store: str, optuna_url: str) -> None:
    done = labbook("tune", str(SPECS / "regression_tune.yaml"), "--n-trials", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trial 4/4 · " in done.stdout and "best val_r2" in done.stdout

    study = optuna.load_study(study_name="regression_tune", storage=optuna_url)
    assert len(study.trials) == 4
    assert study.best_value >= 0.90  # TPE, seeded, finds R² ≥ 0.9 well within 12 trials

    client, parents, children = runs_of(store, "regression-tune")
    [parent] = parents
    assert len(children) == 4 and {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert parent.info.status == "FINISHED"
    assert parent.data.params["space.lr"] == "float [1e-05, 1] log"
    assert parent.data.params["sampler"] == "tpe" and parent.data.params["pruner"] == "successive_halving"
    assert parent.data.params["n_trials"] == "4" and parent.data.params["metric"] == "val_r2"
    assert parent.data.metrics["best_value"] == pytest.approx(study.best_value)
    assert parent.data.metrics["n_complete"] + parent.data.metrics["n_pruned"] + parent.data.metrics["n_fail"] == 4
    assert parent.data.tags["labbook.study_name"] == "regression_tune"
    assert parent.data.tags["labbook.storage"] == optuna_url
    assert "tables/study_summary.csv" in [a.path for a in client.list_artifacts(parent.info.run_id, "tables")]
    # The study report notebook, executed and attached with its plots (viewable offline as PNG).
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {
        "report/report.ipynb",
        "report/report.html",
        "report/optimization_history.png",
        "report/learning_curves_top.png",
        "report/slice.png",
    } <= report
    assert "report_error" not in " ".join(parent.data.tags)
    html = Path(client.download_artifacts(parent.info.run_id, "report/report.html")).read_text()
    assert html.count("data:image/png;base64") >= 3

    by_number = {int(c.data.tags["labbook.trial_number"]): c for c in children}
    assert sorted(by_number) == [0, 1, 2, 3]
    for trial in study.trials:
        child = by_number[trial.number]
        assert child.data.tags["labbook.trial_state"] == trial.state.name
        assert float(child.data.params["lr"]) == pytest.approx(trial.params["lr"])
        assert trial.user_attrs["mlflow_run_id"] == child.info.run_id
        notebook = {a.path for a in client.list_artifacts(child.info.run_id, "notebook")}
        assert notebook == {"notebook/train.ipynb", "notebook/train.html"}
        epochs = len(client.get_metric_history(child.info.run_id, "val_r2"))
        assert epochs == 15 if trial.state.name == "COMPLETE" else 0 < epochs < 15

    # The best model is registered and is the champion.
    version = client.get_model_version_by_alias("regression_tune", "champion")
    assert version.tags["labbook.run_id"] == study.best_trial.user_attrs["mlflow_run_id"]
    assert float(version.tags["labbook.val_r2"]) == pytest.approx(study.best_value)

    # Optuna's own tools read the embedded storage as it is.
    optuna_cli = Path(sys.executable).with_name("optuna")
    listed = subprocess.run([str(optuna_cli), "studies", "--storage", optuna_url], capture_output=True, text=True)
    assert listed.returncode == 0 and "regression_tune" in listed.stdout


def pruning_spec(name: str, **trainer) -> dict:
    """A study built to prune: random lr over a range where slow learners lag the first trial."""
    return {
        "name": name,
        "experiment": name.removesuffix("_demo"),
        "model": {"name": "mlp_classifier", "hidden_sizes": [32]},
        "data": {"name": "digits"},
        "optim": {"optimizer": "sgd", "lr": 0.01},
        "trainer": {"accelerator": "cpu", "enable_progress_bar": False, **trainer},
        "tune": {
            "metric": "val_acc",
            "direction": "maximize",
            "n_trials": 3,
            "sampler": {"name": "random", "seed": 3},
            "pruner": {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 1},
            "space": {"lr": {"type": "float", "low": 1e-5, "high": 0.5, "log": True}},
        },
    }


def test_a_pruned_trial_stops_early_and_says_so(store: str, optuna_url: str, tmp_path: Path) -> None:
    done = labbook(
        "tune", str(write_spec(tmp_path, pruning_spec("prune_demo", max_epochs=8))), "--no-register", "--no-report"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="prune_demo", storage=optuna_url)
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned, [(t.number, t.state) for t in study.trials]

    client = MlflowClient(store)
    run = client.get_run(pruned[0].user_attrs["mlflow_run_id"])
    assert run.data.tags["labbook.trial_state"] == "PRUNED"
    assert run.data.tags["labbook.pruned"].startswith("TrialPruned: Trial was pruned at epoch")
    assert run.info.status == "FINISHED"  # pruning is an outcome, not a failure
    epochs = len(client.get_metric_history(run.info.run_id, "val_acc"))
    assert epochs < 8 and epochs == len(pruned[0].intermediate_values)

    executed = nbformat.read(client.download_artifacts(run.info.run_id, "notebook/train.ipynb"), as_version=4)
    errors = [
        o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"
    ]
    assert errors[0]["ename"] == "TrialPruned" and f"epoch {epochs - 1}" in errors[0]["evalue"]


def count_complete(url: str, name: str) -> int:
    try:
        trials = optuna.load_study(study_name=name, storage=url).trials
    except KeyError:
        return 0
    return sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials)


def third_trial_running(url: str, name: str) -> bool:
    try:
        trials = optuna.load_study(study_name=name, storage=url).trials
    except KeyError:
        return False
    running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING and "mlflow_run_id" in t.user_attrs]
    return count_complete(url, name) == 2 and bool(running)


def test_an_interrupted_study_resumes_to_exactly_its_budget(store: str, optuna_url: str, tmp_path: Path) -> None:
    raw = yaml.safe_load((SPECS / "regression_tune.yaml").read_text())
    # Each trial idles 4 s: a window the stop lands in. Interrupting and resuming is under test, not training.
    raw["notebook"] = str(metric_only_notebook(tmp_path, seconds=4))
    raw["tune"]["pruner"] = "none"
    spec = write_spec(tmp_path, raw)
    env = {"LABBOOK_WARM_KERNELS": "0"}
    command = [str(LABBOOK), "tune", str(spec), "--n-trials", "4", "--no-register", "--no-report"]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env}
    )
    deadline = time.monotonic() + 300
    while not third_trial_running(optuna_url, "regression_tune") and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1)  # inside the third trial's notebook
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-2000:]
    assert count_complete(optuna_url, "regression_tune") == 2

    done = labbook("tune", str(spec), "--n-trials", "4", "--no-register", "--no-report", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = optuna.load_study(study_name="regression_tune", storage=optuna_url).trials
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") == 4, states
    interrupted = [t for t in trials if t.state.name == "FAIL"]
    assert len(interrupted) == 1 and interrupted[0].user_attrs["error"] == "interrupted"

    client, parents, children = runs_of(store, "regression-tune")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the same parent run, resumed
    assert len(children) == 5
    cut = client.get_run(
        interrupted[0].user_attrs.get("mlflow_run_id")
        or next(c.info.run_id for c in children if c.data.tags["labbook.trial_number"] == str(interrupted[0].number))
    )
    assert cut.info.status == "FAILED" and cut.data.tags["labbook.error"] == "interrupted"
    assert "notebook/metric_only.ipynb" in [a.path for a in client.list_artifacts(cut.info.run_id, "notebook")]


def test_two_workers_share_one_study_exactly(store: str, optuna_url: str, tmp_path: Path) -> None:
    raw = yaml.safe_load((SPECS / "regression_tune.yaml").read_text())
    raw["notebook"] = str(metric_only_notebook(tmp_path, seconds=4))  # the sharing is under test, not training
    spec = write_spec(tmp_path, raw)
    env = {"LABBOOK_WARM_KERNELS": "0"}
    # --set reaches every worker's trials, not only the driver's (the other worker reads the file again)
    settings = ["--set", "max_epochs=7", "--set", "noise=2.5e-05", "--set", "hidden_sizes=[12, 6]"]
    done = labbook(
        "tune", str(spec), "--n-trials", "4", "--workers", "2", "--no-register", "--no-report", *settings, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    trials = optuna.load_study(study_name="regression_tune", storage=optuna_url).trials
    assert len(trials) == 4 and sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both processes ran trials
    assert len({t.params["lr"] for t in trials}) == 4  # each worker samples its own points, none twice
    _, parents, children = runs_of(store, "regression-tune")
    assert len(parents) == 1 and len(children) == 4
    assert sorted(int(c.data.tags["labbook.trial_number"]) for c in children) == [0, 1, 2, 3]
    for child in children:
        _, injected = recorded_parameters(child.info.run_id)
        assert (injected["max_epochs"], injected["noise"], injected["hidden_sizes"]) == (7, 2.5e-05, [12, 6]), (
            child.data.tags["labbook.trial_number"]
        )


def test_a_worker_whose_settings_differ_from_the_studys_is_refused_before_any_trial(
    store: str, optuna_url: str, tmp_path: Path
) -> None:
    """A `labbook worker` started on the spec file without the driver's `--set` would train its
    trials otherwise than the study's: it is refused in one line, exit 2, and runs nothing."""
    raw = yaml.safe_load((SPECS / "regression_tune.yaml").read_text())
    raw["notebook"] = str(metric_only_notebook(tmp_path))
    spec = write_spec(tmp_path, raw)
    env = {"LABBOOK_WARM_KERNELS": "0"}
    settings = ["--set", "max_epochs=7"]
    done = labbook("tune", str(spec), "--n-trials", "1", *settings, "--no-register", "--no-report", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    refused = labbook("worker", str(spec), "--storage", optuna_url, "--n-trials", "3", "--quiet", env=env)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert refused.stderr.strip().splitlines() == [
        "error: study 'regression_tune' trains its trials with max_epochs=7 (this worker: 15): give this worker "
        "the same --set as `labbook tune`, or start another study with --study-name"
    ]
    assert len(optuna.load_study(study_name="regression_tune", storage=optuna_url).trials) == 1
    joined = labbook("worker", str(spec), "--storage", optuna_url, "--n-trials", "2", *settings, "--quiet", env=env)
    assert joined.returncode == 0, joined.stderr[-2000:]
    assert len(optuna.load_study(study_name="regression_tune", storage=optuna_url).trials) == 2


def test_a_trial_created_past_the_budget_by_a_racing_worker_is_dropped_unrun(store: str, optuna_url: str) -> None:
    """Two workers can pass the budget check together and both ask Optuna for a trial (seen: 21
    of 20 with four workers): the one numbered past the budget runs nothing and costs nothing."""
    from optuna.trial import TrialState

    from pipelines.study import study as studies
    from pipelines.study.tune import TrialFailed, _Worker, create, open_study, progress_line
    from pipelines.tracking.tags import Attr

    handle = open_study(load_spec(SPECS / "regression_tune.yaml"), n_trials=2, storage=optuna_url)
    study, parent = create(handle)
    first, second, late = study.ask(), study.ask(), study.ask()  # three workers passed the check at once
    worker = _Worker(handle, parent, console=None)
    with pytest.raises(TrialFailed, match="not run: trials before it use the study's budget of 2"):
        worker.objective(late)
    study.tell(late, state=TrialState.FAIL)  # what study.optimize does with TrialFailed
    frozen = study.trials[late.number]
    assert frozen.user_attrs[Attr.OVER_BUDGET] is True and not frozen.params  # nothing sampled, no run
    assert Attr.RUN_ID not in frozen.user_attrs
    assert studies.budget_used(study.trials) == 2  # the two earlier trials, still running, are the budget
    assert progress_line(study, handle).startswith("trial 0/2 · 0 complete, 0 pruned, 0 failed, 2 running")
    # Once the first fails by its own doing, still no room: failed trials count, unrun ones do not.
    study.tell(first, state=TrialState.FAIL)
    assert studies.over_budget(study.trials, late.number, 2) and not studies.over_budget(study.trials, 1, 2)
    assert second.number == 1


BAD_SPACES = [
    ({"lr": {"type": "float", "low": 0.1, "high": 0.01}}, "tune.space.lr: empty range: low (0.1) must be below high"),
    ({"lr": {"type": "float", "low": 0.1, "high": 0.1}}, "tune.space.lr: empty range"),
    (
        {"lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}},
        "tune.space.lr: log scale needs low > 0, got 0.0",
    ),
    ({"fc_hidden": {"type": "int", "low": 8, "high": 4}}, "tune.space.fc_hidden: empty range"),
    (
        {"optimizer": {"type": "categorical", "choices": []}},
        "tune.space.optimizer.choices: List should have at least 1",
    ),
    (
        {"optimizer": {"type": "categorical", "choices": ["adam", "lamb"]}},
        "tune.space.optimizer: value 'lamb' is invalid",
    ),
    ({"dropout": {"type": "float", "low": 0.0, "high": 1.0}}, "tune.space.dropout: value 1.0 is invalid"),
    ({"lr": {"type": "uniform", "low": 0.0, "high": 1.0}}, "tune.space.lr: Input tag 'uniform' found using 'type'"),
    ({"lrate": {"type": "float", "low": 0.1, "high": 1.0}}, "tune.space.lrate: --set 'lrate': unknown setting"),
]


@pytest.mark.parametrize(("space", "expected"), BAD_SPACES)
def test_invalid_search_spaces_are_one_line_errors(tmp_path: Path, space: dict, expected: str) -> None:
    raw = yaml.safe_load((SPECS / "digits_cnn.yaml").read_text())
    raw["tune"] = {"metric": "val_acc", "direction": "maximize", "n_trials": 2, "space": space}
    with pytest.raises(SpecError) as caught:
        load_spec(write_spec(tmp_path, raw))
    assert expected in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("tune", "expected"),
    [
        ({"sampler": "annealing"}, "tune.sampler.name: got 'annealing'; input should be 'tpe', 'random', 'gp' or"),
        ({"sampler": "cmaes"}, "sampler 'cmaes' needs the cmaes package"),
        ({"pruner": "patient"}, "tune.pruner.name: got 'patient'"),
        ({"metric": "val_r2"}, "tune.metric 'val_r2': the pruner and checkpoint"),
        ({"metric": "test_acc"}, "logs each epoch while it trains; known: val_loss, val_acc"),
        ({"direction": "up"}, "tune.direction: got 'up'"),
        ({"n_trials": None}, "set n_trials and/or timeout"),
    ],
)
def test_invalid_tune_settings_are_one_line_errors(tmp_path: Path, tune: dict, expected: str) -> None:
    raw = yaml.safe_load((SPECS / "digits_cnn.yaml").read_text())
    raw["tune"] = {
        "metric": "val_acc",
        "direction": "maximize",
        "n_trials": 2,
        "space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}},
    } | tune
    if tune.get("sampler") == "cmaes" and __import__("importlib").util.find_spec("cmaes"):
        pytest.skip("cmaes is installed here")
    with pytest.raises(SpecError) as caught:
        load_spec(write_spec(tmp_path, raw))
    assert expected in str(caught.value)


def test_invalid_space_on_the_command_line_exits_2_with_no_study_and_no_run(tmp_path: Path) -> None:
    raw = yaml.safe_load((SPECS / "regression_tune.yaml").read_text())
    raw["tune"]["space"]["lr"]["low"] = -1.0
    done = labbook("tune", str(write_spec(tmp_path, raw)), cwd=tmp_path, env={"MLFLOW_TRACKING_URI": ""})
    assert done.returncode == 2
    assert done.stderr.strip().endswith("tune.space.lr: log scale needs low > 0, got -1.0")
    assert not (tmp_path / "mlruns").exists()


def tiny_model_run(experiment: str) -> str:
    with mlflow.start_run(experiment_id=mlflow.set_experiment(experiment).experiment_id) as run:
        # Stated requirements, as the train notebook states them: inferring them reloads the model (~9 s).
        example = np.zeros((1, 2), np.float32)
        info = mlflow.pytorch.log_model(
            torch.nn.Linear(2, 1), name="model", input_example=example, pip_requirements=["torch"]
        )
        mlflow.set_tag("labbook.model_uri", info.model_uri)
    return run.info.run_id


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_champion_moves_only_on_improvement(store: str, direction: str) -> None:
    mlflow.set_tracking_uri(store)
    sign = 1 if direction == "maximize" else -1
    first = promote("m", tiny_model_run("e"), "val_acc", direction, 0.80 * sign)
    assert first["promoted"] and first["previous_value"] is None
    worse = promote("m", tiny_model_run("e"), "val_acc", direction, 0.70 * sign)
    assert not worse["promoted"] and worse["champion_version"] == first["version"]
    better = promote("m", tiny_model_run("e"), "val_acc", direction, 0.90 * sign)
    assert better["promoted"] and better["previous_value"] == pytest.approx(0.80 * sign)

    client = MlflowClient(store)
    champion = client.get_model_version_by_alias("m", "champion")
    assert int(champion.version) == better["version"] == 3
    assert float(champion.tags["labbook.val_acc"]) == pytest.approx(0.90 * sign)
    assert float(champion.tags["labbook.champion_val_acc_before"]) == pytest.approx(0.80 * sign)
    assert client.get_model_version("m", str(worse["version"])).tags["labbook.champion_val_acc_before"] == str(
        0.80 * sign
    )


def test_confirm_top_reruns_with_fresh_seeds_and_picks_the_champion_by_mean(store: str, tmp_path: Path) -> None:
    raw = yaml.safe_load((SPECS / "regression_tune.yaml").read_text())
    raw["trainer"]["max_epochs"] = 3
    raw["tune"]["pruner"] = "none"
    spec = write_spec(tmp_path, raw)
    done = labbook("tune", str(spec), "--n-trials", "2", "--confirm-top", "1", "--seeds", "2", "--no-report")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mean ± 95% interval" in done.stdout

    client, [parent], children = runs_of(store, "regression-tune")
    confirms = [c for c in children if c.data.tags.get("labbook.kind") == "confirm"]
    assert len(children) == 4 and len(confirms) == 2
    assert sorted(c.data.params["seed"] for c in confirms) == ["43", "44"]  # fresh seeds, spec seed is 42
    trial = confirms[0].data.tags["labbook.confirms_trial"]
    values = [max(m.value for m in client.get_metric_history(c.info.run_id, "val_r2")) for c in confirms]
    mean = parent.data.metrics[f"confirm_trial{trial}_val_r2_mean"]
    assert mean == pytest.approx(sum(values) / 2)
    assert parent.data.metrics[f"confirm_trial{trial}_val_r2_ci95"] == pytest.approx(
        12.706 * abs(values[0] - values[1]) / 2, rel=1e-3
    )  # t(0.975, 1) · s / √2, with s = |a − b| / √2
    assert "tables/confirm_top.csv" in [a.path for a in client.list_artifacts(parent.info.run_id, "tables")]
    champion = client.get_model_version_by_alias("regression_tune", "champion")
    assert champion.tags["labbook.run_id"] in {c.info.run_id for c in confirms}
    assert float(champion.tags["labbook.val_r2"]) == pytest.approx(mean)


def test_a_failing_notebook_fails_its_trial_and_the_study_goes_on(store: str, optuna_url: str, tmp_path: Path) -> None:
    from tests.test_run import failing_notebook

    raw = yaml.safe_load((SPECS / "regression_tune.yaml").read_text())
    raw["notebook"] = str(failing_notebook(tmp_path))
    raw["trainer"]["max_epochs"] = 1
    done = labbook("tune", str(write_spec(tmp_path, raw)), "--n-trials", "2", "--no-report")
    assert done.returncode == 1
    assert "error: no trial completed; first error: RuntimeError: evaluation exploded (cell " in done.stderr
    trials = optuna.load_study(study_name="regression_tune", storage=optuna_url).trials
    assert [t.state.name for t in trials] == ["FAIL", "FAIL"]  # the second trial ran after the first failed
    client = MlflowClient(store)
    for trial in trials:
        assert trial.user_attrs["error"].startswith("RuntimeError: evaluation exploded")
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "FAILED" and run.data.tags["labbook.trial_state"] == "FAIL"
        assert run.data.tags["labbook.error"] == trial.user_attrs["error"]
        assert "notebook/failing.ipynb" in [a.path for a in client.list_artifacts(run.info.run_id, "notebook")]


def test_ddp_inside_a_trial_reports_from_rank_0_and_prunes_every_rank(
    store: str, optuna_url: str, tmp_path: Path
) -> None:
    # Two CPU processes per trial; in a Jupyter kernel Lightning's DDP is the fork-based one.
    raw = pruning_spec("ddp_demo", max_epochs=6, devices=2, strategy="ddp_notebook")
    done = labbook("tune", str(write_spec(tmp_path, raw)), "--no-register", "--no-report")
    assert done.returncode == 0, done.stderr[-3000:]
    trials = optuna.load_study(study_name="ddp_demo", storage=optuna_url).trials
    assert len(trials) == 3  # one trial per trial, not one per rank
    client = MlflowClient(store)
    assert len(runs_of(store, "ddp")[2]) == 3
    for trial in trials:
        run_id = trial.user_attrs["mlflow_run_id"]
        epochs = len(client.get_metric_history(run_id, "val_acc"))
        assert epochs == len(trial.intermediate_values)  # logged and reported once per epoch, by rank 0
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    assert pruned and len(pruned[0].intermediate_values) < 6
    run_id = pruned[0].user_attrs["mlflow_run_id"]
    executed = nbformat.read(client.download_artifacts(run_id, "notebook/train.ipynb"), as_version=4)
    errors = [
        o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"
    ]
    assert errors[0]["ename"] == "TrialPruned"


class _BrokenSampler(optuna.samplers.RandomSampler):
    """A real sampler with a bug where `where` says: Optuna's own raised OverflowError on `high: .inf`."""

    def __init__(self, where: str) -> None:
        super().__init__(seed=0)
        self.where = where

    def infer_relative_search_space(self, study, trial):
        if self.where == "relative":  # runs in study.ask(), outside the objective
            raise ValueError("covariance is not positive definite")
        return super().infer_relative_search_space(study, trial)

    def sample_independent(self, study, trial, param_name, param_distribution):
        if self.where == "independent":
            raise OverflowError("Range exceeds valid bounds")
        return super().sample_independent(study, trial, param_name, param_distribution)


@pytest.mark.parametrize(
    ("where", "reason"),
    [
        ("independent", "sampler failed: OverflowError: Range exceeds valid bounds"),
        ("relative", "sampler failed: ValueError: covariance is not positive definite"),
    ],
)
def test_a_sampler_exception_fails_its_trial_not_the_study(
    store: str, optuna_url: str, where: str, reason: str
) -> None:
    from pipelines.study.guarded_sampler import GuardedSampler
    from pipelines.study.tune import TrialFailed, _Worker, create, open_study
    from pipelines.tracking.tags import Attr

    handle = open_study(load_spec(SPECS / "regression_tune.yaml"), n_trials=2, storage=optuna_url)
    study, parent = create(handle)
    assert isinstance(study.sampler, GuardedSampler)  # what every study gets
    study.sampler = GuardedSampler(_BrokenSampler(where))
    worker = _Worker(handle, parent, console=None)
    study.optimize(worker.objective, n_trials=2, catch=(TrialFailed,))  # returns: the study goes on
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL"]
    for trial in study.trials:
        assert trial.user_attrs["error"] == reason
        assert Attr.RUN_ID not in trial.user_attrs  # nothing was trained with no parameters
