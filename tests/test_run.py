"""`labbook run` and plain papermill, end to end: real notebook execution on a real SQLite store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow.pytorch
import nbformat
import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient

from lightning_modules import build_data, model_class
from pipelines.specs.spec import PROJECT_ROOT
from tests.conftest import labbook

SPECS = PROJECT_ROOT / "pipelines"


def only_run(uri: str, experiment: str):
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r}"
    runs = client.search_runs([found.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def artifact_paths(client: MlflowClient, run_id: str, path: str = "") -> set[str]:
    found: set[str] = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def test_run_digits_mlp_is_one_finished_tracked_run(store: str, tmp_path: Path) -> None:
    done = labbook("run", str(SPECS / "digits_mlp.yaml"))
    assert done.returncode == 0, done.stderr[-3000:]
    client, run = only_run(store, "digits")
    run_id = run.info.run_id
    assert run_id in done.stdout and "test_acc" in done.stdout
    assert run.info.status == "FINISHED"

    # The hyperparameters as params, under the same names as the spec.
    params = run.data.params
    assert params["model"] == "mlp_classifier" and params["lr"] == "0.003" and params["weight_decay"] == "0.0001"
    assert params["hidden_sizes"] == "[64]" and params["optimizer"] == "adamw" and params["max_epochs"] == "30"

    # Per-epoch train/val metrics, and test metrics once.
    for name in ("train_loss", "train_acc", "val_loss", "val_acc", "val_f1", "val_recall"):
        assert len(client.get_metric_history(run_id, name)) == 30, name
    assert len(client.get_metric_history(run_id, "test_acc")) == 1
    metrics = run.data.metrics
    assert max(m.value for m in client.get_metric_history(run_id, "val_acc")) >= 0.90  # real learning
    assert metrics["test_acc"] >= 0.90 and {"test_f1", "test_recall", "test_loss"} <= set(metrics)

    # What a run needs to be repeated.
    tags = run.data.tags
    assert tags["labbook.seed"] == "42"
    assert len(tags["mlflow.source.git.commit"]) == 40 and tags["labbook.git_dirty"] in ("true", "false")
    for package in ("python", "torch", "lightning", "mlflow"):
        assert tags[f"labbook.{package}_version"]
    assert tags["labbook.torch_version"].startswith("2.13.0")
    assert len(tags["labbook.data_fingerprint"]) == 16
    assert tags["labbook.notebook"] == "notebooks/train.ipynb"
    assert Path(tags["labbook.python_executable"]).resolve() == Path(sys.executable).resolve()  # the venv's kernel

    # The executed notebook, its HTML, plots, the checkpoint and the model.
    artifacts = artifact_paths(client, run_id)
    assert {
        "notebook/train.ipynb",
        "notebook/train.html",
        "plots/learning_curves.png",
        "plots/confusion_matrix.png",
        "tables/metrics_per_epoch.csv",
    } <= artifacts
    [checkpoint] = [a for a in artifacts if a.startswith("checkpoints/best-")]
    assert "checkpoints/last.ckpt" in artifacts  # best for evaluating, last for resuming
    executed = nbformat.read(client.download_artifacts(run_id, "notebook/train.ipynb"), as_version=4)
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells)
    assert "<html" in Path(client.download_artifacts(run_id, "notebook/train.html")).read_text()[:2000].lower()

    # The logged model reloads and predicts exactly what the best checkpoint predicts.
    reloaded = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    best = model_class("mlp_classifier").load_from_checkpoint(client.download_artifacts(run_id, checkpoint)).eval()
    datamodule = build_data({"model": "mlp_classifier", "data": "digits"})
    datamodule.setup()
    x = datamodule.splits["test"].tensors[0]
    with torch.no_grad():
        assert torch.equal(reloaded(x), best(x))
        accuracy = (reloaded(x).argmax(-1) == datamodule.splits["test"].tensors[1]).float().mean()
    assert float(accuracy) == pytest.approx(metrics["test_acc"], abs=1e-6)


def test_run_regression_reaches_r2_and_plots_residuals(store: str) -> None:
    done = labbook("run", str(SPECS / "regression_mlp.yaml"), "--run-name", "reg")
    assert done.returncode == 0, done.stderr[-3000:]
    client, run = only_run(store, "regression")
    assert run.info.run_name == "reg"
    assert max(m.value for m in client.get_metric_history(run.info.run_id, "val_r2")) >= 0.90
    assert run.data.metrics["test_r2"] >= 0.90
    assert "plots/residuals.png" in artifact_paths(client, run.info.run_id)
    assert "hidden_sizes" in run.data.params and "channels" not in run.data.params


def failing_notebook(tmp_path: Path) -> Path:
    """The train notebook with a cell that raises right after training."""
    notebook = nbformat.read(PROJECT_ROOT / "notebooks" / "train.ipynb", as_version=4)
    fit = next(i for i, c in enumerate(notebook.cells) if "trainer.fit(" in c.source)
    notebook.cells.insert(fit + 1, nbformat.v4.new_code_cell('raise RuntimeError("evaluation exploded")'))
    path = tmp_path / "failing.ipynb"
    nbformat.write(notebook, path)
    return path


def test_failing_notebook_leaves_a_failed_run_with_the_partial_notebook(store: str, tmp_path: Path) -> None:
    raw = yaml.safe_load((SPECS / "digits_mlp.yaml").read_text())
    raw |= {"notebook": str(failing_notebook(tmp_path)), "experiment": "broken"}
    spec = tmp_path / "broken.yaml"
    spec.write_text(yaml.safe_dump(raw))

    done = labbook("run", str(spec), "--set", "max_epochs=2")
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: notebook failed: RuntimeError: evaluation exploded (cell ")

    client, run = only_run(store, "broken")
    assert run.info.status == "FAILED"
    assert "RuntimeError: evaluation exploded" in run.data.tags["labbook.error"]
    assert len(client.get_metric_history(run.info.run_id, "val_acc")) == 2  # what it did is kept
    artifacts = artifact_paths(client, run.info.run_id)
    assert {"notebook/failing.ipynb", "notebook/failing.html"} <= artifacts
    partial = nbformat.read(client.download_artifacts(run.info.run_id, "notebook/failing.ipynb"), as_version=4)
    errors = [
        o for c in partial.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"
    ]
    assert errors and errors[0]["evalue"] == "evaluation exploded"
    assert not any(c.get("execution_count") for c in partial.cells[-3:] if c.cell_type == "code")


def test_invalid_spec_exits_2_and_creates_no_run(tmp_path: Path) -> None:
    raw = yaml.safe_load((SPECS / "digits_mlp.yaml").read_text())
    raw["model"]["dropout"] = 1.5
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump(raw))
    done = labbook("run", str(spec), cwd=tmp_path, env={"MLFLOW_TRACKING_URI": ""})
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: {spec}: model.dropout: Input should be less than 1 (got 1.5)"
    assert not (tmp_path / "mlruns").exists()


def test_plain_papermill_runs_the_notebook_and_tracks_it(store: str, tmp_path: Path) -> None:
    papermill = Path(sys.executable).with_name("papermill")
    out = tmp_path / "out.ipynb"
    done = subprocess.run(
        [
            str(papermill),
            str(PROJECT_ROOT / "notebooks" / "train.ipynb"),
            str(out),
            "-p",
            "model",
            "cnn",
            "-p",
            "lr",
            "0.01",
            "-p",
            "max_epochs",
            "2",
            "-p",
            "experiment_name",
            "by-hand",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    client, run = only_run(store, "by-hand")
    assert run.data.params["model"] == "cnn" and run.data.params["lr"] == "0.01"
    assert run.data.params["flatten"] == "False"  # the CNN got images without being told
    assert run.info.status == "FINISHED" and run.data.tags["labbook.notebook"] == "notebooks/train.ipynb"
    # MLflow's default pt2 format (torch.export): no pickle, so loading runs no code of ours.
    reloaded = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    [checkpoint] = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints") if "best-" in a.path]
    best = model_class("cnn").load_from_checkpoint(client.download_artifacts(run.info.run_id, checkpoint)).eval()
    datamodule = build_data({"model": "cnn", "data": "digits"})
    datamodule.setup()
    images = datamodule.splits["test"].tensors[0]
    assert images.shape[1:] == (1, 8, 8)
    with torch.no_grad():
        assert torch.equal(reloaded(images), best(images))
    text = json.dumps(nbformat.read(out, as_version=4).cells[-1].outputs)
    assert f"runs:/{run.info.run_id}/model" in text


def test_parameters_cell_holds_every_setting_as_plain_assignments() -> None:
    notebook = nbformat.read(PROJECT_ROOT / "notebooks" / "train.ipynb", as_version=4)
    [cell] = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    namespace: dict = {}
    exec(cell.source, namespace)  # plain assignments only: nothing to import, nothing to call
    for name in (
        "model",
        "data",
        "lr",
        "weight_decay",
        "l1",
        "dropout",
        "optimizer",
        "scheduler",
        "max_epochs",
        "accelerator",
        "devices",
        "strategy",
        "precision",
        "seed",
        "accumulate_grad_batches",
        "gradient_clip_val",
        "experiment_name",
        "run_name",
        "parent_run_id",
    ):
        assert name in namespace, name
    assert all(not c.get("outputs") for c in notebook.cells if c.cell_type == "code")  # committed clean
    assert notebook.metadata.kernelspec.name == "labbook"
    assert np.isscalar(namespace["lr"])


def _open_store(uri: str, barrier, results) -> None:  # noqa: ANN001 - multiprocessing's own types
    from pipelines.tracking import tracking

    barrier.wait()  # all at once, on a store none of them has seen
    try:
        mlflow = tracking.client(uri)
        mlflow.create_experiment(f"opened by {mlflow.tracking_uri} {__import__('os').getpid()}")
        results.put("ok")
    except Exception as exc:  # noqa: BLE001 - what failed is the answer
        results.put(f"{type(exc).__name__}: {str(exc)[:200]}")


def open_at_once(uri: str, processes: int = 4, timeout: float = 180) -> list[str]:
    """`processes` forked processes open the new store `uri` at the same moment; what each said."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(processes), context.Queue()
    started = [context.Process(target=_open_store, args=(uri, barrier, results)) for _ in range(processes)]
    for process in started:
        process.start()
    said = [results.get(timeout=timeout) for _ in started]
    for process in started:
        process.join(timeout=60)
    return said


def test_commands_opening_a_new_store_at_once_all_succeed_and_share_one_store(tmp_path: Path) -> None:
    """MLflow migrates a new SQLite store in whichever process opens it first: two at once broke it."""
    for attempt in range(2):
        uri = f"sqlite:///{tmp_path / str(attempt) / 'mlruns' / 'mlflow.db'}"
        assert open_at_once(uri, timeout=120) == ["ok"] * 4
        assert len(MlflowClient(uri).search_experiments()) == 5  # theirs and Default


def test_a_parameter_longer_than_250_characters_is_logged_whole(store: str) -> None:
    """Lightning's logger cut values at 250 characters while labbook logged them whole: MLflow failed
    the run ("Changing param values is not allowed"). One writer now: the run finishes, the value whole."""
    sizes = [8] * 90
    done = labbook("run", str(SPECS / "regression_mlp.yaml"), "--set", "max_epochs=1", "--set", f"hidden_sizes={sizes}")
    assert done.returncode == 0, done.stderr[-3000:]
    _, run = only_run(store, "regression")
    assert run.info.status == "FINISHED"
    assert run.data.params["hidden_sizes"] == str(sizes) and len(str(sizes)) > 250
    assert run.data.params["input_shape"] == "(10,)"  # the model's own hparams, through the same writer


def test_a_parameter_past_mlflows_limit_is_kept_whole_as_an_artifact(store: str) -> None:
    from pipelines.tracking import tracking

    client = MlflowClient(store)
    run_id = tracking.start_run(client, "long-params")
    long = list(range(2000))  # 9,889 characters: MLflow keeps 6,000 of a param
    for _ in range(2):  # two writers (labbook's, then the notebook's logger) log the same value
        tracking.log_params(client, run_id, {"hidden_sizes": long, "lr": 0.1})
    params = client.get_run(run_id).data.params
    assert len(params["hidden_sizes"]) == 6000 and params["lr"] == "0.1"
    assert params["hidden_sizes"].endswith(
        f" ...[{len(str(long))} characters; whole value: artifact params/hidden_sizes.txt]"
    )
    whole = Path(client.download_artifacts(run_id, "params/hidden_sizes.txt"))
    assert whole.read_text() == str(long)
