"""`labbook diff`: two real runs of the train notebook that differ in `lr`, compared end to end."""

from __future__ import annotations

from pipelines.execution import notebook
from pipelines.execution.run import run_training
from pipelines.reports.diff import diff
from pipelines.specs.spec import PROJECT_ROOT, load_spec
from tests.conftest import labbook


def test_diff_names_the_parameter_and_the_notebook_cells_whose_outputs_differ(store: str) -> None:
    spec = load_spec(PROJECT_ROOT / "pipelines" / "regression_mlp.yaml", {"max_epochs": 2})
    with notebook.warm_kernels(1, expected=2) as kernels:
        a = run_training(spec.with_overrides({"lr": 0.01}), progress_bar=False, kernels=kernels)
        b = run_training(spec.with_overrides({"lr": 0.003}), progress_bar=False, kernels=kernels)
    assert a.error is None and b.error is None

    found = diff(a.run_id, b.run_id)
    assert found.params.to_dict("records") == [{"name": "lr", "a": "0.01", "b": "0.003"}]
    losses = found.metrics.set_index("name").loc["val_loss"]
    assert losses["a"] != losses["b"] and losses["diff"] == losses["b"] - losses["a"]
    assert found.tags.empty  # same commit, data, versions and seed

    # The injected parameters cell differs in source; the cells that print the run's results differ
    # in outputs (the test metrics, the learning-curve plot).
    changed = found.cells.set_index("cell")["changed"].to_dict()
    first_lines = found.cells.set_index("cell")["first_line"].to_dict()
    assert any(first_lines[c].startswith("# Parameters") and changed[c] == "source" for c in changed)
    outputs = {first_lines[c] for c, kind in changed.items() if "outputs" in kind}
    assert any(line.startswith("test_metrics = trainer.test") for line in outputs), outputs
    tested = found.cells[found.cells["first_line"].str.startswith("test_metrics")].iloc[0]
    assert tested["a"] != tested["b"] and "test_loss" in tested["a"] + tested["b"]

    done = labbook("diff", a.run_id, b.run_id, env={"COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    assert "parameters that differ" in done.stdout and "│ lr " in done.stdout and "test_metrics" in done.stdout
    assert "[image/png]" in done.stdout  # the learning-curve plot changed: shown as text, not lost as markup


def test_diff_of_an_unknown_run_is_one_line(store: str) -> None:
    done = labbook("diff", "0" * 32, "1" * 32)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.strip().count("\n") == 0
