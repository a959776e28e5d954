"""`labbook rerun`: a CPU run re-executed from its own record reproduces every final metric."""

from __future__ import annotations

from mlflow import MlflowClient

from pipelines.specs.spec import PROJECT_ROOT
from tests.conftest import labbook


def test_rerun_reproduces_exactly_and_reports_changed_data(store: str) -> None:
    done = labbook("run", str(PROJECT_ROOT / "pipelines" / "regression_mlp.yaml"), "--set", "max_epochs=3")
    assert done.returncode == 0, done.stderr[-2000:]
    client = MlflowClient(store)
    [original] = client.search_runs([client.get_experiment_by_name("regression").experiment_id])
    run_id = original.info.run_id

    again = labbook("rerun", run_id)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "verdict: exact" in again.stdout
    reruns = client.search_runs([original.info.experiment_id], filter_string=f"tags.`labbook.rerun_of` = '{run_id}'")
    assert len(reruns) == 1
    new = reruns[0]
    finals = {k: v for k, v in original.data.metrics.items() if k.startswith(("train_", "val_", "test_"))}
    assert finals and all(new.data.metrics[k] == v for k, v in finals.items())  # bit for bit
    assert new.data.params["max_epochs"] == "3" and new.data.params["seed"] == original.data.params["seed"]
    assert new.data.tags["labbook.rerun_verdict"] == "exact"
    assert "data fingerprint differs" not in again.stderr

    # The data changed since (simulated: the recorded fingerprint no longer matches): said loudly.
    client.set_tag(run_id, "labbook.data_fingerprint", "0123456789abcdef")
    changed = labbook("rerun", run_id)
    assert changed.returncode == 0
    now = original.data.tags["labbook.data_fingerprint"]
    assert f"warning: data fingerprint differs: 0123456789abcdef then, {now} now" in changed.stderr


def test_rerun_of_an_unknown_run_is_one_line(store: str) -> None:
    done = labbook("rerun", "0" * 32)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.strip().count("\n") == 0
