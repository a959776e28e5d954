"""The thin helper a notebook imports: its MLflow logger, figures and model, in a few calls.

The notebook keeps the story (build, fit, evaluate, plot); this module keeps the MLflow
plumbing out of it. It works both under `labbook run` (which created the run and passes its
`run_id`) and under plain `papermill` (which passes nothing, so a new run is created here).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.loggers.logger import DummyLogger

from pipelines.specs.spec import TRACKING_PARAMETERS, hyperparameters, notebook_parameters
from pipelines.tracking import staged, tracking
from pipelines.tracking.tags import Attr, Tag
from pipelines.tracking.tracking import record_outputs

NOTEBOOK = "notebooks/train.ipynb"


def is_rank_zero() -> bool:
    """False in the other processes of a torchrun/SLURM launch: those never touch MLflow.

    Lightning reads the rank from the launcher's environment (RANK, SLURM_PROCID, ...) at import;
    in a kernel, and in its forked DDP processes before they start, it is 0.
    """
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def only_rank_zero_continues() -> None:
    """Under a launcher, end every process but rank 0 here: what follows is reporting."""
    if not is_rank_zero():
        sys.exit(0)


class _OtherRankLogger(DummyLogger):
    """What ranks other than 0 log through: nothing. Even constructing an `MLFlowLogger` opens
    the tracking store (and may create its database), which must happen in rank 0 alone."""

    run_id = None


# How long metrics logged per step may wait in a logger's buffer: the first `log_metrics` this
# long after the last write writes them, so a long epoch's per-step metrics reach the store as it goes.
FLUSH_SECONDS = 5.0


class _BatchingClient:
    """An `MlflowClient` that holds the logger's metrics until `flush()` writes them in one batch.

    Lightning's logger writes each `log_metrics` call at once: three batches an epoch here (the
    learning rate at its start, validation, training), each a SQLite transaction of ~4 ms, or
    MLflow's asynchronous queue, whose writer thread then competes with training for the GIL.
    Both cost ~6% of a 0.4 s epoch (`bench/overhead.py` R1 decomposed). Held metrics are written
    in one `log_batch` (MLflow splits it into its 1,000-metric chunks): before each checkpoint
    synchronously, after every queued batch is written (`flush`, called by `RunRecord`); the
    epoch's training metrics, which Lightning logs after its checkpoint, are queued to MLflow's
    asynchronous writer the moment they come (`write_next`, `queue`), as are per-step metrics at
    the first log `FLUSH_SECONDS` after the last write; `finalize` flushes. A write that fails
    raises at the next flush and keeps its metrics for the next try (MLflow's SQL store ignores
    rows it already has), so a metric is never lost silently. Only calls made while `collecting`
    (the logger's own `log_metrics`) are held; everything else is the client's own. Written by
    hand: MLflow's client has no "batch until told" mode.
    """

    def __init__(self, client: Any, run_id: str) -> None:
        self._client = client
        self._run_id = run_id
        self._held: list[Any] = []
        self._queued: list[tuple[Any, list[Any]]] = []  # (MLflow's RunOperations, its metrics)
        self._written_at = time.monotonic()
        self.collecting = False
        self.write_next = False  # queue the next held batch at once (set after a checkpoint)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def log_batch(self, run_id: str, metrics: Any = (), params: Any = (), tags: Any = (), **kwargs: Any) -> Any:
        if self.collecting and run_id == self._run_id and not params and not tags:
            self._held.extend(metrics)
            if self.write_next or time.monotonic() - self._written_at >= FLUSH_SECONDS:
                self.queue()
            return None
        return self._client.log_batch(run_id, metrics=metrics, params=params, tags=tags, **kwargs)

    def queue(self) -> None:
        """Hand every held metric to MLflow's asynchronous writer, in one batch; `flush` waits for it."""
        self.write_next = False
        held, self._held = self._held, []
        self._written_at = time.monotonic()
        if held:
            self._queued.append((self._client.log_batch(self._run_id, metrics=held, synchronous=False), held))

    def flush(self) -> None:
        """Write every held metric and wait for every queued batch; raises the store's error, if
        any, and then still holds what was not written (an interrupt in the middle too), for
        `finalize` to try again."""
        self.write_next = False
        queued, self._queued = self._queued, []
        for i, (operations, _) in enumerate(queued):
            try:
                operations.wait()
            except BaseException:
                for _, later in reversed(queued[i:]):
                    self._held[:0] = later
                raise
        held, self._held = self._held, []
        self._written_at = time.monotonic()
        if not held:
            return
        try:
            self._client.log_batch(self._run_id, metrics=held, synchronous=True)
        except BaseException:
            self._held[:0] = held
            raise


class OneWriterLogger(MLFlowLogger):
    """Lightning's MLflow logger whose hyperparameters go through `tracking.log_params`, the one
    writer of a run's params, and whose metrics are written in batches.

    Lightning's own cut each param value at 250 characters, so a param labbook had logged whole
    (`hidden_sizes` of 90 layers) came again with another value and MLflow failed the run
    ("Changing param values is not allowed"). Metrics are held (`_BatchingClient`) and written in
    one batch at each `flush` (the `RunRecord` callback calls it before every checkpoint, and has
    the epoch's training metrics written as they come), at the first log `FLUSH_SECONDS` after the
    last write, and at `finalize` (end of fit and of test); a write that fails raises, so a metric
    is never lost silently.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._mlflow_client = _BatchingClient(self._mlflow_client, self._run_id)

    def log_hyperparams(self, params: Any) -> None:
        from lightning.fabric.utilities.logger import _convert_params, _flatten_dict

        if is_rank_zero():
            tracking.log_params(self.experiment, self.run_id, _flatten_dict(_convert_params(params)))

    def log_metrics(self, metrics: Any, step: int | None = None) -> None:
        self._mlflow_client.collecting = True
        try:
            super().log_metrics(metrics, step)
        finally:
            self._mlflow_client.collecting = False

    def flush(self) -> None:
        """Write every metric logged so far to the store (raises the store's error, if any)."""
        self._mlflow_client.flush()

    def queue_next_batch(self, at_once: bool) -> None:
        """Whether the next metrics logged go to MLflow's writer at once (`RunRecord`: after a checkpoint)."""
        self._mlflow_client.write_next = at_once

    def finalize(self, status: str = "success") -> None:
        self.flush()
        super().finalize(status)


class DriverOwnedLogger(OneWriterLogger):
    """Lightning's MLflow logger on a run that the process driving the notebook owns.

    Lightning's `finalize` marks the run FINISHED (or FAILED) when fit or test ends, while the
    notebook still runs: killed then, the record said FINISHED with no notebook attached. Here
    it only logs what it would log (and waits for the queued metrics); the driver (`labbook run`,
    a study) closes the run after it attached the executed notebook. With `artifacts_dir` (given
    by the driver), plots, tables, texts and checkpoints are staged there for the driver to
    upload after the kernel is released (`pipelines.tracking.staged`); with `defer_model` (a
    study's driver, which closes runs in the background), the model too (`log_model`).
    """

    def __init__(self, *args: Any, artifacts_dir: str | None = None, defer_model: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.artifacts_dir = artifacts_dir or None
        self.defer_model = bool(defer_model) and self.artifacts_dir is not None

    def finalize(self, status: str = "success") -> None:
        self.flush()
        if self._initialized and self._checkpoint_callback:
            self._scan_and_log_checkpoints(self._checkpoint_callback)


def mlflow_logger(params: dict[str, Any]) -> MLFlowLogger:
    """Lightning's MLflow logger on the run `params["run_id"]`, or on a new run if there is none.

    Logs the run's hyperparameters and provenance tags up front, so even a run that fails in
    its first epoch shows what it was. Under torchrun or SLURM only rank 0 creates the run;
    the other ranks get a logger that logs nothing (Lightning's own rank-zero rule).
    """
    if not is_rank_zero():
        return _OtherRankLogger()
    uri = tracking.tracking_uri(params.get("tracking_uri"))
    client = tracking.client(uri)
    tags = {Tag.PYTHON_EXECUTABLE: sys.executable}
    run_id = params.get("run_id")
    owned = bool(run_id)  # given by a driver, which closes it; else this kernel drives its own run
    if not run_id:  # run by plain papermill: nobody recorded provenance yet
        tags |= tracking.provenance_tags(params.get("seed"), NOTEBOOK)
        run_id = tracking.start_run(
            client,
            params.get("experiment_name") or "labbook",
            run_name=params.get("run_name") or None,
            parent_run_id=params.get("parent_run_id") or None,
        )
    tracking.log_params(client, run_id, hyperparameters(params), tags=tags)
    if owned:
        return DriverOwnedLogger(
            tracking_uri=uri,
            run_id=run_id,
            artifacts_dir=params.get("artifacts_dir"),
            defer_model=params.get("defer_model") is True,
        )
    return OneWriterLogger(tracking_uri=uri, run_id=run_id)


def _staged(logger: MLFlowLogger, artifact_path: str) -> Path | None:
    """Where `artifact_path` waits for the driver to upload it, or None: upload it now."""
    folder = getattr(logger, "artifacts_dir", None)
    return staged.path(folder, artifact_path) if folder else None


def flush(logger: MLFlowLogger) -> None:
    """Write everything `logger` holds to the store now (a no-op for a logger that holds nothing)."""
    if callable(getattr(logger, "flush", None)):
        logger.flush()


def lesson_run(
    tracking_uri: str, experiment_name: str, run_id: str, parent_run_id: str, notebook: str, seed: int | None = None
) -> tuple[Any, str]:
    """The MLflow client and run a notebook that is not a training run logs its plots into.

    Under `labbook run` or a pipeline step, the run already exists (`run_id`); under plain
    papermill one is created here, with the same provenance tags.
    """
    client = tracking.client(tracking_uri)
    if not run_id:
        run_id = tracking.start_run(
            client,
            experiment_name or "labbook",
            run_name=Path(notebook).stem,
            parent_run_id=parent_run_id or None,
            tags=tracking.provenance_tags(seed, notebook),
        )
    return client, run_id


def log_lesson(client: Any, run_id: str, params: dict[str, Any], metrics: dict[str, float]) -> None:
    """A lesson notebook's settings and results, in one batched call."""
    from mlflow.entities import Metric

    tracking.log_params(client, run_id, params)
    client.log_batch(run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()])


def pruning_callback(params: dict[str, Any]) -> Any:
    """Optuna's Lightning pruning callback for this notebook's trial, or None outside a study.

    The trial is rebuilt from the shared storage by study name and trial number, with the
    pruner the study was created with, so every epoch's value reaches the driver's trial. The
    storage is Optuna's, reading the other trials lighter (`study.pruning_storage`): a fresh
    kernel's first pruning check would otherwise load every trial of the study in full.
    """
    if not params.get("optuna_storage") or int(params.get("trial_number", -1)) < 0:
        return None
    import optuna
    from optuna_integration import PyTorchLightningPruningCallback

    from pipelines.specs.tune_spec import PrunerSpec
    from pipelines.study import study

    storage = study.pruning_storage(tracking.reveal(params["optuna_storage"], "optuna_storage"))
    loaded = optuna.load_study(study_name=params["study_name"], storage=storage)
    in_epochs = study.counts_epochs_trained(loaded)
    max_epochs = int(params["max_epochs"]) if in_epochs and params.get("max_epochs") else None
    loaded.pruner = study.pruner(PrunerSpec(**loaded.user_attrs.get(Attr.PRUNER, {})), max_resource=max_epochs)
    trial_id = storage.get_trial_id_from_study_id_trial_number(loaded._study_id, int(params["trial_number"]))
    trial = study.pruning_trial(loaded, optuna.trial.Trial(loaded, trial_id))  # steps in epochs trained
    return PyTorchLightningPruningCallback(trial, monitor=params["monitor"])


def strategy(name: str) -> Any:
    """Lightning's strategy for `name`, launched so that it works inside a Jupyter kernel.

    A kernel cannot re-run itself as a script (what `ddp` does) nor pickle notebook-defined
    objects into new interpreters (`ddp_spawn`), so Lightning refuses both there. Inside a
    kernel, `ddp`/`ddp_spawn` become `ddp_notebook` (same DDP, processes forked from the kernel),
    and `fsdp` becomes Lightning's FSDP strategy with the same fork launcher. As a script
    (torchrun, SLURM) every name reaches Lightning unchanged.
    """
    # Lightning's own `_IS_INTERACTIVE` is fixed when it is imported; a forked kernel imported it
    # in its zygote, before any kernel existed: ask the interpreter now (IPython sets sys.ps1).
    if not (hasattr(sys, "ps1") or sys.flags.interactive):
        return name
    if name in ("ddp", "ddp_spawn"):
        return "ddp_notebook"
    if name == "fsdp":
        from lightning_modules.strategies import NotebookFSDP

        return NotebookFSDP()
    return name


def under_slurm_script() -> bool:
    """A script that srun started inside a SLURM job (`labbook run --launcher slurm`, or a
    `labbook script` someone submits), not a notebook's kernel (a study's array task runs those)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return SLURMEnvironment.detect() and not (hasattr(sys, "ps1") or sys.flags.interactive)


def plugins() -> list[Any]:
    """The Trainer's plugins: under SLURM, Lightning's SLURM environment with its auto-requeue off.

    Lightning's own requeue saves from inside the SIGUSR1 handler, which under DDP can meet a
    rank in the middle of a gradient all-reduce and hang; `callbacks` adds
    `lightning_modules.requeue.RequeueOnSignal`, which saves and requeues at a batch end that
    every rank agrees on. The requeued job still resumes from `hpc_ckpt_N.ckpt` (Lightning's
    SLURM resume is unchanged).
    """
    if not under_slurm_script():
        return []
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)]


def checkpoint_dir(params: dict[str, Any], run_id: str) -> Path:
    """The run's own checkpoint folder, or the resumable one `labbook` gave (`trainer.ckpt_path: last`)."""
    if params.get("checkpoint_dir"):
        path = Path(params["checkpoint_dir"])
        path.mkdir(parents=True, exist_ok=True)
        return path
    return output_dir(params, run_id) / "checkpoints"


class RunRecord(Callback):
    """Keeps the run's record in step with training: an epoch's metrics written before its
    checkpoint, its training metrics right after, and a resumed fit's starting point tagged.

    The logger holds metrics until flushed (`OneWriterLogger`). A kernel killed right after a
    checkpoint was saved must not have lost the metrics of the epochs that checkpoint closed (CI:
    a crashed run's record held no `val_loss` though its `last.ckpt` had closed epoch 0; the
    resumed run then starts after epochs the record never shows). `ModelCheckpoint` saves at
    `on_train_epoch_end` when validation runs once an epoch (`_should_save_on_train_epoch_end`),
    at `on_validation_end` otherwise, and Lightning runs it after the other callbacks
    (`_reorder_callbacks`, the monitoring pass): writing here, at both hooks, orders the store
    before the file. Lightning logs the epoch's training metrics after every `on_train_epoch_end`
    hook, so the logger is told to write them at once (`write_next`), and the window between the
    file and them is that one write. One callback for all of it: Lightning calls each callback's
    hooks at every step, so each one costs ~1 µs a hook whether it acts or not.
    """

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Tag the run with the epoch a resumed fit starts at, so a reader sees it did not start at 0."""
        if trainer.ckpt_path and is_rank_zero() and getattr(trainer.logger, "run_id", None):
            client, run_id = trainer.logger.experiment, trainer.logger.run_id
            client.set_tag(run_id, Tag.RESUMED_FROM, str(trainer.ckpt_path))
            client.set_tag(run_id, Tag.RESUMED_AT_EPOCH, str(trainer.current_epoch))
            print(f"resumed from {trainer.ckpt_path}: epoch {trainer.current_epoch}, step {trainer.global_step}")

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self._flush(trainer)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._flush(trainer)
        self._queue_next_batch(trainer, True)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._queue_next_batch(trainer, False)  # nothing came after the last epoch's end: hold again

    @staticmethod
    def _queue_next_batch(trainer: Any, at_once: bool) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, OneWriterLogger):
                logger.queue_next_batch(at_once)

    @staticmethod
    def _flush(trainer: Any) -> None:
        for logger in trainer.loggers:
            flush(logger)


def callbacks(params: dict[str, Any], run_id: str, monitor: str, mode: str) -> list[Any]:
    """Best and last checkpoints, the learning rate per epoch, early stopping and pruning if asked.

    The first callback is the checkpoint (the notebook reads `best_model_path` from it).
    """
    from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor

    from lightning_modules.callbacks import EpochCheckpoint, StopOnNonFiniteLoss

    found: list[Any] = [
        EpochCheckpoint(
            dirpath=checkpoint_dir(params, run_id) if is_rank_zero() else None,  # rank 0 broadcasts it
            filename="best-{epoch}",
            monitor=monitor,
            mode=mode,
            save_top_k=1,
            save_last=True,
        ),
        RunRecord(),
        LearningRateMonitor(logging_interval="epoch"),
        StopOnNonFiniteLoss(),
    ]
    if under_slurm_script():  # with `plugins()`: SLURM's requeue signal handled at a batch end
        from lightning_modules.requeue import RequeueOnSignal

        found.append(RequeueOnSignal())
    if params.get("early_stopping_patience"):
        found.append(EarlyStopping(monitor=monitor, mode=mode, patience=int(params["early_stopping_patience"])))
    pruning = pruning_callback(params)
    if pruning is not None:
        found.append(pruning)
    return found


def check_pruned(callbacks: list[Any]) -> None:
    """Raise `TrialPruned` on every rank if the study's pruner stopped this trial (DDP-safe)."""
    for callback in callbacks:
        if hasattr(callback, "check_pruned"):
            callback.check_pruned()


def log_text(logger: MLFlowLogger, text: str, path: str) -> None:
    """Attach a piece of text (a generated sample, a report) as an artifact at `path` (staged under a driver)."""
    if not is_rank_zero():
        return
    target = _staged(logger, path)
    if target is not None:
        target.write_text(text, encoding="utf-8")
        return
    logger.experiment.log_text(logger.run_id, text, path)


def monitored(params: dict[str, Any], default: tuple[str, str]) -> tuple[str, str]:
    """The metric and mode (`min`/`max`) to checkpoint on: the study's metric in a trial."""
    if params.get("monitor"):
        return params["monitor"], params.get("monitor_mode") or default[1]
    return default


def output_dir(params: dict[str, Any], run_id: str) -> Path:
    """Where this run's checkpoints go: the folder `labbook run` gave, or one beside the store."""
    path = Path(
        params.get("output_dir") or tracking.output_dir(tracking.tracking_uri(params.get("tracking_uri")), run_id)
    )
    path.mkdir(parents=True, exist_ok=True)
    return path


def set_tag(logger: MLFlowLogger, key: str, value: Any) -> None:
    if not is_rank_zero():
        return
    logger.experiment.set_tag(logger.run_id, Tag.of(key), str(value))


def metrics_frame(logger: MLFlowLogger, prefixes: tuple[str, ...] = ("train_", "val_")) -> Any:
    """Per-epoch metrics as MLflow recorded them: one row per epoch, one column per metric.

    Read back from the store rather than from callbacks, so it is the same under DDP (where
    training runs in other processes) and is exactly what the MLflow UI shows.
    """
    import pandas as pd

    flush(logger)  # the last epoch's metrics may still be queued
    client, run_id = logger.experiment, logger.run_id
    names = [k for k in client.get_run(run_id).data.metrics if k.startswith(prefixes)]
    # Lightning logs `epoch` beside every epoch-level metric: rows are real epochs, so a run
    # resumed at epoch 5 (`trainer.ckpt_path: last`) shows epochs 5, 6, ..., not 0, 1, ...
    epoch_at = {m.step: int(m.value) for m in client.get_metric_history(run_id, "epoch")}
    histories = {
        name: sorted(client.get_metric_history(run_id, name), key=lambda m: (m.step, m.timestamp)) for name in names
    }
    by_epoch = all(
        len({epoch_at.get(m.step) for m in history} - {None}) == len(history) for history in histories.values()
    )
    frame = pd.DataFrame(
        {
            name: pd.Series([m.value for m in history], index=[epoch_at[m.step] for m in history] if by_epoch else None)
            for name, history in histories.items()
        }
    )
    frame.index.name = "epoch"
    return frame


def log_figure(logger: MLFlowLogger, figure: Any, name: str) -> None:
    """Attach a matplotlib figure as `plots/<name>.png` (staged for the driver to upload, under one)."""
    if not is_rank_zero():
        return
    target = _staged(logger, f"plots/{name}.png")
    if target is not None:
        figure.savefig(target)  # what MLflow's log_figure does, into the staging folder
        return
    logger.experiment.log_figure(logger.run_id, figure, f"plots/{name}.png")


def log_table(logger: MLFlowLogger, frame: Any, name: str) -> None:
    """Attach a pandas DataFrame as `tables/<name>.csv` (staged for the driver to upload, under one)."""
    if not is_rank_zero():
        return
    target = _staged(logger, f"tables/{name}.csv")
    if target is not None:
        frame.to_csv(target, index=False)
        return
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.csv"
        frame.to_csv(path, index=False)
        logger.experiment.log_artifact(logger.run_id, str(path), "tables")


def log_model(
    logger: MLFlowLogger,
    module: Any,
    example: Any,
    checkpoint: str | os.PathLike | None = None,
    last_checkpoint: str | os.PathLike | None = None,
    from_checkpoint: bool = False,
) -> str:
    """Log the trained module as an MLflow PyTorch model named `model` (and its checkpoints).

    `example`: an input batch (numpy), kept as the model's input example. `from_checkpoint=True`
    says `module` is `checkpoint` reloaded by its class's `load_from_checkpoint` (as the train
    notebook's best model is): in a study, the driver then logs it from that checkpoint after the
    kernel is released (`pipelines.nb.logged_model`), off the trial's critical path. Returns the
    model URI `runs:/<run id>/model`, which `mlflow.pytorch.load_model` reloads once the run is
    closed (in a study, the model is logged before its run is closed).
    """
    if not is_rank_zero():
        return ""
    from pipelines.nb import logged_model

    flush(logger)
    staging = getattr(logger, "artifacts_dir", None)
    staged_best = None
    for path in (checkpoint, last_checkpoint):
        if path and Path(path).exists():
            if staging:
                target = staged.stage_file(staging, path, "checkpoints")
                staged_best = staged_best or (target if path == checkpoint else None)
            else:
                logger.experiment.log_artifact(logger.run_id, str(path), "checkpoints")
    deferred = from_checkpoint and staged_best is not None and getattr(logger, "defer_model", False)
    if deferred and logged_model.can_request(module, example):
        set_tag(logger, "model_requested", "true")  # first: the driver then requires the request
        logged_model.request(staging, module, f"checkpoints/{staged_best.name}", example)
        return f"runs:/{logger.run_id}/model"
    module = module.cpu().eval()
    logged_model.log_pytorch_model(logger._tracking_uri, logger.run_id, logger.experiment_id, module, example)
    return f"runs:/{logger.run_id}/model"


__all__ = [
    "TRACKING_PARAMETERS",
    "callbacks",
    "check_pruned",
    "flush",
    "checkpoint_dir",
    "hyperparameters",
    "is_rank_zero",
    "only_rank_zero_continues",
    "lesson_run",
    "log_lesson",
    "log_text",
    "strategy",
    "monitored",
    "notebook_parameters",
    "pruning_callback",
    "record_outputs",
    "log_figure",
    "metrics_frame",
    "log_model",
    "log_table",
    "mlflow_logger",
    "output_dir",
    "plugins",
    "set_tag",
    "under_slurm_script",
]
