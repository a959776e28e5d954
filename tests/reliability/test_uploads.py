"""Uploads off the critical path lose nothing (issue 26, item 2).

Under a driver the train notebook stages its plots, tables and checkpoints in the run's
`staged/` folder and holds its metrics until the points that order the record (each
checkpoint, each epoch's start); the driver uploads after the kernel is released (a study: in
a background thread while the next trial runs) and closes the run only then. Real notebooks,
processes and stores; a failure is a real one (a file where the artifact store needs a folder,
a run that does not exist), never a mock.
"""

from __future__ import annotations

import time
from pathlib import Path

import mlflow.pytorch
import optuna
import pytest
import torch
import yaml

from pipelines.tracking import staged, tracking
from tests.conftest import labbook
from tests.reliability.test_record import TINY, _runs, _spec, _start, _train_notebook_with, _wait

EXPECTED = {
    "checkpoints/last.ckpt",
    "notebook/train.html",
    "notebook/train.ipynb",
    "plots/learning_curves.png",
    "plots/residuals.png",
    "tables/metrics_per_epoch.csv",
}


def _artifacts(store: str, run_id: str, under: str = "") -> set[str]:
    client = tracking.client(store)
    found: set[str] = set()
    for item in client.list_artifacts(run_id, under or None):
        found |= _artifacts(store, run_id, item.path) if item.is_dir else {item.path}
    return found


def _staging(store: str, run_id: str) -> Path:
    return staged.folder(tracking.output_dir(store, run_id))


def test_a_study_closes_every_trial_run_with_all_its_files_after_the_next_trial_started(
    store: str, tmp_path: Path
) -> None:
    spec = {
        **TINY,
        "trainer": {**TINY["trainer"], "max_epochs": 2},
        "tune": {
            "metric": "val_r2",
            "direction": "maximize",
            "n_trials": 3,
            "sampler": {"name": "random", "seed": 3},
            "pruner": {"name": "none"},
            "space": {"lr": {"type": "float", "low": 0.001, "high": 0.1, "log": True}},
        },
    }
    path = tmp_path / "tiny_tune.yaml"
    path.write_text(yaml.safe_dump(spec))
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    done = labbook("tune", str(path), "--storage", storage, "--no-register", "--no-report")
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="tiny", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    trial_runs = [r for r in _runs(store) if "labbook.trial_number" in r.data.tags]
    assert len(trial_runs) == 3
    for run in trial_runs:
        assert run.info.status == "FINISHED", run.data.tags.get("labbook.error")
        assert run.data.tags["labbook.trial_state"] == "COMPLETE"
        assert _artifacts(store, run.info.run_id) >= EXPECTED, run.info.run_id
        assert len(tracking.client(store).get_metric_history(run.info.run_id, "val_loss")) == 2  # none lost
        assert not _staging(store, run.info.run_id).exists()  # uploaded, then removed
        # The model, logged by the driver from the staged best checkpoint (the kernel only asked)
        assert not (_staging(store, run.info.run_id).parent / "staged-model").exists()
        model = mlflow.pytorch.load_model(run.data.tags["labbook.model_uri"])
        assert torch.isfinite(model(torch.ones(4, 4))).all()


def _notebook_breaking_the_artifact_store(tmp_path: Path) -> Path:
    """The train notebook with a cell, after the plots were staged, that puts a file where the
    run's artifact store needs its `plots/` folder: the driver's upload of the plots then fails."""
    source = (
        "from pathlib import Path\n"
        "from urllib.parse import urlparse\n"
        "from mlflow import MlflowClient\n"
        "root = Path(urlparse(MlflowClient(tracking_uri).get_run(run_id).info.artifact_uri).path)\n"
        "root.mkdir(parents=True, exist_ok=True)\n"
        "(root / 'plots').write_text('in the way')\n"
    )
    return _train_notebook_with(tmp_path, source, after='nb.log_figure(logger, fig, "learning_curves")')


def test_a_failed_upload_closes_the_run_failed_saying_what_failed_and_keeps_the_files(
    store: str, tmp_path: Path
) -> None:
    done = labbook("run", str(_spec(tmp_path, notebook=str(_notebook_breaking_the_artifact_store(tmp_path)))))
    assert done.returncode != 0
    (run,) = _runs(store)
    assert run.info.status == "FAILED"
    error = run.data.tags["labbook.error"]
    assert error.startswith("uploading the run's plots, tables and checkpoints (kept at "), error
    assert ") failed: " in error
    assert "\n" not in error and len(error) <= 500
    kept = _staging(store, run.info.run_id)
    assert (kept / "plots" / "learning_curves.png").is_file()  # nothing lost: still on disk
    assert "notebook/slow_end.ipynb" in _artifacts(store, run.info.run_id)  # the record says what ran


def test_files_staged_for_a_driver_that_died_are_uploaded_by_reap(store: str, tmp_path: Path) -> None:
    marker = tmp_path / "staged_then_wait"
    nb = _train_notebook_with(
        tmp_path,
        f"open({str(marker)!r}, 'w').close()\nimport time\ntime.sleep(600)",
        after='nb.log_table(logger, curves.reset_index(), "metrics_per_epoch")',
    )
    process = _start("run", str(_spec(tmp_path, notebook=str(nb))))
    _wait(marker.exists, process)
    (run,) = _runs(store)
    assert (_staging(store, run.info.run_id) / "plots" / "learning_curves.png").is_file()
    process.kill()  # the driver dies with the plots staged, not uploaded
    process.wait()
    done = labbook("reap")
    assert done.returncode == 0, done.stderr[-2000:]
    (run,) = _runs(store)
    assert run.info.status == "FAILED" and run.data.tags["labbook.error"].startswith("driver died")
    assert {"plots/learning_curves.png", "tables/metrics_per_epoch.csv"} <= _artifacts(store, run.info.run_id)


@pytest.mark.fast
def test_a_held_metric_batch_that_fails_is_raised_by_the_loggers_flush(store: str) -> None:
    from pipelines.nb.in_notebook import DriverOwnedLogger

    client = tracking.client(store)
    run_id = tracking.start_run(client, "tiny", run_name="held")
    logger = DriverOwnedLogger(tracking_uri=store, run_id=run_id)
    logger.log_metrics({"val_loss": 0.5}, step=0)
    logger.flush()
    assert [m.value for m in client.get_metric_history(run_id, "val_loss")] == [0.5]
    client.delete_run(run_id)  # a deleted run takes no metrics: the held batch fails when written
    logger.log_metrics({"val_loss": 0.4}, step=1)
    with pytest.raises(Exception, match="deleted|active"):
        logger.flush()
    client.restore_run(run_id)  # the store is back: the batch that failed is written by the next try
    logger.finalize("success")
    assert [m.value for m in client.get_metric_history(run_id, "val_loss")] == [0.5, 0.4]


@pytest.mark.fast
def test_a_queued_metric_batch_that_fails_in_mlflows_writer_is_raised_and_kept(
    store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batches queued to MLflow's asynchronous writer (an epoch's training metrics, per-step
    metrics) are waited for at the next flush: a failure there raises, and they are written again."""
    from pipelines.nb import in_notebook

    client = tracking.client(store)
    run_id = tracking.start_run(client, "tiny", run_name="queued")
    logger = in_notebook.DriverOwnedLogger(tracking_uri=store, run_id=run_id)
    client.delete_run(run_id)
    monkeypatch.setattr(in_notebook, "FLUSH_SECONDS", 0.0)  # every log is queued at once
    logger.log_metrics({"train_loss": 0.7}, step=0)
    with pytest.raises(Exception, match="deleted|active"):
        logger.flush()
    client.restore_run(run_id)
    logger.finalize("success")
    assert [m.value for m in client.get_metric_history(run_id, "train_loss")] == [0.7]


@pytest.mark.fast
def test_metrics_logged_in_a_long_epoch_reach_the_store_without_waiting_for_its_end(
    store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The logger holds metrics between the points that must order the record (checkpoints,
    epoch starts), but never longer than FLUSH_SECONDS: a reader of the UI sees a long epoch's
    per-step metrics as they come."""
    from pipelines.nb import in_notebook

    monkeypatch.setattr(in_notebook, "FLUSH_SECONDS", 0.3)
    client = tracking.client(store)
    run_id = tracking.start_run(client, "tiny", run_name="long epoch")
    logger = in_notebook.DriverOwnedLogger(tracking_uri=store, run_id=run_id)
    logger.log_metrics({"train_loss_step": 0.9}, step=0)
    time.sleep(0.4)
    logger.log_metrics({"train_loss_step": 0.8}, step=1)  # 0.4 s after the last write: both go now
    deadline = time.monotonic() + 10  # to MLflow's asynchronous writer: in the store within moments
    while len(client.get_metric_history(run_id, "train_loss_step")) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [m.value for m in client.get_metric_history(run_id, "train_loss_step")] == [0.9, 0.8]
    logger.log_metrics({"train_loss_step": 0.7}, step=2)  # held until the next flush
    logger.finalize("success")
    assert [m.value for m in client.get_metric_history(run_id, "train_loss_step")] == [0.9, 0.8, 0.7]


@pytest.mark.fast
def test_whenever_a_checkpoint_is_written_the_store_holds_every_metric_of_the_epochs_it_closed(
    store: str, tmp_path: Path
) -> None:
    """Along the notebook's own logger and callbacks, a real fit, validating once an epoch (where
    Lightning's checkpoint saves at the training epoch's end) and twice an epoch (where it saves
    at each validation's end). A checkpoint callback placed after labbook's (Lightning runs
    checkpoints last, in order) reads the store as each checkpoint is saved: that epoch's
    validation metrics and learning rate are there, and the training metrics of every epoch
    before it (Lightning logs an epoch's training metrics after its checkpoint; they are queued
    to MLflow's writer at once and waited for before the next checkpoint)."""
    import lightning.pytorch as L
    from lightning.pytorch.callbacks import Checkpoint

    from lightning_modules import build_data, build_model
    from pipelines.nb import in_notebook

    client = tracking.client(store)
    keys = ("val_loss", "lr-AdamW/pg1", "train_loss")

    class ReadsTheStore(Checkpoint):
        def __init__(self, run_id: str) -> None:
            self.run_id, self.saved = run_id, []

        def _read(self, trainer: L.Trainer) -> None:
            last = torch.load(trainer.checkpoint_callback.last_model_path, weights_only=False)
            counts = tuple(len(client.get_metric_history(self.run_id, k)) for k in keys)
            self.saved.append((last["epoch"], trainer.global_step == last["global_step"], *counts))

        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if trainer.val_check_interval == 1.0:
                self._read(trainer)

        def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if trainer.val_check_interval != 1.0 and not trainer.sanity_checking:
                self._read(trainer)

    for val_check_interval in (1.0, 0.5):
        run_id = tracking.start_run(client, "tiny", run_name=f"order {val_check_interval}")
        params = {"model": "mlp_regressor", "data": "regression", "n_samples": 240, "batch_size": 32, "max_epochs": 3}
        params |= {"tracking_uri": store, "run_id": run_id, "experiment_name": "tiny"}
        params |= {"output_dir": str(tmp_path / str(val_check_interval))}
        logger = in_notebook.mlflow_logger(params)
        datamodule = build_data(params)
        probe = ReadsTheStore(run_id)
        trainer = L.Trainer(
            max_epochs=3,
            logger=logger,
            callbacks=in_notebook.callbacks(params, run_id, "val_loss", "min") + [probe],
            accelerator="cpu",
            enable_progress_bar=False,
            log_every_n_steps=1,
            val_check_interval=val_check_interval,
        )
        trainer.fit(build_model(params, datamodule), datamodule=datamodule)
        if val_check_interval == 1.0:  # (epoch saved, saved at this step, val_loss, lr, train_loss rows)
            assert probe.saved == [(0, True, 1, 1, 0), (1, True, 2, 2, 1), (2, True, 3, 3, 2)]
        else:  # two validations an epoch, each followed by a save
            assert probe.saved == [(i // 2, True, i + 1, i // 2 + 1, i // 2) for i in range(6)]
        assert len(client.get_metric_history(run_id, "train_loss")) == 3  # the last epoch's too, at the end


@pytest.mark.fast
def test_a_staged_artifact_path_cannot_leave_the_staging_folder(tmp_path: Path) -> None:
    staging = tmp_path / "staged"
    assert staged.path(staging, "plots/a.png") == (staging / "plots" / "a.png").resolve()
    for bad in ("../escape.png", "/etc/passwd", "plots/../../x"):
        with pytest.raises(ValueError, match="leaves the run's staging folder"):
            staged.path(staging, bad)


@pytest.mark.fast
def test_a_symbolic_link_in_the_staging_folder_is_never_followed_nor_uploaded(store: str, tmp_path: Path) -> None:
    """Whoever uploads (the driver, or `labbook reap` run by another user) must not copy a file of
    theirs into the artifact store because a notebook left a link to it in its staging folder."""
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "id_rsa").write_text("PRIVATE KEY")
    client = tracking.client(store)
    run_id = tracking.start_run(client, "tiny", run_name="links")
    staging = tmp_path / "staged"
    staged.path(staging, "plots/curve.png").write_bytes(b"png")
    (staging / "plots" / "key.png").symlink_to(secret / "id_rsa")
    (staging / "tables").symlink_to(secret, target_is_directory=True)
    assert staged.upload(client, run_id, staging) == 1
    assert _artifacts(store, run_id) == {"plots/curve.png"}
    assert not staging.exists() and (secret / "id_rsa").read_text() == "PRIVATE KEY"  # links removed, targets kept


def test_a_study_whose_best_trial_could_not_log_its_model_registers_nothing_and_says_why(
    store: str, tmp_path: Path
) -> None:
    """A hostile notebook's request fails every trial run's model: the study still ends (FINISHED),
    nothing is registered, and the warning and `labbook.register_error` name the run and why."""
    import yaml

    from pipelines.tracking.tags import Tag
    from tests.conftest import labbook
    from tests.reliability.test_record import TINY, _train_notebook_with

    source = (
        "import json, pathlib\n"
        "request = pathlib.Path(artifacts_dir).parent / 'staged-model' / 'request.json'\n"
        "request.write_text(json.dumps({**json.loads(request.read_text()), 'class': 'subprocess.Popen'}))\n"
    )
    notebook = _train_notebook_with(tmp_path, source, after="print(model_uri)")
    spec = {
        **TINY,
        "notebook": str(notebook),
        "tune": {
            "metric": "val_r2",
            "direction": "maximize",
            "n_trials": 2,
            "sampler": {"name": "random", "seed": 3},
            "pruner": {"name": "none"},
            "space": {"lr": {"type": "float", "low": 0.001, "high": 0.1, "log": True}},
        },
    }
    path = tmp_path / "tiny_tune.yaml"
    path.write_text(yaml.safe_dump(spec))
    done = labbook("tune", str(path), "--storage", f"sqlite:///{tmp_path / 'optuna.db'}", "--no-report")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "warning: not registered: the best trial's run" in " ".join(done.stdout.split())
    client = tracking.client(store)
    (study_run,) = [
        r
        for r in client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
        if r.info.run_name.startswith("study")
    ]
    assert study_run.info.status == "FINISHED"
    assert "is FAILED (logging the model from its staged checkpoint" in study_run.data.tags[Tag.REGISTER_ERROR]
    assert client.search_model_versions("name='tiny'") == []
