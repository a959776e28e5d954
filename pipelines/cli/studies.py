"""`labbook tune` and `labbook worker`: an Optuna study whose trials are notebook runs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from pipelines.cli.common import (
    LauncherOpt,
    MemOpt,
    PartitionOpt,
    SetOpt,
    SpecArg,
    TimeOpt,
    app,
    before_writing,
    close_dead_runs,
    fail,
    load_training_spec,
    out,
    reported,
    slurm_options,
    stop_on_sigterm,
)
from pipelines.specs.spec_io import SpecError

StorageOpt = Annotated[
    str | None,
    typer.Option(
        help="Optuna storage URL (default: the spec's, LABBOOK_OPTUNA_STORAGE, or sqlite:///mlruns/optuna.db)."
    ),
]


StudyOpt = Annotated[str | None, typer.Option("--study-name", help="Study name (default: the spec's name).")]


TrialsOpt = Annotated[int | None, typer.Option("--n-trials", min=1, help="Trials in total, finished ones included.")]


TimeoutOpt = Annotated[float | None, typer.Option(min=1, help="Stop starting new trials after this many seconds.")]


def _study(spec: Path, set_: list[str] | None, n_trials, timeout, storage, study_name):
    from pipelines.specs import environment
    from pipelines.specs.spec_io import MAX_NAME
    from pipelines.study.tune import open_study

    if timeout is not None and not math.isfinite(timeout):  # `inf`, or digits past a float's range
        raise fail("--timeout: expected a finite number of seconds, 1 or more")
    loaded = load_training_spec(spec, set_)
    if study_name is not None and not 1 <= len(study_name) <= MAX_NAME:
        raise fail(f"--study-name: expected 1 to {MAX_NAME} characters, got {len(study_name)}")
    with reported(SpecError, ValueError):
        environment.check()  # before open_study makes the store's folder
        return open_study(loaded, spec, n_trials, timeout, storage, study_name)


@app.command()
def tune(
    spec: SpecArg,
    n_trials: TrialsOpt = None,
    timeout: TimeoutOpt = None,
    workers: Annotated[int, typer.Option(min=1, help="Trials run at once, as separate processes.")] = 1,
    storage: StorageOpt = None,
    study_name: StudyOpt = None,
    set_: SetOpt = None,
    register: Annotated[bool, typer.Option(help="Register the best model; move `champion` if it is better.")] = True,
    confirm_top: Annotated[
        int, typer.Option(min=0, help="Re-run the K best configurations with fresh seeds; choose by the mean.")
    ] = 0,
    seeds: Annotated[int, typer.Option(min=2, help="Seeds per configuration for --confirm-top.")] = 3,
    report: Annotated[bool, typer.Option(help="Execute notebooks/report.ipynb and attach it to the study.")] = True,
    launcher: LauncherOpt = None,
    partition: PartitionOpt = None,
    time_limit: TimeOpt = None,
    cpus_per_worker: Annotated[int | None, typer.Option(min=1, help="SLURM: CPUs of each worker.")] = None,
    gpus_per_worker: Annotated[int | None, typer.Option(min=0, help="SLURM: GPUs of each worker.")] = None,
    mem: MemOpt = None,
) -> None:
    """Search the spec's tune: space with Optuna; every trial is an executed notebook run."""
    from pipelines.launchers.slurm import LaunchFailed
    from pipelines.study.tune import tune as run_study

    handle = _study(spec, set_, n_trials, timeout, storage, study_name)
    slurm = slurm_options(handle.spec, launcher, partition, time_limit, cpus_per_worker, gpus_per_worker, mem)
    elsewhere = None
    if slurm is not None:
        from functools import partial

        from pipelines.launchers.slurm import run_study as slurm_study

        elsewhere = partial(slurm_study, count=workers, options=slurm)
    before_writing()
    stop_on_sigterm()
    # LaunchFailed: SLURM workers ended with budget left
    with reported(SpecError, tracking=True, failures=(LaunchFailed,), interrupts=True, store=True):
        close_dead_runs()
        result = run_study(
            handle, workers=workers, register=register, console=out, confirm_top=confirm_top, seeds=seeds,
            report=report, launcher=elsewhere,
        )  # fmt: skip
    if result.counts["COMPLETE"] == 0:
        errors = result.summary["error"].dropna() if result.summary is not None and len(result.summary) else []
        raise fail(f"no trial completed; first error: {errors.iloc[0] if len(errors) else 'none recorded'}", code=1)


@app.command()
def worker(
    spec: SpecArg,
    storage: StorageOpt = None,
    study_name: StudyOpt = None,
    n_trials: TrialsOpt = None,
    timeout: TimeoutOpt = None,
    set_: SetOpt = None,
    quiet: Annotated[bool, typer.Option(help="No progress lines.")] = False,
    wait: Annotated[float, typer.Option(min=0, help="Seconds to wait for `labbook tune` to create the study.")] = 0.0,
) -> None:
    """Join a study started by `labbook tune` and run trials until its budget is spent."""
    from pipelines.study.tune import run_worker

    handle = _study(spec, set_, n_trials, timeout, storage, study_name)
    before_writing()
    stop_on_sigterm()
    with reported(SpecError, tracking=True, interrupts=True, store=True):
        close_dead_runs()
        run_worker(handle, console=None if quiet else out, wait=wait)


@app.command()
def jobs(
    limit: Annotated[int, typer.Option(min=1, help="The newest N runs.")] = 100,
) -> None:
    """Which runs and trials ran (or run) on which SLURM job, and the job's state now."""
    from pipelines.launchers.slurm import jobs as slurm_jobs

    rows = slurm_jobs(limit)
    if not rows:
        out.print("no runs on SLURM jobs")
        return
    table = Table("SLURM job", "job state", "run", "MLflow status", "run id", title="runs on SLURM jobs")
    for row in rows:
        table.add_row(row.job, row.state, escape(row.what), row.run_status, row.run_id)
    out.print(table)
