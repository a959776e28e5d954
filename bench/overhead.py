"""What a notebook trial costs over raw PyTorch: the ratios R1-R7 of issue 8, measured side by side.

Every ratio is measured in this one run, its variants interleaved repeat by repeat (so both see
the same machine load), at least 3 repeats, min and median reported:

- R1  full-stack training (the train notebook's code path: Lightning, torchmetrics, checkpoints,
      the MLflow logger on a real SQLite store) ÷ a raw PyTorch loop on the same model, data,
      batch and epochs; at batch 64 and 512; E and 4E epochs separate the fixed cost (per fit)
      from the per-epoch cost (the slope);
- R2  a trial executed as a notebook (warm kernel pool, and cold) − the same notebook's cells
      executed in this process;
- R3  a 10-trial study's wall time ÷ the sum of its trials' raw training times;
- R4  time inside MLflow and Optuna calls ÷ trial wall time (the in-process trial, instrumented);
- R5  epochs trained by a study without pruning ÷ with pruning, and both studies' best metric;
- R6  achieved training FLOP/s ÷ the matmul ceiling measured in the same run, batch 512;
- R7  trials per hour with 2 workers ÷ 1 worker.

Run: `make bench` (or `.venv/bin/python bench/overhead.py [--repeats 3]`). Writes
bench/results.json and bench/results.md (the table in README).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import lightning.pytorch as L  # noqa: E402
import optuna  # noqa: E402
import torch  # noqa: E402
from papermill.iorw import load_notebook_node  # noqa: E402
from papermill.parameterize import parameterize_notebook  # noqa: E402

from lightning_modules import build_data, build_model  # noqa: E402
from pipelines.execution import notebook  # noqa: E402
from pipelines.nb import in_notebook  # noqa: E402
from pipelines.specs.spec import load_spec  # noqa: E402
from pipelines.study import study as studies  # noqa: E402
from pipelines.tracking import tracking  # noqa: E402

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SPEC = BENCH / "trial.yaml"
TRAIN = ROOT / "notebooks" / "train.ipynb"
LABBOOK = Path(sys.executable).with_name("labbook")
R2_EPOCHS = 8  # a ~7 s trial: about as long as warming the next kernel takes beside it
STUDY_EPOCHS = 30  # R3/R7: ~9 s of raw training per trial, so warming is hidden as in real studies
warnings.filterwarnings("ignore")
optuna.logging.set_verbosity(optuna.logging.ERROR)
for name in ("lightning", "lightning.pytorch", "lightning.fabric", "mlflow", "alembic"):
    logging.getLogger(name).setLevel(logging.ERROR)


def say(text: str) -> None:
    print(text, flush=True)


def stats(values: list[float]) -> dict[str, Any]:
    return {"min": min(values), "median": statistics.median(values), "repeats": len(values), "values": values}


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )


def params(**overrides: Any) -> dict[str, Any]:
    return load_spec(SPEC, overrides).parameters()


# --- R1: full stack vs raw loop ---------------------------------------------------------------


def raw_fit(p: dict[str, Any], optimizer: str = "labbook") -> float:
    """Seconds of a plain PyTorch loop: train epochs plus a validation pass each, as Lightning does.

    `optimizer`: "labbook" steps with the optimizer labbook's module builds (AdamW, weight decay on
    matrices only, torch's fused kernel), so the ratios compare the same arithmetic; "default" with
    the loop a user would write first, `torch.optim.AdamW(net.parameters())` (one group, torch's
    per-tensor path), to show what the module's optimizer itself saves.
    """
    L.seed_everything(p["seed"], verbose=False)
    datamodule = build_data(p)
    datamodule.setup()
    module = build_model(p, datamodule)
    net, loss_of = module.net, module.loss
    if optimizer == "default":
        optimizer_ = torch.optim.AdamW(net.parameters(), lr=p["lr"], weight_decay=p["weight_decay"])
    else:
        optimizer_ = module.configure_optimizers()  # no scheduler in the bench trial: a bare optimizer
    assert isinstance(optimizer_, torch.optim.Optimizer)
    train, val = datamodule.train_dataloader(), datamodule.val_dataloader()
    start = time.perf_counter()
    for _ in range(p["max_epochs"]):
        net.train()
        for x, y in train:
            optimizer_.zero_grad(set_to_none=True)
            loss = loss_of(net(x), y)
            loss.backward()
            optimizer_.step()
        net.eval()
        with torch.no_grad():
            total = sum(float(loss_of(net(x), y)) * len(y) for x, y in val)
        assert total == total  # noqa: PLR0124 - the validation loss is used, like Lightning's
    return time.perf_counter() - start


def _driven(p: dict[str, Any], experiment: str = "bench") -> dict[str, Any]:
    """`p` with a run created as `labbook run` creates it before the notebook starts (outside the clock)."""
    client = tracking.client()
    return {**p, "experiment_name": experiment, "run_id": tracking.start_run(client, experiment, run_name="fit")}


def full_stack_fit(p: dict[str, Any], experiment: str = "bench") -> float:
    """Seconds in `trainer.fit` along the train notebook's code path, MLflow logger on (on a
    run a driver created, as under `labbook run`: the logger is the notebook's `DriverOwnedLogger`)."""
    L.seed_everything(p["seed"], verbose=False)
    p = _driven(p, experiment)
    logger = in_notebook.mlflow_logger(p)
    datamodule = build_data(p)
    datamodule.setup()
    net = build_model(p, datamodule)
    monitor, mode = in_notebook.monitored(p, net.monitor)
    trainer = L.Trainer(
        max_epochs=p["max_epochs"],
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=in_notebook.callbacks(p, logger.run_id, monitor, mode),
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        deterministic="warn",
    )
    start = time.perf_counter()
    trainer.fit(net, datamodule=datamodule)
    seconds = time.perf_counter() - start
    tracking.finish_run(tracking.client(), logger.run_id)
    return seconds


def r1(repeats: int, epochs: int) -> dict[str, Any]:
    found: dict[str, Any] = {}
    # The same number of steps at both batch sizes (E × 8 epochs at 512): at E epochs a batch-512
    # fit is ~0.2 s, too short for its slope to rise above the machine's noise.
    for batch, base in ((64, epochs), (512, 8 * epochs)):
        times: dict[str, list[float]] = {f"{v}_{e}": [] for v in ("raw", "full", "naive") for e in ("E", "4E")}
        for r in range(repeats):
            for label, n in (("E", base), ("4E", 4 * base)):
                p = params(batch_size=batch, max_epochs=n)
                times[f"raw_{label}"].append(raw_fit(p))
                times[f"full_{label}"].append(full_stack_fit(p))
                times[f"naive_{label}"].append(raw_fit(p, optimizer="default"))
            say(
                f"  R1 batch {batch} repeat {r + 1}/{repeats}: "
                + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items())
            )
        ratio_4e = [f / r for f, r in zip(times["full_4E"], times["raw_4E"], strict=True)]
        per_epoch = [
            ((f4 - f1) / (3 * epochs)) / ((r4 - r1_) / (3 * epochs))
            for f1, f4, r1_, r4 in zip(times["full_E"], times["full_4E"], times["raw_E"], times["raw_4E"], strict=True)
        ]
        fixed = [
            (f1 - (f4 - f1) / 3) - (r1_ - (r4 - r1_) / 3)
            for f1, f4, r1_, r4 in zip(times["full_E"], times["full_4E"], times["raw_E"], times["raw_4E"], strict=True)
        ]
        # The full stack against the loop a user writes first (torch's default AdamW, one group):
        # what moving that loop into labbook costs or saves, optimizer included.
        over_naive = [
            (f4 - f1) / (n4 - n1)
            for f1, f4, n1, n4 in zip(
                times["full_E"], times["full_4E"], times["naive_E"], times["naive_4E"], strict=True
            )
        ]
        found[f"batch_{batch}"] = {
            "ratio_per_epoch_over_default_adamw_loop": stats(over_naive),
            "ratio_total_4E": stats(ratio_4e),
            "ratio_per_epoch": stats(per_epoch),
            "extra_fixed_seconds_per_fit": stats(fixed),
            "seconds": {k: stats(v) for k, v in times.items()},
        }
    return found


# --- R1 decomposed: what each piece of the full stack adds ----------------------------------------

# Cumulative: each row is the one before plus one piece. The LR monitor needs a logger, so the
# MLflow logger comes before it; "labbook's module" is the real LightningModule (torchmetrics
# updated every step, logged once per epoch) in place of a bare one with the same net and loss.
PIECES = (
    "bare Lightning (minimal module, no validation, no logger, no callbacks)",
    "+ validation loop",
    "+ labbook's module (loss, MSE, R² in torchmetrics, updated per 16 steps, logged per epoch)",
    "+ checkpointing (best and last)",
    "+ MLflow logger (an epoch's metrics written before its checkpoint, its training metrics queued after)",
    "+ LR monitor",
    "+ pruning callback (reports to a SQLite study)",
    "+ non-finite loss check",
    "= full stack (as R1: deterministic='warn', the notebook's own callback list)",
)


class _BareModule(L.LightningModule):
    """The raw loop's net, loss and optimizer as a LightningModule: what Lightning alone costs."""

    def __init__(
        self, net: torch.nn.Module, loss: Callable[..., torch.Tensor], optimizer: Callable[[], torch.optim.Optimizer]
    ) -> None:
        super().__init__()
        self.net, self.loss_of, self.optimizer = net, loss, optimizer

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.loss_of(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.loss_of(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer()  # the raw loop's: labbook's module's optimizer over the same net


def decomposed_fit(p: dict[str, Any], pieces: int, trial_params: Callable[[], dict[str, Any]]) -> float:
    """Seconds in `trainer.fit` with the first `pieces` rows of PIECES (1: bare Lightning)."""
    if pieces == len(PIECES):
        return full_stack_fit(p)
    from lightning.pytorch.callbacks import LearningRateMonitor

    from lightning_modules.callbacks import EpochCheckpoint

    L.seed_everything(p["seed"], verbose=False)
    p = _driven(p) if pieces >= 5 else {**p, "experiment_name": "bench", "run_id": ""}
    datamodule = build_data(p)
    datamodule.setup()
    module = build_model(p, datamodule)
    if pieces < 3:
        module = _BareModule(module.net, module.loss, module.configure_optimizers)
    logger = in_notebook.mlflow_logger(p) if pieces >= 5 else False
    callbacks: list[Any] = [in_notebook.RunRecord()] if logger else []  # the logger's flush points
    if pieces >= 4:
        monitor, mode = in_notebook.monitored(p, build_model(p, datamodule).monitor)
        callbacks.append(
            EpochCheckpoint(
                dirpath=Path(tempfile.mkdtemp()), filename="best-{epoch}", monitor=monitor, mode=mode, save_last=True
            )
        )
    if pieces >= 6:
        callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    if pieces >= 7:
        callbacks.append(in_notebook.pruning_callback(trial_params()))
    if pieces >= 8:
        from lightning_modules.callbacks import StopOnNonFiniteLoss

        callbacks.append(StopOnNonFiniteLoss())
    trainer = L.Trainer(
        max_epochs=p["max_epochs"],
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=pieces >= 4,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        limit_val_batches=0 if pieces < 2 else None,
        num_sanity_val_steps=0 if pieces < 2 else None,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - start
    if logger:
        tracking.finish_run(tracking.client(), p["run_id"])
    return seconds


R1D_THREADS = 1  # torch threads for the decomposition: at 2 threads on 2 cores any other process shifts a row


def r1_decomposed(repeats: int, store: Path) -> dict[str, Any]:
    """Every row of PIECES and the raw loop, interleaved per repeat, at batch 64 and 512 (same steps).

    Run at `R1D_THREADS` torch threads, so one core is left to the OS and MLflow's threads: the
    rows are differences of a few percent. Besides each row ÷ raw, each row ÷ "bare Lightning +
    validation loop" (row 2: the same work as the raw loop, which validates every epoch too):
    what labbook's pieces add over Lightning doing the raw loop's work.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(R1D_THREADS)
    try:
        return _r1_decomposed(repeats, store)
    finally:
        torch.set_num_threads(threads)


def _r1_decomposed(repeats: int, store: Path) -> dict[str, Any]:
    study_url = f"sqlite:///{store / 'optuna-r1.db'}"
    study = optuna.create_study(study_name="r1", storage=studies.storage(study_url), direction="maximize")
    study.set_user_attr("pruner", {"name": "none"})

    def trial_params() -> dict[str, Any]:
        trial = study.ask()
        return {"optuna_storage": study_url, "study_name": "r1", "trial_number": trial.number, "monitor": "val_r2"}

    found: dict[str, Any] = {"pieces": list(PIECES)}
    # Per epoch, as R1's headline: each variant trains E and 4E epochs and the slope is its cost
    # per epoch (a fit's fixed cost, the logger's setup and the run's params, is the intercept).
    for batch, epochs in ((64, 2), (512, 8)):
        times: dict[str, dict[int, list[float]]] = {
            k: {epochs: [], 4 * epochs: []} for k in ("raw", *(str(i) for i in range(1, len(PIECES) + 1)))
        }
        for r in range(repeats):
            for n in (epochs, 4 * epochs):
                p = params(batch_size=batch, max_epochs=n)
                times["raw"][n].append(raw_fit(p))
                for i in range(1, len(PIECES) + 1):
                    times[str(i)][n].append(decomposed_fit(p, i, trial_params))
            say(
                f"  R1 decomposed, batch {batch}, repeat {r + 1}/{repeats} ({epochs} and {4 * epochs} epochs): "
                + " ".join(f"{k}={v[epochs][-1]:.2f}/{v[4 * epochs][-1]:.2f}s" for k, v in times.items())
            )
        slope = {
            k: [(long - short) / (3 * epochs) for short, long in zip(v[epochs], v[4 * epochs], strict=True)]
            for k, v in times.items()
        }
        found[f"batch_{batch}"] = {
            "epochs": [epochs, 4 * epochs],
            "seconds_per_epoch": {k: stats(v) for k, v in slope.items()},
            "fixed_seconds_per_fit": {
                k: stats([short - epochs * s for short, s in zip(times[k][epochs], slope[k], strict=True)])
                for k in slope
            },
            "ratio_to_raw": {
                k: stats([t / raw for t, raw in zip(v, slope["raw"], strict=True)])
                for k, v in slope.items()
                if k != "raw"
            },
            "ratio_to_lightning_with_validation": {
                k: stats([t / base for t, base in zip(v, slope["2"], strict=True)])
                for k, v in slope.items()
                if k != "raw"
            },
            "ms_per_epoch_over_lightning_with_validation": {
                k: stats([1000 * (t - base) for t, base in zip(v, slope["2"], strict=True)])
                for k, v in slope.items()
                if k != "raw"
            },
        }
    found["threads"] = R1D_THREADS
    found["repeats"] = repeats
    return found


def decomposition_table(found: dict[str, Any]) -> str:
    """R1's pieces as a Markdown table: per-epoch ratios to the raw loop and to bare Lightning with
    its validation loop (median of the repeats), and the milliseconds per epoch over the latter."""
    lines = [
        "| piece (cumulative) | batch 64 ÷ raw | step | ÷ Lightning + validation | ms/epoch over it "
        "| batch 512 ÷ raw | step | ÷ Lightning + validation | ms/epoch over it |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    previous = {64: 1.0, 512: 1.0}
    for i, piece in enumerate(found["pieces"], start=1):
        cells = []
        for batch in (64, 512):
            entry = found[f"batch_{batch}"]
            median = entry["ratio_to_raw"][str(i)]["median"]
            cells += [f"{median:.2f}", f"{median - previous[batch]:+.2f}"]
            base = entry.get("ratio_to_lightning_with_validation", {}).get(str(i))
            cells.append(f"{base['median']:.3f}" if base and i >= 2 else "")
            ms = entry.get("ms_per_epoch_over_lightning_with_validation", {}).get(str(i))
            cells.append(f"{ms['median']:+.1f}" if ms and i >= 2 else "")
            previous[batch] = median
        lines.append(f"| {piece} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --- R2 and R4: the same trial as a notebook and in this process -------------------------------


class CallTimer:
    """Wall time spent inside MLflow and Optuna (outermost calls only), by wrapping their entry points.

    Calls made by the thread that created the timer (the trial's own path: the notebook's cells)
    add to `seconds` and `calls`; calls made by other threads (the driver's background close:
    HTML, uploads, status) to `background_seconds`, which is off the trial's critical path.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self.background_seconds = 0.0
        self._critical = threading.get_ident()
        self._local = threading.local()
        self._undo: list[Callable[[], None]] = []

    def wrap(self, owner: Any, name: str) -> None:
        original = getattr(owner, name)
        timer = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(timer._local, "depth", 0)
            timer._local.depth = depth + 1
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                timer._local.depth = depth
                if depth == 0 and threading.get_ident() != timer._critical:
                    timer.background_seconds += time.perf_counter() - start
                elif depth == 0:
                    timer.seconds += time.perf_counter() - start
                    timer.calls += 1

        setattr(owner, name, timed)
        self._undo.append(lambda: setattr(owner, name, original))

    def wrap_public(self, cls: type) -> None:
        for name, value in list(vars(cls).items()):
            if callable(value) and not name.startswith("_"):
                self.wrap(cls, name)

    @contextmanager
    def installed(self):  # noqa: ANN201
        import mlflow.pytorch
        from mlflow import MlflowClient
        from mlflow.utils.async_logging.run_operations import RunOperations
        from optuna.storages import RDBStorage
        from optuna.storages._cached_storage import _CachedStorage

        # RunOperations.wait: the time the trial waits for MLflow's asynchronous writer (before a
        # checkpoint) is time in MLflow on its path too.
        for cls in (MlflowClient, RDBStorage, _CachedStorage, optuna.Study, optuna.Trial, RunOperations):
            self.wrap_public(cls)
        self.wrap(mlflow.pytorch, "log_model")
        self.wrap(mlflow.pytorch, "save_model")
        self.wrap(optuna, "load_study")
        try:
            yield self
        finally:
            for undo in reversed(self._undo):
                undo()
            self._undo.clear()


def _trial_parameters(study_url: str, study: optuna.Study, trial: optuna.Trial) -> dict[str, Any]:
    return {
        **params(max_epochs=R2_EPOCHS),
        "optuna_storage": study_url,
        "study_name": study.study_name,
        "trial_number": trial.number,
        "monitor": "val_r2",
        "monitor_mode": "max",
    }


def in_process_trial(p: dict[str, Any], closer: Any = None) -> float:
    """The train notebook's cells, parameters injected, executed in this process: one MLflow run.

    Closed as a study's driver closes a trial's run (`closing.close`: staged uploads, status),
    in `closer`'s background thread when one is given (the time returned excludes it, as a
    study's next trial does not wait for it), else in this thread.
    """
    from pipelines.execution import closing
    from pipelines.execution.notebook import ExecutedNotebook
    from pipelines.tracking import staged

    uri = tracking.tracking_uri()
    mlflow = tracking.client(uri)
    start = time.perf_counter()
    run_id = tracking.start_run(mlflow, "bench", run_name="in-process")
    output_dir = tracking.output_dir(uri, run_id)
    staging = staged.folder(output_dir)
    injected = {
        **p,
        "tracking_uri": uri,
        "experiment_name": "bench",
        "run_id": run_id,
        "parent_run_id": "",
        "output_dir": str(output_dir),
        "artifacts_dir": str(staging),
        "defer_model": closer is not None,  # as `run_notebook` does: a closer logs the model
    }
    nb = parameterize_notebook(load_notebook_node(str(TRAIN)), injected)
    namespace: dict[str, Any] = {"__name__": "__main__"}
    for cell in nb.cells:
        if cell.cell_type == "code":
            exec(compile(cell.source, str(TRAIN), "exec"), namespace)  # noqa: S102 - our own notebook
    import matplotlib.pyplot as plt

    plt.close("all")
    executed = ExecutedNotebook(ipynb=output_dir / "in-process.ipynb", html=None, error=None)  # no file: none attached
    if closer is not None:
        closer.submit(lambda: closing.close(tracking.client(uri), run_id, executed, staging), run_id)
    else:
        closing.close(mlflow, run_id, executed, staging)
    return time.perf_counter() - start


def notebook_trial(p: dict[str, Any], kernels: Any) -> float:
    """Seconds of a study's trial path: the notebook run until its kernel is released and its
    outcome known; its run is closed (HTML, uploads) in a closer's thread, as `labbook tune` does,
    and waited for after the clock stops."""
    from pipelines.execution.closing import RunCloser
    from pipelines.execution.run import run_notebook

    with RunCloser() as closer:
        start = time.perf_counter()
        result = run_notebook(
            TRAIN, p, "bench", run_name="notebook", progress_bar=False, kernels=kernels, closer=closer
        )
        seconds = time.perf_counter() - start
    assert result.error is None, result.error
    return seconds


def r2_r4(repeats: int, store: Path) -> dict[str, Any]:
    """R2 and R4 at equal compute: the in-process trial runs at the torch threads a warm pool's
    kernel gets (`trial_threads()`: a core is left to warming the next kernel), so R2 is the
    notebook's own tax, not a thread count."""
    from pipelines.kernels.kernel_pool import trial_threads

    threads = torch.get_num_threads()
    torch.set_num_threads(trial_threads())
    try:
        return _r2_r4(repeats, store) | {"in_process_threads": trial_threads()}
    finally:
        torch.set_num_threads(threads)


def _r2_r4(repeats: int, store: Path) -> dict[str, Any]:
    study_url = f"sqlite:///{store / 'optuna.db'}"
    study = optuna.create_study(study_name="r2", storage=studies.storage(study_url), direction="maximize")
    times: dict[str, list[float]] = {"in_process": [], "notebook_warm": [], "notebook_cold": []}
    shares: list[float] = []
    calls: list[int] = []

    def trial_params() -> dict[str, Any]:
        trial = study.ask()
        return _trial_parameters(study_url, study, trial)

    from pipelines.execution.closing import RunCloser

    in_process_trial(trial_params())  # the in-process variant's imports and first-call caches
    background: list[float] = []
    with notebook.warm_kernels(1, tracking_uri=tracking.tracking_uri()) as kernels:
        notebook_trial(trial_params(), kernels)  # the pool's first kernel: a worker's one cold start
        for r in range(repeats):
            timer = CallTimer()
            with timer.installed(), RunCloser() as closer:  # leaving waits for the close, still timed
                seconds = in_process_trial(trial_params(), closer)
            times["in_process"].append(seconds)
            shares.append(timer.seconds / seconds)
            calls.append(timer.calls)
            background.append(timer.background_seconds)
            times["notebook_warm"].append(notebook_trial(trial_params(), kernels))
            times["notebook_cold"].append(notebook_trial(trial_params(), None))
            say(
                f"  R2 repeat {r + 1}/{repeats}: "
                + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items())
                + f"; R4 {shares[-1]:.1%} in {calls[-1]} MLflow/Optuna calls"
            )
    return {
        "R2_warm_minus_in_process_seconds": stats(
            [w - i for w, i in zip(times["notebook_warm"], times["in_process"], strict=True)]
        ),
        "R2_cold_minus_in_process_seconds": stats(
            [c - i for c, i in zip(times["notebook_cold"], times["in_process"], strict=True)]
        ),
        "R4_mlflow_optuna_share": stats(shares),
        "R4_calls_per_trial": calls,
        "R4_background_close_seconds": stats(background),
        "seconds": {k: stats(v) for k, v in times.items()},
    }


# --- R3 and R7: whole studies through the CLI ----------------------------------------------------


def study_run(workers: int, folder: Path, n_trials: int) -> dict[str, float]:
    folder = folder.resolve()
    folder.mkdir(parents=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}"}
    (folder / "mlruns").mkdir()
    command = [str(LABBOOK), "tune", str(SPEC), "--n-trials", str(n_trials), "--workers", str(workers)]
    command += ["--no-register", "--no-report", "--storage", f"sqlite:///{folder / 'mlruns' / 'optuna.db'}"]
    command += ["--set", f"max_epochs={STUDY_EPOCHS}"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    trials = optuna.load_study(study_name="bench_trial", storage=f"sqlite:///{folder / 'mlruns' / 'optuna.db'}").trials
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == n_trials, [t.state.name for t in trials]
    first = min(t.datetime_start for t in trials)
    last = max(t.datetime_complete for t in trials)
    return {"command_seconds": wall, "study_seconds": (last - first).total_seconds()}


def r3_r7(repeats: int, store: Path, n_trials: int) -> dict[str, Any]:
    raw = []
    one: list[dict[str, float]] = []
    two: list[dict[str, float]] = []
    for r in range(repeats):
        raw.append(raw_fit(params(max_epochs=STUDY_EPOCHS)))
        one.append(study_run(1, store / f"w1-{r}", n_trials))
        two.append(study_run(2, store / f"w2-{r}", n_trials))
        say(
            f"  R3/R7 repeat {r + 1}/{repeats}: raw trial {raw[-1]:.2f}s; 1 worker {one[-1]['study_seconds']:.1f}s, "
            f"2 workers {two[-1]['study_seconds']:.1f}s for {n_trials} trials"
        )
    raw_sum = n_trials * statistics.median(raw)
    r3 = [o["study_seconds"] / raw_sum for o in one]
    overhead = [(o["study_seconds"] - raw_sum) / n_trials for o in one]
    r7 = [(n_trials / t["study_seconds"]) / (n_trials / o["study_seconds"]) for o, t in zip(one, two, strict=True)]
    return {
        "R3_study_over_raw": stats(r3),
        "R3_overhead_seconds_per_trial": stats(overhead),
        "R3_at_30s_trials_from_measured_overhead": stats([(30 + o) / 30 for o in overhead]),
        "R7_two_over_one_worker": stats(r7),
        "trials_per_hour_1_worker": stats([3600 * n_trials / o["study_seconds"] for o in one]),
        "trials_per_hour_2_workers": stats([3600 * n_trials / t["study_seconds"] for t in two]),
        "raw_trial_seconds": stats(raw),
        "command_seconds_1_worker": stats([o["command_seconds"] for o in one]),
        "command_seconds_2_workers": stats([t["command_seconds"] for t in two]),
        "n_trials": n_trials,
    }


# --- R5: pruning --------------------------------------------------------------------------------


def pruning_study(seed: int, pruner: dict[str, Any] | None, n_trials: int, max_epochs: int) -> dict[str, float]:
    """A TPE study of `n_trials` trials of up to `max_epochs` epochs: epochs trained and best val_r2.

    As labbook's studies run: `pruner` is a spec's `tune.pruner` section (None for none), built by
    labbook's `study.pruner`; the pruning callback reports epochs trained as the step
    (`study.pruning_trial` on a study marked by `study.mark_steps`); a trial's value is its best
    epoch's val_r2 (`tune.best_logged`: the best checkpoint is the model kept), not its last.
    """
    from optuna_integration import PyTorchLightningPruningCallback

    from pipelines.specs.tune_spec import PrunerSpec

    pruned = pruner is not None
    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=5),
        pruner=studies.pruner(PrunerSpec(**pruner)) if pruner else optuna.pruners.NopPruner(),
    )
    studies.mark_steps(study)
    epochs = 0

    class BestEpoch(L.Callback):
        def __init__(self) -> None:
            self.values: list[float] = []

        def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if not trainer.sanity_checking:
                self.values.append(float(trainer.callback_metrics["val_r2"]))

    def objective(trial: optuna.Trial) -> float:
        nonlocal epochs
        p = params(
            max_epochs=max_epochs,
            lr=trial.suggest_float("lr", 1e-5, 1e-1, log=True),
            weight_decay=trial.suggest_float("weight_decay", 1e-6, 1e-1, log=True),
            hidden_sizes=[64],
            n_samples=4000,
            seed=seed,
        )
        L.seed_everything(seed, verbose=False)
        datamodule = build_data(p)
        datamodule.setup()
        net = build_model(p, datamodule)
        best = BestEpoch()
        callbacks: list[Any] = [best]
        if pruned:
            callbacks.append(PyTorchLightningPruningCallback(studies.pruning_trial(study, trial), monitor="val_r2"))
        trainer = L.Trainer(
            max_epochs=max_epochs,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=callbacks,
        )
        try:
            trainer.fit(net, datamodule=datamodule)
        except optuna.TrialPruned:
            # Pruned in epoch k's validation (k 0-based): k + 1 epochs were trained (the step
            # reported), and trainer.current_epoch still says k (k never finished).
            epochs += trainer.current_epoch + 1
            raise
        epochs += trainer.current_epoch
        finite = [v for v in best.values if math.isfinite(v)]
        return max(finite) if finite else float("nan")

    study.optimize(objective, n_trials=n_trials)
    return {"epochs": epochs, "best": study.best_value}


# Successive halving keeping the top quarter at each rung: cuts after 1 and 4 epochs trained.
# Measured 2026-12-06 (README, Performance, R5: successive halving at reduction factors 3-16,
# Hyperband at 3-4, median; 30 and 60 trials; seeds 0-5; steps as Lightning's 0-based epoch and as
# epochs trained; a trial's value its last and its best epoch's): at 60 trials this setting is
# the one that gives ≥ 4× on seeds 0-2 (4.24, 4.44, 3.89) with every seed's best within 0.0002
# (seeds 3-5: 3.75, 3.73, 4.62, within 0.0005); factor 6 gives more (4.71 median) but seed 1 ends
# 0.00099 below, on the line. At 30 trials no setting reaches 4× (factor 4: 3.2-3.6×; factor 6:
# 3.5-4.9×, median 3.87): the first trials, which no pruner can cut, weigh more.
R5_PRUNER: dict[str, Any] = {"name": "successive_halving", "min_resource": 1, "reduction_factor": 4}
R5_TRIALS = 60  # per study
R5_SEEDS = (0, 1, 2)
R5_EQUAL = 0.001  # best val_r2 with pruning at most this far below without, on every seed: "equal"


def r5(seeds: tuple[int, ...], n_trials: int, max_epochs: int, pruner: dict[str, Any] | None = None) -> dict[str, Any]:
    """Epochs trained without ÷ with `pruner` (default R5_PRUNER), a TPE study per seed each way."""
    pruner = pruner or R5_PRUNER
    runs = []
    for seed in seeds:
        full = pruning_study(seed, None, n_trials, max_epochs)
        cut = pruning_study(seed, pruner, n_trials, max_epochs)
        runs.append({"seed": seed, "no_pruning": full, "pruning": cut})
        say(
            f"  R5 seed {seed}: {full['epochs']} vs {cut['epochs']} epochs; "
            f"best val_r2 {full['best']:.4f} vs {cut['best']:.4f}"
        )
    return {
        "R5_epochs_ratio": stats([r["no_pruning"]["epochs"] / r["pruning"]["epochs"] for r in runs]),
        "best_no_pruning": [r["no_pruning"]["best"] for r in runs],
        "best_pruning": [r["pruning"]["best"] for r in runs],
        "pruner": pruner,
        "n_trials": n_trials,
        "max_epochs": max_epochs,
        "runs": runs,
    }


# --- R6: FLOP/s vs the matmul ceiling ------------------------------------------------------------


def matmul_ceiling(n: int = 1024, repeats: int = 20) -> float:
    a, b = torch.randn(512, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 512 * n * n / best


def r6(repeats: int) -> dict[str, Any]:
    p = params(batch_size=512, hidden_sizes=[1024, 1024], n_features=1024, n_samples=16384, max_epochs=2)
    weights = 1024 * 1024 + 1024 * 1024 + 1024  # the three linear layers' weights (biases are noise)
    n_train = round(16384 * 0.70)
    n_val = round(16384 * 0.15)
    flops = p["max_epochs"] * (6 * weights * n_train + 2 * weights * n_val)
    ratios, achieved, ceilings = [], [], []
    for r in range(repeats):
        ceiling = matmul_ceiling()
        seconds = full_stack_fit(p)
        ceilings.append(ceiling)
        achieved.append(flops / seconds)
        ratios.append(flops / seconds / ceiling)
        say(
            f"  R6 repeat {r + 1}/{repeats}: {flops / seconds / 1e9:.1f} GFLOP/s "
            f"of {ceiling / 1e9:.1f} ({ratios[-1]:.0%})"
        )
    return {
        "R6_flops_share": stats(ratios),
        "achieved_gflops": stats([a / 1e9 for a in achieved]),
        "ceiling_gflops": stats([c / 1e9 for c in ceilings]),
    }


# --- the CLI's own start ------------------------------------------------------------------------


def help_seconds(repeats: int) -> dict[str, Any]:
    times = []
    for _ in range(max(repeats, 5)):
        start = time.perf_counter()
        subprocess.run([str(LABBOOK), "--help"], capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return stats(times)


# --- the table ------------------------------------------------------------------------------------


def table(results: dict[str, Any]) -> str:
    def cell(entry: dict[str, Any], fmt: str) -> str:
        return f"{entry['min']:{fmt}} / {entry['median']:{fmt}}"

    def verdict(value: float, ok: bool) -> str:
        return "met" if ok else "**missed**"

    rows = []
    b64, b512 = results["R1"]["batch_64"], results["R1"]["batch_512"]
    for batch, entry, target in (("64", b64, 1.15), ("512", b512, 1.05)):
        median = entry["ratio_per_epoch"]["median"]
        rows.append(
            (
                f"R1 full stack ÷ raw loop, per epoch, batch {batch}",
                cell(entry["ratio_per_epoch"], ".2f"),
                f"≤ {target}",
                verdict(median, median <= target),
            )
        )
        if "ratio_per_epoch_over_default_adamw_loop" in entry:
            rows.append(
                (
                    f"R1 … full stack ÷ a raw loop with torch's default AdamW (one group, per-tensor), batch {batch}",
                    cell(entry["ratio_per_epoch_over_default_adamw_loop"], ".2f"),
                    "",
                    "",
                )
            )
        rows.append(
            (
                f"R1 … total at 4E epochs, batch {batch} "
                f"(extra fixed cost per fit {entry['extra_fixed_seconds_per_fit']['median']:.2f} s)",
                cell(entry["ratio_total_4E"], ".2f"),
                "",
                "",
            )
        )
    if "R1_decomposed" in results:
        found = results["R1_decomposed"]
        for batch in (64, 512):
            entry = found[f"batch_{batch}"].get("ratio_to_lightning_with_validation")
            if entry:
                full = entry[str(len(found["pieces"]))]
                rows.append(
                    (
                        f"R1 full stack ÷ bare Lightning + validation loop, batch {batch} "
                        f"(decomposed, {found.get('threads', '?')} thread)",
                        cell(full, ".3f"),
                        "≤ 1.05",
                        verdict(full["median"], full["median"] <= 1.05),
                    )
                )
    r2 = results["R2_R4"]
    warm = r2["R2_warm_minus_in_process_seconds"]["median"]
    rows.append(
        (
            f"R2 notebook (warm pool) − in-process (both {r2.get('in_process_threads', '?')} torch thread), s",
            cell(r2["R2_warm_minus_in_process_seconds"], ".2f"),
            "≤ 1.0",
            verdict(warm, warm <= 1.0),
        )
    )
    rows.append(
        ("R2 notebook (cold kernel) − in-process, s", cell(r2["R2_cold_minus_in_process_seconds"], ".2f"), "", "pool 0")
    )
    r3 = results["R3_R7"]
    rows.append(
        (
            f"R3 {r3['n_trials']}-trial study ÷ raw training ({r3['raw_trial_seconds']['median']:.1f} s trials)",
            cell(r3["R3_study_over_raw"], ".2f"),
            "",
            "",
        )
    )
    at30 = r3["R3_at_30s_trials_from_measured_overhead"]["median"]
    rows.append(
        (
            f"R3 at 30 s trials (measured overhead {r3['R3_overhead_seconds_per_trial']['median']:.1f} s/trial)",
            cell(r3["R3_at_30s_trials_from_measured_overhead"], ".3f"),
            "≤ 1.10",
            verdict(at30, at30 <= 1.10),
        )
    )
    share = r2["R4_mlflow_optuna_share"]["median"]
    background = r2.get("R4_background_close_seconds")
    rows.append(
        (
            f"R4 time in MLflow + Optuna ÷ trial ({R2_EPOCHS} epochs; on the trial's path"
            + (f"; closing its run off the path: {background['median']:.2f} s" if background else "")
            + ")",
            f"{r2['R4_mlflow_optuna_share']['min']:.1%} / {share:.1%}",
            "≤ 5%",
            verdict(share, share <= 0.05),
        )
    )
    r5_ = results["R5"]
    ratio5 = r5_["R5_epochs_ratio"]["median"]
    equal = all(b >= a - R5_EQUAL for a, b in zip(r5_["best_no_pruning"], r5_["best_pruning"], strict=True))
    bests = ", ".join(f"{a:.3f}/{b:.3f}" for a, b in zip(r5_["best_no_pruning"], r5_["best_pruning"], strict=True))
    rows.append(
        (
            f"R5 epochs without ÷ with pruning (best val_r2 without/with: {bests})",
            cell(r5_["R5_epochs_ratio"], ".1f"),
            f"≥ 4, best within {R5_EQUAL}",
            verdict(ratio5, ratio5 >= 4 and equal),
        )
    )
    r6_ = results["R6"]
    ratio6 = r6_["R6_flops_share"]["median"]
    rows.append(
        (
            f"R6 training FLOP/s ÷ matmul ceiling ({r6_['ceiling_gflops']['median']:.0f} GFLOP/s), batch 512",
            f"{r6_['R6_flops_share']['min']:.0%} / {ratio6:.0%}",
            "≥ 60%",
            verdict(ratio6, ratio6 >= 0.6),
        )
    )
    ratio7 = r3["R7_two_over_one_worker"]["median"]
    rows.append(
        (
            f"R7 trials/hour, 2 workers ÷ 1 ({r3['trials_per_hour_2_workers']['median']:.0f} vs "
            f"{r3['trials_per_hour_1_worker']['median']:.0f})",
            cell(r3["R7_two_over_one_worker"], ".2f"),
            "≥ 1.8",
            verdict(ratio7, ratio7 >= 1.8),
        )
    )
    helped = results["help_seconds"]["median"]
    rows.append(("`labbook --help`, s", cell(results["help_seconds"], ".2f"), "< 0.5", verdict(helped, helped < 0.5)))
    lines = [
        f"Machine: {results['machine']}; {results['repeats']} repeats, interleaved; min / median.",
        "",
        "| ratio | min / median | target | |",
        "|---|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    if "R1_decomposed" in results:
        found = results["R1_decomposed"]
        lines += [
            "",
            f"R1 decomposed ({found.get('threads', '?')} torch thread): seconds per epoch of `trainer.fit` (the "
            f"slope between {' and '.join(map(str, found['batch_64']['epochs']))} epochs at batch 64, "
            f"{' and '.join(map(str, found['batch_512']['epochs']))} at 512) ÷ the raw loop's, median of "
            f"{found.get('repeats', results['repeats'])}; each row adds one piece to the row above; step = what "
            "that piece added; ms/epoch = the row's seconds per epoch minus bare Lightning + validation's.",
            "",
            decomposition_table(found).rstrip(),
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2, help="E for R1 (the long run is 4E)")
    parser.add_argument("--study-trials", type=int, default=10)
    parser.add_argument("--only", nargs="*", default=None, help="R1 R1D R2 R3 R5 R6 (default: all)")
    parser.add_argument("--pruner", default=None, help="R5's pruner as JSON, a spec's tune.pruner (default: R5_PRUNER)")
    parser.add_argument("--r5-trials", type=int, default=R5_TRIALS, help="R5: trials per study")
    parser.add_argument("--r5-seeds", type=int, nargs="+", default=list(R5_SEEDS), help="R5: one study pair per seed")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch threads (1 on a machine others load)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {
        "machine": machine(),
        "repeats": args.repeats,
    }
    wanted = set(args.only or ["R1", "R1D", "R2", "R3", "R5", "R6"])
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp)
        (store / "mlruns").mkdir()
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlruns' / 'mlflow.db'}"
        os.chdir(store)
        results["help_seconds"] = help_seconds(args.repeats)
        say(f"labbook --help: {results['help_seconds']['median']:.2f}s")
        steps = {
            "R1": lambda: results.__setitem__("R1", r1(args.repeats, args.epochs)),
            "R1D": lambda: results.__setitem__("R1_decomposed", r1_decomposed(max(5, args.repeats), store)),
            "R2": lambda: results.__setitem__("R2_R4", r2_r4(args.repeats, store)),
            "R6": lambda: results.__setitem__("R6", r6(args.repeats)),
            "R5": lambda: results.__setitem__(
                "R5", r5(tuple(args.r5_seeds), args.r5_trials, 12, json.loads(args.pruner) if args.pruner else None)
            ),
            "R3": lambda: results.__setitem__("R3_R7", r3_r7(args.repeats, store, args.study_trials)),
        }
        for name, step in steps.items():
            if name in wanted:
                say(f"{name} ...")
                started = time.perf_counter()
                step()
                say(f"{name} took {time.perf_counter() - started:.0f}s")
    out = BENCH / "results.json"
    if out.exists():  # a partial run (--only) keeps the other ratios
        results = {**json.loads(out.read_text()), **results}
    out.write_text(json.dumps(results, indent=2) + "\n")
    if all(k in results for k in ("R1", "R2_R4", "R3_R7", "R5", "R6")):
        (BENCH / "results.md").write_text(table(results))
        say(table(results))
    say(f"wrote {out}")


if __name__ == "__main__":
    main()
