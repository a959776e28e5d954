"""Pipelines of notebook steps, end to end: real notebooks, a real SQLite MLflow store, the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import nbformat
import pytest
import yaml
from mlflow import MlflowClient

from pipelines.specs.pipeline_spec import load_pipeline
from pipelines.specs.spec import PROJECT_ROOT, SpecError
from tests.conftest import labbook

STEP = "tests/notebooks/step.ipynb"  # divides value by divisor, records `result`


def write(tmp_path: Path, raw: dict, name: str = "pipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def runs(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"]) if found else []


def by_name(all_runs: list, name: str) -> list:
    return [r for r in all_runs if r.info.run_name == name]


def artifact_names(client: MlflowClient, run_id: str, path: str) -> set[str]:
    return {Path(a.path).name for a in client.list_artifacts(run_id, path)}


def test_tune_then_train_with_the_best_parameters_then_evaluate_register_report(store: str, tmp_path: Path) -> None:
    spec = {
        "name": "tiny_nightly",
        "experiment": "tiny-nightly",
        "steps": [
            {
                "name": "search",
                "kind": "tune",
                "spec": str(PROJECT_ROOT / "pipelines" / "regression_tune.yaml"),
                "n_trials": 2,
                "report": False,
                "set": {"max_epochs": 2},
            },
            {
                "name": "retrain",
                "kind": "train",
                "spec": str(PROJECT_ROOT / "pipelines" / "regression_mlp.yaml"),
                "set": ["${search.best_params}", {"max_epochs": 3}],
            },
            {
                "name": "evaluate",
                "kind": "notebook",
                "notebook": "notebooks/evaluate.ipynb",
                "parameters": {"train_run_id": "${retrain.run_id}"},
            },
            {"name": "promote", "kind": "register", "run": "${retrain.run_id}", "metric": "test_r2"},
            {"name": "report", "kind": "report"},
        ],
    }
    done = labbook("run", str(write(tmp_path, spec)))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client = MlflowClient(store)
    found = runs(store, "tiny-nightly")
    [parent] = [r for r in found if r.data.tags.get("labbook.kind") == "pipeline"]
    tags = parent.data.tags
    assert parent.info.status == "FINISHED" and tags["labbook.pipeline"] == "tiny_nightly"
    assert tags["labbook.trigger"] == "manual"

    # Every step is a run nested under the pipeline run, with its executed notebook (ipynb + HTML).
    steps = {r.info.run_name: r for r in found if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(steps) == {
        "study:tiny_nightly-search-" + parent.info.run_id[:8],
        "retrain",
        "evaluate",
        "promote",
        "report",
    }
    study_run = next(r for name, r in steps.items() if name.startswith("study:"))
    notebooks = {"retrain": "train", "evaluate": "evaluate", "promote": "register", "report": "report"}
    for name, notebook in notebooks.items():
        assert {f"{notebook}.ipynb", f"{notebook}.html"} <= artifact_names(client, steps[name].info.run_id, "notebook")
        assert steps[name].info.status == "FINISHED"
    trials = [r for r in found if r.data.tags.get("mlflow.parentRunId") == study_run.info.run_id]
    assert len(trials) == 2 and all(artifact_names(client, t.info.run_id, "notebook") for t in trials)

    # Step 2 trained with step 1's best parameters, as recorded on the pipeline run.
    outputs = {k.removeprefix("labbook.outputs."): json.loads(v) for k, v in tags.items() if "outputs." in k}
    best = outputs["search"]["best_params"]
    assert set(best) == {"lr"} and outputs["search"]["best_run_id"] in {t.info.run_id for t in trials}
    retrain = steps["retrain"]
    assert float(retrain.data.params["lr"]) == pytest.approx(best["lr"], rel=1e-12)
    assert retrain.data.params["max_epochs"] == "3"

    # The evaluate notebook scores the stored model exactly as the training run's own test did.
    assert steps["evaluate"].data.metrics["test_r2"] == pytest.approx(retrain.data.metrics["test_r2"], abs=1e-5)

    # The first registered version becomes the champion, and it is the retrained run's model.
    mlflow.set_tracking_uri(store)
    champion = client.get_model_version_by_alias("tiny_nightly", "champion")
    assert champion.tags["labbook.run_id"] == retrain.info.run_id
    assert outputs["promote"]["promoted"] is True and outputs["promote"]["model_uri"] == "models:/tiny_nightly@champion"

    # The pipeline run itself carries the report notebook, with the steps table in it.
    assert {"report.ipynb", "report.html"} <= artifact_names(client, parent.info.run_id, "report")
    report = nbformat.read(client.download_artifacts(parent.info.run_id, "report/report.ipynb"), as_version=4)
    text = json.dumps([c.get("outputs", []) for c in report.cells])
    assert "retrain" in text and "evaluate" in text


def test_a_failing_step_stops_the_pipeline_and_from_completes_it(store: str, tmp_path: Path) -> None:
    spec = {
        "name": "divide",
        "report": False,
        "steps": [
            {"name": "first", "kind": "notebook", "notebook": STEP, "parameters": {"value": 6}},
            {
                "name": "second",
                "kind": "notebook",
                "notebook": STEP,
                "parameters": {"value": "${first.outputs.result}", "divisor": 0},
            },
        ],
    }
    path = write(tmp_path, spec)
    done = labbook("run", str(path))
    assert done.returncode == 1
    assert "step second failed: ZeroDivisionError" in done.stderr and "--from second" in done.stderr
    client = MlflowClient(store)
    found = runs(store, "divide")
    [parent] = by_name(found, "pipeline:divide")
    assert parent.info.status == "FAILED" and parent.data.tags["labbook.failed_step"] == "second"
    assert "ZeroDivisionError" in parent.data.tags["labbook.error"]
    [first] = by_name(found, "first")
    [failed] = by_name(found, "second")
    assert first.info.status == "FINISHED" and failed.info.status == "FAILED"
    # The partly executed notebook is attached to the failed step: it ends with the error.
    partial = nbformat.read(client.download_artifacts(failed.info.run_id, "notebook/step.ipynb"), as_version=4)
    errors = [o for c in partial.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert errors and errors[0]["ename"] == "ZeroDivisionError"
    assert "step.html" in artifact_names(client, failed.info.run_id, "notebook")

    # Fix the spec, continue from the failed step: step 1 is not run again, its output is reused.
    spec["steps"][1]["parameters"]["divisor"] = 2
    write(tmp_path, spec)
    done = labbook("run", str(path), "--from", "second")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    found = runs(store, "divide")
    assert len(by_name(found, "first")) == 1
    assert [r.info.status for r in by_name(found, "second")] == ["FAILED", "FINISHED"]
    assert by_name(found, "second")[1].data.metrics["result"] == 3.0
    [parent] = by_name(found, "pipeline:divide")  # the same pipeline run, now complete
    assert parent.info.status == "FINISHED" and "labbook.error" not in parent.data.tags
    assert parent.data.tags["labbook.resumed_from_step"] == "second"


def test_retries_run_a_failing_step_again_and_keep_every_attempt(store: str, tmp_path: Path) -> None:
    marker = tmp_path / "failed-once"
    step = {"name": "flaky", "kind": "notebook", "notebook": STEP, "retries": 1}
    step["parameters"] = {"fail_once_marker": str(marker)}
    done = labbook("run", str(write(tmp_path, {"name": "flaky", "report": False, "steps": [step]})))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "retry 1 of 1" in done.stdout
    found = runs(store, "flaky")
    assert [r.info.status for r in by_name(found, "flaky")] == ["FAILED", "FINISHED"]
    assert by_name(found, "pipeline:flaky")[0].info.status == "FINISHED"


@pytest.mark.parametrize(
    ("second", "expected"),
    [
        ({"parameters": {"value": "${nope.run_id}"}}, "${nope.run_id}: unknown step 'nope'; steps: first, second"),
        ({"parameters": {"value": "${first.best_params}"}}, "a notebook step has no output 'best_params'"),
        ({"parameters": {"value": "${first.run_id.x}"}}, "'run_id' is a single value, not a mapping with keys"),
        ({"parameters": {"value": "${second.run_id}"}}, "step 'second' does not run before 'second'"),
        ({"parameters": {"value": "${first}"}}, "malformed reference '${first}'"),
        ({"parameters": {"nope": 1}}, "parameters.nope: not a parameter of tests/notebooks/step.ipynb; known:"),
        ({"kind": "deploy"}, "steps.1.kind: got 'deploy'; expected one of train, tune, notebook, register, report"),
        ({"notebook": "notebooks/missing.ipynb"}, "notebook: no such notebook 'notebooks/missing.ipynb'"),
        ({"name": "first"}, "two steps are named 'first'"),
    ],
)
def test_invalid_pipelines_are_one_line_errors(tmp_path: Path, second: dict, expected: str) -> None:
    step = {"name": "second", "kind": "notebook", "notebook": STEP, **second}
    path = write(tmp_path, {"name": "p", "steps": [{"name": "first", "kind": "notebook", "notebook": STEP}, step]})
    with pytest.raises(SpecError) as error:
        load_pipeline(path)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_train_step_settings_are_checked_against_its_spec(tmp_path: Path) -> None:
    train = {"name": "train", "kind": "train", "spec": "digits_mlp.yaml"}
    for settings, expected in [
        ({"lrr": 0.1}, "steps.train.set.lrr: unknown setting; known:"),
        ({"dropout": 1.5}, "steps.train.set"),
        ({"max_epochs": 0}, "max_epochs"),
    ]:
        path = write(
            tmp_path,
            {
                "name": "p",
                "steps": [{**train, "spec": str(PROJECT_ROOT / "pipelines" / "digits_mlp.yaml"), "set": settings}],
            },
        )
        with pytest.raises(SpecError) as error:
            load_pipeline(path)
        assert expected in str(error.value), str(error.value)


def test_cli_rejects_a_bad_reference_with_exit_2_and_writes_nothing(tmp_path: Path) -> None:
    step = {"name": "only", "kind": "notebook", "notebook": STEP, "parameters": {"value": "${ghost.run_id}"}}
    path = write(tmp_path, {"name": "p", "steps": [step]})
    for command in (["run", str(path)], ["validate", str(path)]):
        done = labbook(*command, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": ""})
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().count("\n") == 0 and "unknown step 'ghost'" in done.stderr
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()


def test_from_finds_the_latest_run_of_a_pipeline_whose_name_has_a_quote(store: str, tmp_path: Path) -> None:
    from pipelines.pipeline.pipeline import find_pipeline_run
    from pipelines.tracking import tracking

    path = write(tmp_path, {"name": "it's", "steps": [{"name": "only", "kind": "notebook", "notebook": STEP}]})
    pipeline = load_pipeline(path)
    client = MlflowClient(store)
    tags = {"labbook.kind": "pipeline", "labbook.pipeline": "it's"}
    older = tracking.start_run(client, pipeline.experiment_name, "pipeline:it's", tags=tags)
    newer = tracking.start_run(client, pipeline.experiment_name, "pipeline:it's", tags=tags)
    assert find_pipeline_run(client, pipeline) == newer != older
    with pytest.raises(SpecError, match="not a run of pipeline"):
        find_pipeline_run(client, pipeline.model_copy(update={"name": "other"}), older)
