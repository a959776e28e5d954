"""`labbook tune` and `labbook worker`: an Optuna study whose every trial is an executed notebook.

The driver owns the study's MLflow parent run; every trial is `run_training` with the trial's
parameters, nested under it, while the kernel reports each epoch to the same trial through
the shared storage (see `in_notebook.pruning_callback`). Extra workers are plain processes
running `labbook worker` on the same storage: Optuna and MLflow do the coordination.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import pandas as pd
from mlflow import MlflowClient
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from rich.console import Console
from rich.table import Table

from pipelines.errors import reason
from pipelines.execution import notebook, resume
from pipelines.execution.closing import RunCloser
from pipelines.execution.run import run_training
from pipelines.kernels.env import ENV_PID
from pipelines.specs.spec import Spec, SpecError
from pipelines.specs.tune_spec import Categorical, FloatRange, IntRange, TuneSpec
from pipelines.study import study as studies
from pipelines.study.guarded_sampler import SamplerFailed
from pipelines.tracking import tracking
from pipelines.tracking.tags import Attr, Tag

if TYPE_CHECKING:
    from pipelines.kernels.kernel_pool import KernelPool

optuna.logging.set_verbosity(optuna.logging.WARNING)


class TrialFailed(Exception):
    """The trial's notebook failed; Optuna records the trial as FAIL and the study goes on."""


@dataclass
class StudyResult:
    study_name: str
    storage: str
    parent_run_id: str
    counts: dict[str, int]
    best_value: float | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    best_run_id: str | None = None
    summary: pd.DataFrame | None = None
    champion: dict[str, Any] | None = None
    register_error: str | None = None  # why the best trial was not registered (its run's record is incomplete)


@dataclass(frozen=True)
class Study:
    """Everything a worker needs to run trials of one study."""

    spec: Spec
    spec_path: Path | None
    name: str
    storage_url: str
    n_trials: int | None
    timeout: float | None
    parent_run_id: str | None = None  # a pipeline run: the study's run is nested under it

    @property
    def tune(self) -> TuneSpec:
        assert self.spec.tune is not None
        return self.spec.tune

    def load(self, heartbeat: bool = True) -> optuna.Study:
        """The study as one process sees it (its sampler seeded per trial: processes sample apart)."""
        return optuna.load_study(
            study_name=self.name,
            storage=studies.storage(self.storage_url, heartbeat=heartbeat),
            sampler=studies.sampler(self.tune.sampler),
            pruner=studies.pruner(self.tune.pruner),
        )


def open_study(
    spec: Spec,
    spec_path: Path | None = None,
    n_trials: int | None = None,
    timeout: float | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    parent_run_id: str | None = None,
) -> Study:
    """Resolve the study's budget, storage and name from flags, then the spec, then defaults."""
    if spec.tune is None:
        raise SpecError(f"{spec_path or spec.name}: tune: the spec has no tune: section to search with")
    tune = spec.tune
    if n_trials is None and timeout is None:
        n_trials, timeout = tune.n_trials, tune.timeout
    url = studies.storage_url(storage or tune.storage)
    name = study_name or tune.study_name or spec.name
    return Study(spec, spec_path, name, url, n_trials, timeout, parent_run_id)


def _suggest(trial: optuna.Trial, name: str, dist: FloatRange | IntRange | Categorical) -> Any:
    if isinstance(dist, FloatRange):
        return trial.suggest_float(name, dist.low, dist.high, log=dist.log, step=dist.step)
    if isinstance(dist, IntRange):
        return trial.suggest_int(name, dist.low, dist.high, log=dist.log, step=dist.step)
    return dist.decode(trial.suggest_categorical(name, dist.encoded()))


def decoded_params(tune: TuneSpec, params: dict[str, Any]) -> dict[str, Any]:
    """A trial's params as settings (a categorical list choice back from its JSON text)."""
    return {
        name: tune.space[name].decode(value) if isinstance(tune.space[name], Categorical) else value
        for name, value in params.items()
        if name in tune.space
    }


def best_logged(mlflow: MlflowClient, run_id: str, tune: TuneSpec) -> float | None:
    """The run's best epoch value of the study's metric (NaN epochs ignored); None if never logged."""
    values = [m.value for m in mlflow.get_metric_history(run_id, tune.metric) if not math.isnan(m.value)]
    if not values:
        return None
    return max(values) if tune.direction == "maximize" else min(values)


def monitor_parameters(tune: TuneSpec) -> dict[str, str]:
    """Notebook parameters that make the kernel checkpoint (and report) on the study's metric."""
    return {"monitor": tune.metric, "monitor_mode": "max" if tune.direction == "maximize" else "min"}


def _ensure_parent_run(handle: Study, created: optuna.Study) -> str:
    """The study's MLflow parent run: made once, found again through the study on resume."""
    mlflow = tracking.client()
    parent_id = created.user_attrs.get(Attr.PARENT_RUN)
    if parent_id:
        try:
            tracking.reopen_run(mlflow, parent_id)  # this process drives it now
            return parent_id
        except Exception:  # the run was deleted from MLflow: start a new parent
            pass
    tune = handle.tune
    parent_id = tracking.start_run(
        mlflow,
        handle.spec.experiment_name,
        run_name=f"study:{handle.name}",
        parent_run_id=handle.parent_run_id,
        tags={
            Tag.KIND: "study",
            Tag.STUDY_NAME: handle.name,
            Tag.STORAGE: tracking.redact(handle.storage_url),
            Tag.SPEC: handle.spec.name,
            **tracking.provenance_tags(handle.spec.trainer.seed, handle.spec.notebook),
        },
    )
    params: dict[str, Any] = {f"space.{k}": v for k, v in tune.describe_space().items()}
    params |= {
        "metric": tune.metric,
        "direction": tune.direction,
        "sampler": tune.sampler.name,
        "sampler_seed": tune.sampler.seed,
        "pruner": tune.pruner.name,
        **{f"pruner.{k}": v for k, v in tune.pruner.model_dump().items() if k != "name"},
        "n_trials": handle.n_trials,
        "timeout": handle.timeout,
    }
    tracking.log_params(mlflow, parent_id, params)
    created.set_user_attr(Attr.PARENT_RUN, parent_id)
    return parent_id


def create(handle: Study) -> tuple[optuna.Study, str]:
    """Create or resume the study, record its pruner and metric on it, and open the parent run."""
    tracking.check_server()  # a refusing server must not leave a study behind
    tune = handle.tune
    created = optuna.create_study(
        study_name=handle.name,
        storage=studies.storage(handle.storage_url, heartbeat=True),
        sampler=studies.sampler(tune.sampler),
        pruner=studies.pruner(tune.pruner),
        direction=tune.direction,
        load_if_exists=True,
    )
    if created.direction.name.lower() != tune.direction:
        raise SpecError(
            f"tune.direction: study {handle.name!r} already exists with direction "
            f"{created.direction.name.lower()}; use another --study-name"
        )
    # Kernels (on any machine) rebuild the pruner and read the metric from the study itself.
    created.set_user_attr(Attr.PRUNER, tune.pruner.model_dump())
    studies.mark_steps(created)  # a new study's steps count epochs trained
    created.set_user_attr(Attr.METRIC, tune.metric)
    created.set_user_attr(Attr.SETTINGS, fixed_settings(handle))  # what a joining worker must train with
    studies.fail_stale_trials(created)
    studies.reconcile_runs(created)  # a trial FAIL in Optuna has its MLflow run FAILED, whatever happened
    return created, _ensure_parent_run(handle, created)


class _Worker:
    """Runs trials of one study until its budget is spent; prints a progress line per trial."""

    def __init__(self, handle: Study, parent_run_id: str, console: Console | None) -> None:
        self.handle = handle
        self.parent_run_id = parent_run_id
        self.console = console
        self.mlflow = tracking.client()
        self.kernels: KernelPool | None = None  # set while `run` runs
        self.closer: RunCloser | None = None  # likewise

    def budget_left(self, study: optuna.Study, trials: list[optuna.trial.FrozenTrial] | None = None) -> int | None:
        if self.handle.n_trials is None:
            return None
        if trials is None:
            trials = study.get_trials(deepcopy=False)
        return self.handle.n_trials - studies.budget_used(trials)

    def objective(self, trial: optuna.Trial) -> float:
        tune = self.handle.tune
        trials = trial.study.get_trials(deepcopy=False)
        if self.handle.n_trials is not None and studies.over_budget(trials, trial.number, self.handle.n_trials):
            trial.set_user_attr(Attr.OVER_BUDGET, True)  # after_trial then stops this worker
            raise TrialFailed(f"not run: trials before it use the study's budget of {self.handle.n_trials}")
        try:
            values = {name: _suggest(trial, name, dist) for name, dist in tune.space.items()}
        except Exception as exc:  # the sampler's fault (GuardedSampler says so) or Optuna's: this trial only
            reason = str(exc) if isinstance(exc, SamplerFailed) else f"sampler failed: {type(exc).__name__}: {exc}"
            trial.set_user_attr(Attr.ERROR, reason[:500])
            raise TrialFailed(reason[:500]) from None
        spec = self.handle.spec.with_overrides(values)
        frozen = next(t for t in trials if t.number == trial.number)
        if self.console:
            total = self.handle.n_trials or "?"
            shown = ", ".join(f"{k}={_fmt(v)}" for k, v in values.items())
            retry_of = RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
            retry = "" if retry_of is None else f" (retry of trial {retry_of}, whose worker died)"
            self.console.print(f"[dim]trial {trial.number} of {total} started{retry}: {shown}[/dim]")
        trial.set_user_attr(Attr.WORKER, _this_process())
        left = self.budget_left(trial.study, trials)
        if self.kernels is not None and left is not None:
            self.kernels.expected = 1 + max(0, left)  # this trial and the budget's rest: warm no more
        try:
            result = self._run(trial, spec, resume.trial_key(self.handle.name, frozen))
        except KeyboardInterrupt:
            trial.set_user_attr(Attr.ERROR, "interrupted")
            trial.set_user_attr(Attr.INTERRUPTED, True)
            run_id = trial.user_attrs.get(Attr.RUN_ID)
            if run_id:  # Optuna records the trial FAIL: its run says so too
                studies.fail_run(run_id, trial.number, "interrupted")
            raise
        trial.set_user_attr(Attr.RUN_ID, result.run_id)
        if result.pruned:
            self.mlflow.set_tag(result.run_id, Tag.TRIAL_STATE, "PRUNED")
            raise optuna.TrialPruned(result.error)
        if result.error:
            return self._fail(trial, result.run_id, result.error)
        value = best_logged(self.mlflow, result.run_id, tune)
        if value is None:
            return self._fail(trial, result.run_id, f"metric {tune.metric!r} was never logged (or only NaN)")
        self.mlflow.set_tag(result.run_id, Tag.TRIAL_STATE, "COMPLETE")
        return value

    def _run(self, trial: optuna.Trial, spec: Spec, resume_key: str):
        tune = self.handle.tune
        return run_training(
            spec,
            self.handle.spec_path,
            parent_run_id=self.parent_run_id,
            run_name=f"{self.handle.name}-trial-{trial.number}",
            extra_parameters={
                "optuna_storage": self.handle.storage_url,
                "study_name": self.handle.name,
                "trial_number": trial.number,
                **monitor_parameters(tune),
            },
            extra_tags={
                Tag.STUDY_NAME: self.handle.name,
                Tag.TRIAL_NUMBER: str(trial.number),
                Tag.TRIAL_STATE: "RUNNING",
            },
            progress_bar=False,
            # On the trial at once: if this worker dies, whoever fails the trial closes the run.
            on_run=lambda run_id: trial.set_user_attr(Attr.RUN_ID, run_id),
            kernels=self.kernels,
            closer=self.closer,
            resume_key=resume_key,  # a retry of a dead worker's trial resumes its checkpoints
        )

    def _fail(self, trial: optuna.Trial, run_id: str, error: str) -> float:
        error = reason(error)
        trial.set_user_attr(Attr.ERROR, error)
        self.mlflow.set_tag(run_id, Tag.TRIAL_STATE, "FAIL")
        self.mlflow.set_tag(run_id, Tag.ERROR, error)
        raise TrialFailed(error)

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        left = self.budget_left(study)
        if left is not None and left <= 0:
            study.stop()
        if self.console:
            self.console.print(progress_line(study, self.handle))

    def run(self, timeout: float | None) -> None:
        """Trials until the budget is spent and no other worker's trial is still running.

        Waiting for the others is what makes a dead worker harmless: its trial goes stale,
        is failed by the first live worker to check (`fail_stale_trials`), and the retry it
        enqueues frees one trial of budget, which this loop then runs.
        """
        # Trial n's run is closed (HTML, uploads) in the closer's thread while trial n+1 runs;
        # leaving the block waits for every close.
        with notebook.warm_kernels(tracking_uri=tracking.tracking_uri()) as self.kernels, RunCloser() as self.closer:
            self._run_trials(timeout)
        self.kernels = self.closer = None

    def _run_trials(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        study = self.handle.load()
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            budget = self.budget_left(study)
            if budget is None or budget > 0:
                study.optimize(
                    self.objective,
                    n_trials=None,
                    timeout=left,
                    catch=(TrialFailed,),
                    callbacks=[self.after_trial],
                    gc_after_trial=False,
                )
                if budget is None:  # a time budget: optimize ran until the deadline
                    return
                continue
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if not running:
                return
            # A cheap query: others' trials end (or go stale) when they do, not at the next heartbeat.
            time.sleep(min(1.0, studies.heartbeat_seconds()))
            studies.fail_stale_trials(study)


def _this_process() -> str:
    """`host:pid`: which worker ran a trial.

    The pid is the one the user started: a command forked by a kernel server (launch.py) runs in
    another process, but `kill` of the started one is what stops it.
    """
    return f"{socket.gethostname()}:{os.environ.get(ENV_PID) or os.getpid()}"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def progress_line(study: optuna.Study, handle: Study) -> str:
    """`trial 5/12 · 3 complete, 1 pruned, 0 failed, 1 running · best val_acc 0.9630 (lr=0.0031)`."""
    trials = study.get_trials(deepcopy=False)
    found = studies.counts(trials)
    done = studies.budget_used(trials) - found["RUNNING"]  # a retried or interrupted trial is not one more
    line = (
        f"trial {done}/{handle.n_trials or '?'} · {found['COMPLETE']} complete, {found['PRUNED']} pruned, "
        f"{found['FAIL']} failed, {found['RUNNING']} running"
    )
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in best.params.items())
        line += f" · best {handle.tune.metric} {best.value:.4f} (trial {best.number}: {shown})"
    return line


def fixed_settings(handle: Study) -> dict[str, Any]:
    """The settings every trial of the study trains with: the spec's (with `--set`), less the searched ones.

    As JSON values (lists, not tuples), the form Optuna keeps them in as a study attribute.
    """
    import json

    settings = {k: v for k, v in handle.spec.parameters().items() if k not in handle.tune.space}
    return json.loads(json.dumps(settings, default=str))


def check_same_settings(handle: Study, study: optuna.Study) -> None:
    """Refuse to join a study whose driver trains its trials with other settings than this worker's.

    Raises `SpecError` naming up to 3 settings that differ (the study's value, then this worker's):
    a worker started on the spec file without the driver's `--set` trained every trial it ran with
    the file's settings, and the study compared trials that were not trained alike.
    """
    recorded = study.user_attrs.get(Attr.SETTINGS)
    if not isinstance(recorded, dict):  # a study made by an older labbook: nothing to compare with
        return
    mine = fixed_settings(handle)
    differ = sorted(k for k in recorded.keys() | mine.keys() if recorded.get(k) != mine.get(k))
    if differ:
        shown = ", ".join(f"{k}={recorded.get(k)!r} (this worker: {mine.get(k)!r})" for k in differ[:3])
        more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
        raise SpecError(
            reason(
                f"study {handle.name!r} trains its trials with {shown}{more}: give this worker the same "
                "--set as `labbook tune`, or start another study with --study-name"
            )
        )


def run_worker(handle: Study, console: Console | None = None, wait: float = 0.0) -> None:
    """Join a study and run its trials until its budget is spent (`labbook worker`).

    `labbook tune` creates the study and its MLflow parent run; a worker started before it
    waits up to `wait` seconds for both, so workers can be started in any order.
    """
    tracking.check_server()
    deadline = time.monotonic() + wait
    while True:
        try:
            loaded = handle.load()
            parent = loaded.user_attrs.get(Attr.PARENT_RUN)
        except KeyError:  # optuna: no study of that name in the storage yet
            parent = None
        if parent or time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    if not parent:
        raise SpecError(
            f"study {handle.name!r} on {tracking.redact(handle.storage_url)} does not exist or has no MLflow "
            "parent run: start it with `labbook tune` (or give --wait SECONDS)"
        )
    check_same_settings(handle, loaded)
    if console:
        console.print(f"joined study {handle.name!r} on {tracking.redact(handle.storage_url)}; parent run {parent}")
    _Worker(handle, parent, console).run(handle.timeout)


def _worker_processes(handle: Study, count: int) -> list[subprocess.Popen]:
    """`count` more `labbook worker` processes on the same storage, each with its share of threads."""
    if count <= 0:
        return []
    if handle.spec_path is None:
        raise SpecError("--workers needs the spec file path")
    command = [
        str(Path(sys.executable).with_name("labbook")),
        "worker",
        str(handle.spec_path),
        "--storage",
        # Redacted: a command line is readable by every local user. The password goes to the
        # workers through their environment (`LABBOOK_SECRET_URLS`; `studies.storage_url` reveals it).
        tracking.notebook_parameter(handle.storage_url),
        "--study-name",
        handle.name,
        "--quiet",
    ]
    if handle.n_trials is not None:
        command += ["--n-trials", str(handle.n_trials)]
    if handle.timeout is not None:
        command += ["--timeout", str(handle.timeout)]
    command += _setting_flags(handle)
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri()}
    return [subprocess.Popen(command, env=env) for _ in range(count)]


def _setting_flags(handle: Study) -> list[str]:
    """`--set name=value` for every setting the driver trains with that its spec file does not say.

    A worker process reads the spec file again: without these, `--set` on `labbook tune` and a
    pipeline step's `set:` reached only the driver's own trials, and the other workers' trials of
    the same study trained with the file's settings (seen: `--set max_epochs=30 --workers 2`
    trained every other trial for the file's 3 epochs). Values are written as YAML flow, which
    `--set` reads back to the same value (floats keep their dot: `1.0e-05`).
    """
    import yaml

    from pipelines.specs.spec import load_spec

    on_file = load_spec(handle.spec_path).parameters()
    flags: list[str] = []
    for name, value in handle.spec.parameters().items():
        if name not in on_file or on_file[name] != value:
            shown = yaml.safe_dump(value, default_flow_style=True, width=math.inf).removesuffix("...\n").strip()
            flags += ["--set", f"{name}={shown}"]
    return flags


def tune(
    handle: Study,
    workers: int = 1,
    register: bool = True,
    console: Console | None = None,
    confirm_top: int = 0,
    seeds: int = 3,
    report: bool = True,
    launcher: Callable[[Study, str, Console | None], None] | None = None,
) -> StudyResult:
    """Run (or resume) the study to its budget with `workers` processes, then summarize it.

    `launcher(handle, parent_run_id, console)`, if given, runs the trials elsewhere instead of
    this process and `workers - 1` local ones (e.g. a SLURM job array, `launchers.slurm`).
    """
    created, parent = create(handle)
    mlflow = tracking.client()
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # kernels inherit it: no oversubscription
    if console:
        console.print(f"study {handle.name!r} on {tracking.redact(handle.storage_url)}; MLflow parent run {parent}")
        console.print(progress_line(created, handle))
    started = time.monotonic()
    others = _worker_processes(handle, workers - 1) if launcher is None else []
    try:
        if launcher is None:
            _Worker(handle, parent, console).run(handle.timeout)
        else:
            launcher(handle, parent, console)
    except BaseException as exc:
        # Stop the other workers (they record their running trials as interrupted), keep the
        # trials table on the parent run, and close it FAILED with the reason.
        for process in others:
            process.terminate()
            process.wait()
        summarize(handle, parent, mlflow, register=False)
        reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
        tracking.finish_run(mlflow, parent, reason)
        raise
    for process in others:
        process.wait()
    try:
        if confirm_top > 0:
            _confirm(handle, parent, mlflow, confirm_top, seeds, console)
        else:
            created.set_user_attr(Attr.BEST_BY_MEAN, None)  # an earlier confirmation predates these trials
        result = summarize(handle, parent, mlflow, register=register)
        mlflow.log_metric(parent, "study_seconds", time.monotonic() - started)
        if report:
            _report(handle, parent, mlflow, console)
    except BaseException as exc:  # the study run never stays RUNNING behind a failed summary
        with contextlib.suppress(Exception):
            why = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
            tracking.finish_run(mlflow, parent, reason(why))
        raise
    tracking.finish_run(mlflow, parent)
    if console:
        print_summary(console, handle, result)
    return result


def _report(handle: Study, parent: str, mlflow: MlflowClient, console: Console | None) -> None:
    """Execute notebooks/report.ipynb for the study and attach it (ipynb, HTML, plots) to the parent."""
    from pipelines.execution import notebook

    uri = tracking.tracking_uri()
    executed = notebook.execute(
        tracking.PROJECT_ROOT / "notebooks" / "report.ipynb",
        tracking.output_dir(uri, parent),
        {"study_name": handle.name, "storage": handle.storage_url, "tracking_uri": uri, "parent_run_id": parent},
        progress_bar=False,
    )
    notebook.attach(mlflow, parent, executed, "report")
    if executed.interrupted:
        raise executed.interrupted
    if executed.error:  # the study's results stand; say what the report could not do
        mlflow.set_tag(parent, Tag.REPORT_ERROR, reason(executed.error))
        if console:
            console.print(f"[yellow]warning: the study report failed: {executed.error}[/yellow]")
    elif console:
        console.print(f"study report: {executed.html}")


def summarize(handle: Study, parent: str, mlflow: MlflowClient, register: bool = True) -> StudyResult:
    """Counts and best value on the parent run, the trials table as CSV, the champion."""
    study = handle.load(heartbeat=False)
    trials = study.get_trials(deepcopy=False)
    found = studies.counts(trials)
    result = StudyResult(handle.name, handle.storage_url, parent, found, summary=trials_table(study))
    mlflow.log_batch(
        parent,
        metrics=[_metric(f"n_{state.lower()}", n) for state, n in found.items() if state != "RUNNING"],
    )
    if found["COMPLETE"]:
        best = study.best_trial
        result.best_value, result.best_params = best.value, best.params
        result.best_run_id = best.user_attrs.get(Attr.RUN_ID)
        mlflow.log_metric(parent, "best_value", best.value)
        mlflow.set_tag(parent, Tag.BEST_TRIAL, str(best.number))
        if result.best_run_id:
            mlflow.set_tag(parent, Tag.BEST_RUN_ID, result.best_run_id)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "study_summary.csv"
        result.summary.to_csv(path, index=False)
        mlflow.log_artifact(parent, str(path), "tables")
    # With --confirm-top, the champion candidate is the best configuration by its mean over seeds.
    by_mean = study.user_attrs.get(Attr.BEST_BY_MEAN)
    candidate = (by_mean["run_id"], by_mean["mean"]) if by_mean else (result.best_run_id, result.best_value)
    if register and candidate[0] is not None:
        result.register_error = _unregistrable(mlflow, candidate[0])
    if register and candidate[0] is not None and result.register_error is None:
        from pipelines.tracking.champion import promote

        try:
            result.champion = promote(
                handle.spec.name, candidate[0], handle.tune.metric, handle.tune.direction, candidate[1]
            )
        except Exception as exc:  # noqa: BLE001 - the study's results stand; say why nothing was registered
            result.register_error = f"not registered: the best trial's run {candidate[0]}: {reason(exc)}"
    if result.register_error:
        mlflow.set_tag(parent, Tag.REGISTER_ERROR, reason(result.register_error))
    return result


def _unregistrable(mlflow: MlflowClient, run_id: str) -> str | None:
    """Why the champion candidate's run cannot be registered (its record is incomplete), or None.

    Optuna holds a trial COMPLETE as soon as its value is known; its run may still have failed
    to record the model (a failed upload or model log, a driver that died before closing it).
    Registering it would point `champion` at a model the record does not hold: refused, saying so.
    """
    run = mlflow.get_run(run_id)
    if run.info.status != "FINISHED":
        error = run.data.tags.get(Tag.ERROR) or "no reason recorded"
        return f"not registered: the best trial's run {run_id} is {run.info.status} ({error})"
    return None


def _confirm(handle: Study, parent: str, mlflow: MlflowClient, k: int, n_seeds: int, console: Console | None) -> None:
    """Re-run the top-k configurations with `n_seeds` fresh seeds each (see `pipelines.study.confirm`)."""
    from pipelines.study import confirm

    study = handle.load(heartbeat=False)
    tune = handle.tune
    seeds = [handle.spec.trainer.seed + 1 + i for i in range(n_seeds)]

    def run_one(trial: optuna.trial.FrozenTrial, seed: int):
        spec = handle.spec.with_overrides({**decoded_params(tune, trial.params), "seed": seed})
        if console:
            console.print(f"[dim]confirming trial {trial.number} with seed {seed}[/dim]")
        result = run_training(
            spec,
            handle.spec_path,
            parent_run_id=parent,
            run_name=f"{handle.name}-trial-{trial.number}-seed-{seed}",
            extra_parameters=monitor_parameters(tune),
            extra_tags={
                Tag.STUDY_NAME: handle.name,
                Tag.CONFIRMS_TRIAL: str(trial.number),
                Tag.KIND: "confirm",
            },
            progress_bar=False,
            kernels=kernels,
        )
        return result, (None if result.error else best_logged(mlflow, result.run_id, tune))

    with notebook.warm_kernels(tracking_uri=tracking.tracking_uri(), expected=k * len(seeds)) as kernels:
        confirmed = confirm.confirm(study.get_trials(deepcopy=False), k, seeds, tune.direction, run_one)
    confirm.log_to_parent(mlflow, parent, confirmed, tune.metric)
    frame = confirm.table(confirmed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "confirm_top.csv"
        frame.to_csv(path, index=False)
        mlflow.log_artifact(parent, str(path), "tables")
    if confirmed:
        best = confirmed[0]
        # The registered model is the best-by-mean configuration's run closest to its mean.
        values = dict(zip(best.run_ids, best.values, strict=False))
        run_id = min(values, key=lambda r: abs(values[r] - best.mean))
        study.set_user_attr(
            "best_by_mean", {"trial": best.trial, "mean": best.mean, "ci95": best.ci95, "run_id": run_id}
        )
    if console:
        table = Table(title=f"top {k} configurations over seeds {seeds}: {tune.metric} mean ± 95% interval")
        for column in ("trial", "params", "mean ± ci95", "values"):
            table.add_column(column)
        for c in confirmed:
            shown = ", ".join(f"{n}={_fmt(v)}" for n, v in c.params.items())
            table.add_row(str(c.trial), shown, f"{c.mean:.4f} ± {c.ci95:.4f}", ", ".join(f"{v:.4f}" for v in c.values))
        console.print(table)


def _metric(key: str, value: float):
    from mlflow.entities import Metric

    return Metric(key, float(value), int(time.time() * 1000), 0)


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, value, parameters, duration, MLflow run id."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        duration = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name,
                "value": t.value,
                **{k: v for k, v in t.params.items()},
                "duration_s": round(duration, 1) if duration is not None else None,
                "run_id": t.user_attrs.get(Attr.RUN_ID),
                "error": t.user_attrs.get(Attr.ERROR),
            }
        )
    return pd.DataFrame(rows)


def print_summary(console: Console, handle: Study, result: StudyResult) -> None:
    table = Table(title=f"study {handle.name}: {handle.tune.direction} {handle.tune.metric}")
    frame = result.summary if result.summary is not None else pd.DataFrame()
    columns = [c for c in frame.columns if c not in ("run_id", "error")]
    for column in columns:
        table.add_column(column)
    for _, row in frame.iterrows():
        table.add_row(*(_fmt(row[c]) if row[c] is not None else "" for c in columns))
    console.print(table)
    if result.best_value is not None:
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in result.best_params.items())
        console.print(f"best {handle.tune.metric} {result.best_value:.4f}: {shown}  (run {result.best_run_id})")
    if result.register_error:
        console.print(f"[yellow]warning: {result.register_error}[/yellow]")
    if result.champion:
        c = result.champion
        moved = "moved to" if c["promoted"] else "stays on"
        held = f"{moved} v{c['champion_version']}" if c["champion_version"] else "not set"
        console.print(f"registered {c['name']} v{c['version']}; alias champion {held} ({c['reason']})")
