"""`labbook compare` / `pipelines.reports.compare.compare` on a real SQLite store."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from pipelines.reports.compare import compare
from pipelines.tracking import tracking
from tests.conftest import labbook

LRS = [0.1, 0.01, 0.001, 0.0001]
ACCS = [0.80, 0.95, 0.90, 0.60]


@pytest.fixture
def study_runs(store: str) -> list[str]:
    """A study's parent run and 4 trial runs (lr, val_acc), plus an unrelated run."""
    client = MlflowClient(store)
    parent = tracking.start_run(
        client, "digits", "study:s1", tags={"labbook.kind": "study", "labbook.study_name": "s1"}
    )
    ids = []
    for n, (lr, acc) in enumerate(zip(LRS, ACCS, strict=True)):
        run_id = tracking.start_run(
            client,
            "digits",
            f"s1-trial-{n}",
            parent_run_id=parent,
            tags={"labbook.study_name": "s1", "labbook.trial_state": "COMPLETE"},
        )
        tracking.log_params(client, run_id, {"lr": lr, "optimizer": "adamw", "hidden_sizes": [64]})
        for epoch, value in enumerate((acc - 0.2, acc)):
            client.log_metric(run_id, "val_acc", value, step=epoch)
        client.log_metric(run_id, "val_loss", 1 - acc)
        tracking.finish_run(client, run_id)
        ids.append(run_id)
    other = tracking.start_run(client, "digits", "by-hand")
    client.log_metric(other, "val_acc", 0.99)
    tracking.finish_run(client, parent)
    return ids


def test_a_study_compares_as_one_row_per_trial_best_first(study_runs: list[str]) -> None:
    frame = compare(study="s1", metric="val_acc")
    assert len(frame) == 4  # the trials, not the parent, not the unrelated run
    assert list(frame["val_acc"]) == sorted(ACCS, reverse=True)  # final values, best first
    assert list(frame["lr"]) == [0.01, 0.001, 0.1, 0.0001]  # params as numeric columns
    assert {"run_id", "run_name", "state", "duration_s", "optimizer", "hidden_sizes", "val_loss"} <= set(frame.columns)
    assert set(frame["run_id"]) == set(study_runs)
    assert list(compare(study="s1", metric="val_loss")["val_loss"]) == sorted(1 - a for a in ACCS)  # losses ascend
    assert len(compare(study="s1", metric="val_acc", top=2)) == 2
    assert len(compare(experiment="digits")) == 6


def test_unknown_metric_or_experiment_is_a_clear_error(study_runs: list[str]) -> None:
    with pytest.raises(ValueError, match="--metric: no metric 'val_f1' in these runs; known: val_acc, val_loss"):
        compare(study="s1", metric="val_f1")
    with pytest.raises(ValueError, match="--experiment: no experiment named 'nope'"):
        compare(experiment="nope")


@pytest.mark.parametrize("fmt", ["csv", "markdown", "html"])
def test_files_are_written_and_parse_back(study_runs: list[str], tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"runs.{fmt}"
    done = labbook("compare", "--study", "s1", "--metric", "val_acc", "--format", fmt, "--output", str(path))
    assert done.returncode == 0, done.stderr
    text = path.read_text()
    if fmt == "csv":
        back = pd.read_csv(path)
    elif fmt == "html":
        back = pd.read_html(io.StringIO(text))[0]
    else:
        lines = [line for line in text.splitlines() if not set(line) <= set("|:- ")]
        header = [h.strip() for h in lines[0].strip("|").split("|")]
        rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]
        back = pd.DataFrame(rows, columns=header).astype({"val_acc": float, "lr": float})
    assert len(back) == 4 and list(back["val_acc"]) == sorted(ACCS, reverse=True)
    assert list(back["lr"]) == [0.01, 0.001, 0.1, 0.0001]


def test_terminal_table_and_bad_format(study_runs: list[str]) -> None:
    done = labbook("compare", "--study", "s1", "--metric", "val_acc")
    assert done.returncode == 0, done.stderr
    assert "4 runs, best val_acc first" in done.stdout and "s1-trial-1" in done.stdout
    bad = labbook("compare", "--format", "xml")
    assert bad.returncode == 2 and "--format: got 'xml'" in bad.stderr


def test_top_k_is_the_first_k_rows_of_the_whole_ranking(store: str) -> None:
    # `--top K` is sorted and cut by the store (issue 26): it must give exactly the rows the full
    # ranking starts with: ties in the same order, NaN and missing values last, the study's own
    # run (here with the best value of all) never a row, the direction overridable.
    client = MlflowClient(store)
    parent = tracking.start_run(
        client, "digits", "study:s2", tags={"labbook.kind": "study", "labbook.study_name": "s2"}
    )
    client.log_metric(parent, "val_acc", 1.0)
    for n, acc in enumerate([0.9, float("nan"), 0.9, None, 0.5, 0.7, 0.95]):
        run_id = tracking.start_run(
            client, "digits", f"s2-trial-{n}", parent_run_id=parent, tags={"labbook.study_name": "s2"}
        )
        if acc is not None:
            client.log_metric(run_id, "val_acc", acc)
        client.log_metric(run_id, "val_loss", n / 10)
        tracking.finish_run(client, run_id)
    tracking.finish_run(client, parent)
    for metric, ascending in (("val_acc", None), ("val_acc", True), ("val_loss", None), ("val_loss", False)):
        whole = compare(study="s2", metric=metric, ascending=ascending)
        assert len(whole) == 7 and parent not in set(whole["run_id"])
        for k in range(1, 9):
            top = compare(study="s2", metric=metric, top=k, ascending=ascending)
            assert list(top["run_id"]) == list(whole["run_id"].head(k)), (metric, ascending, k)
    assert compare(study="s2", metric="val_acc", top=3)["val_acc"].tolist() == [0.95, 0.9, 0.9]
