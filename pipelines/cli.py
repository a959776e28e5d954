"""The `labbook` command: parse, call, print. Bad input exits 2 with one line."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pipelines.errors import TrackingUnavailable, reason
from pipelines.launch import quiet_defaults
from pipelines.spec_io import SpecError

app = typer.Typer(
    help="Deep-learning experiments as parameterized notebooks, tracked in MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
quiet_defaults()  # before MLflow and nbformat are imported (inside the commands)
# A store that cannot be written is said in one line (`store_problem`); MLflow would also log
# the database error with its traceback.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
out = Console(soft_wrap=True)  # progress lines stay whole in logs and CI output
err = Console(stderr=True, soft_wrap=True)

EXIT_BAD_INPUT = 2

SpecArg = Annotated[Path, typer.Argument(help="Pipeline spec (YAML), e.g. pipelines/digits_mlp.yaml.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a setting by its name, e.g. --set lr=0.01 (repeatable)."),
]


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (its terminal closed), turned into the same orderly stop as Ctrl-C
    (runs closed FAILED "interrupted", notebooks kept)."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop_on_sigterm() -> None:
    def handler(signum: int, frame: object) -> None:
        raise Terminated(signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


def _exit_code(exc: KeyboardInterrupt) -> int:
    return 128 + exc.signum if isinstance(exc, Terminated) else 130


def _interrupted(exc: KeyboardInterrupt) -> typer.Exit:
    with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
        err.print("interrupted: run the same command again to resume")
    return typer.Exit(_exit_code(exc))


def _before_writing() -> None:
    """Checks before a command writes anything: every LABBOOK_* setting (exit 2), a read-only store (exit 1)."""
    from pipelines import environment
    from pipelines.tracking import check_writable, store_problem

    try:
        environment.check()
    except ValueError as exc:
        raise _fail(str(exc)) from None
    try:
        check_writable()
    except OSError as exc:
        raise _fail(store_problem(exc) or str(exc), code=1) from None


def _close_dead_runs() -> None:
    """Runs whose driver died, closed FAILED on the way into a command (never failing it)."""
    from pipelines.reap import reap_quietly

    reap_quietly(lambda line: err.print(line, markup=False, highlight=False))


def _store_failed(exc: Exception) -> typer.Exit:
    """A full or read-only store, said in one line (exit 1); any other error goes on as it was."""
    from pipelines.tracking import store_problem

    problem = store_problem(exc)
    if problem is None:
        raise exc
    return _fail(problem, code=1)


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    err.print(f"error: {reason(message)}", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _load(spec: Path, overrides: list[str] | None):
    from pipelines.spec import load_spec, parse_overrides

    try:
        return load_spec(spec, parse_overrides(overrides or []))
    except SpecError as exc:
        raise _fail(str(exc)) from None


def _is_pipeline(spec: Path) -> bool:
    from pipelines.spec_io import read_yaml

    try:
        return "steps" in (read_yaml(spec) or {})
    except (SpecError, TypeError):
        return False


def _load_pipeline(spec: Path):
    from pipelines.pipeline_spec import load_pipeline

    try:
        return load_pipeline(spec)
    except SpecError as exc:
        raise _fail(str(exc)) from None


@app.command()
def validate(spec: SpecArg, set_: SetOpt = None) -> None:
    """Check a spec (and overrides), or a pipeline with its steps and references, running nothing."""
    if _is_pipeline(spec):
        pipeline = _load_pipeline(spec)
        out.print(f"{spec}: ok (pipeline: {' → '.join(f'{s.name} ({s.kind})' for s in pipeline.steps)})")
        return
    loaded = _load(spec, set_)
    out.print(f"{spec}: ok ({loaded.model.name} on {loaded.data.name}, {loaded.trainer.max_epochs} epochs)")


@app.command()
def script(
    spec: SpecArg,
    set_: SetOpt = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the script.")] = Path("train.py"),
    output_dir: Annotated[
        str | None,
        typer.Option(help="Folder for checkpoints/; across nodes, one all nodes read (default: beside the store)."),
    ] = None,
) -> None:
    """Write a training spec's notebook as a Python script, for torchrun or srun on several nodes."""
    from pipelines.script import notebook_script

    loaded = _load(spec, set_)
    written = notebook_script(loaded, spec, output, output_dir)
    t = loaded.trainer
    out.print(f"wrote {written}: {loaded.model.name} on {loaded.data.name}, strategy {t.strategy}, devices {t.devices}")
    out.print(f"launch: torchrun --nnodes {t.num_nodes} --nproc-per-node {t.devices} ... {written}")


@app.command()
def run(
    spec: SpecArg,
    set_: SetOpt = None,
    run_name: Annotated[str | None, typer.Option(help="MLflow run name (default: the spec's name).")] = None,
    from_step: Annotated[
        str | None, typer.Option("--from", help="Pipelines: continue the last run of the pipeline from this step.")
    ] = None,
    pipeline_run: Annotated[
        str | None, typer.Option(help="Pipelines: with --from, the pipeline run to continue (default: the latest).")
    ] = None,
    trigger: Annotated[str, typer.Option(hidden=True, help="manual or scheduled (set by the scheduler).")] = "manual",
    schedule_id: Annotated[str | None, typer.Option(hidden=True, help="The schedule that fired this run.")] = None,
    launcher: LauncherOpt = None,
    nodes: Annotated[int | None, typer.Option(min=1, help="SLURM: nodes of the training job.")] = None,
    devices: Annotated[int | None, typer.Option(min=1, help="SLURM: DDP ranks (srun tasks) per node.")] = None,
    partition: PartitionOpt = None,
    time_limit: TimeOpt = None,
    cpus_per_task: Annotated[int | None, typer.Option(min=1, help="SLURM: CPUs of each rank.")] = None,
    gpus_per_task: Annotated[int | None, typer.Option(min=0, help="SLURM: GPUs of each rank.")] = None,
    mem: MemOpt = None,
) -> None:
    """Train a spec's model as one executed notebook run, or run a pipeline spec's steps in order."""
    from pipelines.tracking import check_server, tracking_uri

    if _is_pipeline(spec):
        if set_:
            raise _fail("--set: a pipeline's steps take their settings from its spec (steps.<name>.set)")
        _run_pipeline(spec, from_step, pipeline_run, trigger, schedule_id)
        return
    if from_step or pipeline_run:
        raise _fail("--from/--pipeline-run: only a pipeline spec (with steps:) has steps to continue")
    from pipelines.run import run_training

    loaded = _load(spec, set_)
    slurm = _slurm_options(
        loaded, launcher, partition, time_limit, cpus_per_task, gpus_per_task, mem, nodes or 1, devices or 1
    )
    if slurm is None and (nodes or devices):
        raise _fail("--nodes/--devices: only with --launcher slurm (locally: --set devices=N)")
    _before_writing()
    _stop_on_sigterm()
    if slurm is not None:
        _run_on_slurm(loaded, spec, slurm, nodes or 1, devices or 1, run_name)
        return
    out.print(f"running {spec} → {tracking_uri()}")
    try:
        check_server()
        _close_dead_runs()
        result = run_training(loaded, spec_path=spec, run_name=run_name)
    except TrackingUnavailable as exc:
        raise _fail(str(exc), code=1) from None
    except KeyboardInterrupt as exc:
        raise _interrupted(exc) from None
    except Exception as exc:
        raise _store_failed(exc) from None
    out.print(f"run id: {result.run_id}  status: {result.status}")
    out.print(f"executed notebook: {result.notebook}")
    if result.metrics:
        table = Table("metric", "value", title="final metrics")
        for name in sorted(k for k in result.metrics if k.startswith(("test_", "val_", "train_"))):
            table.add_row(name, f"{result.metrics[name]:.4f}")
        out.print(table)
    if result.error:
        raise _fail(f"notebook failed: {result.error}", code=1)


def _run_on_slurm(loaded, spec: Path, options, nodes: int, devices: int, run_name: str | None) -> None:
    from pipelines.launchers.slurm import LaunchFailed, submit_training
    from pipelines.tracking import check_server, tracking_uri

    out.print(f"running {spec} on SLURM → {tracking_uri()}")
    try:
        check_server()
        job = submit_training(loaded, spec, options, nodes, devices, run_name, console=out)
    except (TrackingUnavailable, LaunchFailed) as exc:
        raise _fail(str(exc), code=1) from None
    except KeyboardInterrupt as exc:
        raise _interrupted(exc) from None
    requeues = f", requeued {job.restarts}x" if job.restarts else ""
    out.print(f"run id: {job.run_id}  SLURM job {job.job_id}: {job.state}{requeues}")
    if job.state != "COMPLETED":
        raise _fail(f"SLURM job {job.job_id} ended {job.state}; its log: {job.folder}/slurm-{job.job_id}.log", code=1)


def _run_pipeline(spec: Path, from_step: str | None, pipeline_run: str | None, trigger: str, schedule_id: str | None):
    from pipelines.pipeline import run_pipeline
    from pipelines.tracking import tracking_uri

    if trigger not in ("manual", "scheduled"):
        raise _fail(f"--trigger: got {trigger!r}; expected manual or scheduled")
    pipeline = _load_pipeline(spec)
    if from_step:
        try:
            pipeline.step(from_step)
        except SpecError as exc:
            raise _fail(str(exc)) from None
    _before_writing()
    _stop_on_sigterm()
    out.print(f"running pipeline {spec} → {tracking_uri()}")
    try:
        _close_dead_runs()
        result = run_pipeline(pipeline, spec, from_step, pipeline_run, trigger, schedule_id, console=out)
    except SpecError as exc:
        raise _fail(str(exc)) from None
    except KeyboardInterrupt as exc:
        raise _interrupted(exc) from None
    out.print(f"pipeline run {result.run_id}: {result.status}")
    if result.error:
        err.print(f"error: {reason(result.error)}", markup=False, highlight=False)
        err.print(f"fix it, then continue with: labbook run {spec} --from {result.failed_step}", markup=False)
        raise typer.Exit(1)


StorageOpt = Annotated[
    str | None,
    typer.Option(
        help="Optuna storage URL (default: the spec's, LABBOOK_OPTUNA_STORAGE, or sqlite:///mlruns/optuna.db)."
    ),
]
StudyOpt = Annotated[str | None, typer.Option("--study-name", help="Study name (default: the spec's name).")]
TrialsOpt = Annotated[int | None, typer.Option("--n-trials", min=1, help="Trials in total, finished ones included.")]
TimeoutOpt = Annotated[float | None, typer.Option(min=1, help="Stop starting new trials after this many seconds.")]


LauncherOpt = Annotated[
    str | None, typer.Option(help="local (default) or slurm: where the work runs (default: the spec's launcher:).")
]
PartitionOpt = Annotated[str | None, typer.Option(help="SLURM partition (default: the spec's, else the cluster's).")]
TimeOpt = Annotated[
    str | None, typer.Option("--time", help="SLURM time limit per job: minutes, H:MIN:SEC or D-H:MIN.")
]
MemOpt = Annotated[str | None, typer.Option(help="SLURM memory per node, e.g. 8G.")]


def _slurm_options(spec, launcher, partition, time_limit, cpus, gpus, mem, nodes: int = 1, tasks: int = 1):
    """The SLURM options of a launch (spec's `launcher:`, then flags), checked against the cluster;
    None for a local launch. Bad input exits 2 here, before any study or run exists."""
    from pipelines.launchers import slurm

    chosen = launcher or getattr(getattr(spec, "launcher", None), "name", None) or "local"
    if chosen not in ("local", "slurm"):
        raise _fail(f"--launcher: got {chosen!r}; expected local or slurm")
    given = {"--partition": partition, "--time": time_limit, "--mem": mem, "--cpus/--gpus": cpus or gpus}
    if chosen == "local":
        if any(v is not None for v in given.values()):
            raise _fail(f"{next(k for k, v in given.items() if v is not None)}: only with --launcher slurm")
        return None
    base = slurm.SlurmOptions(**(spec.launcher.slurm_options() if getattr(spec, "launcher", None) else {}))
    options = base.merged(partition=partition, time=time_limit, cpus_per_task=cpus, gpus_per_task=gpus, mem=mem)
    try:
        slurm.check(options, nodes=nodes, tasks_per_node=tasks)
    except SpecError as exc:
        raise _fail(str(exc)) from None
    return options


def _study(spec: Path, set_: list[str] | None, n_trials, timeout, storage, study_name):
    from pipelines import environment
    from pipelines.spec_io import MAX_NAME
    from pipelines.tune import open_study

    loaded = _load(spec, set_)
    if study_name is not None and not 1 <= len(study_name) <= MAX_NAME:
        raise _fail(f"--study-name: expected 1 to {MAX_NAME} characters, got {len(study_name)}")
    try:
        environment.check()  # before open_study makes the store's folder
        return open_study(loaded, spec, n_trials, timeout, storage, study_name)
    except (SpecError, ValueError) as exc:
        raise _fail(str(exc)) from None


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
    from pipelines.tune import tune as run_study

    handle = _study(spec, set_, n_trials, timeout, storage, study_name)
    slurm = _slurm_options(handle.spec, launcher, partition, time_limit, cpus_per_worker, gpus_per_worker, mem)
    elsewhere = None
    if slurm is not None:
        from functools import partial

        from pipelines.launchers.slurm import run_study as slurm_study

        elsewhere = partial(slurm_study, count=workers, options=slurm)
    _before_writing()
    _stop_on_sigterm()
    try:
        _close_dead_runs()
        result = run_study(
            handle, workers=workers, register=register, console=out, confirm_top=confirm_top, seeds=seeds,
            report=report, launcher=elsewhere,
        )  # fmt: skip
    except SpecError as exc:
        raise _fail(str(exc)) from None
    except TrackingUnavailable as exc:
        raise _fail(str(exc), code=1) from None
    except LaunchFailed as exc:  # SLURM workers ended with budget left
        raise _fail(str(exc), code=1) from None
    except KeyboardInterrupt as exc:
        raise _interrupted(exc) from None
    except Exception as exc:
        raise _store_failed(exc) from None
    if result.counts["COMPLETE"] == 0:
        errors = result.summary["error"].dropna() if result.summary is not None and len(result.summary) else []
        raise _fail(f"no trial completed; first error: {errors.iloc[0] if len(errors) else 'none recorded'}", code=1)


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
    from pipelines.tune import run_worker

    handle = _study(spec, set_, n_trials, timeout, storage, study_name)
    _before_writing()
    _stop_on_sigterm()
    try:
        _close_dead_runs()
        run_worker(handle, console=None if quiet else out, wait=wait)
    except SpecError as exc:
        raise _fail(str(exc)) from None
    except TrackingUnavailable as exc:
        raise _fail(str(exc), code=1) from None
    except KeyboardInterrupt as exc:
        raise _interrupted(exc) from None
    except Exception as exc:
        raise _store_failed(exc) from None


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


@app.command()
def compare(
    experiment: Annotated[str | None, typer.Option(help="Only runs of this experiment.")] = None,
    study: Annotated[str | None, typer.Option(help="Only the trials of this study.")] = None,
    pipeline_run: Annotated[str | None, typer.Option(help="Only the runs nested under this parent run id.")] = None,
    metric: Annotated[
        str | None, typer.Option(help="Sort by this metric (losses ascending, others descending).")
    ] = None,
    top: Annotated[int | None, typer.Option(min=1, help="Keep the K best rows.")] = None,
    format_: Annotated[str, typer.Option("--format", help="table, csv, markdown or html.")] = "table",
    output: Annotated[Path | None, typer.Option(help="Write to this file instead of the terminal.")] = None,
) -> None:
    """Compare runs: parameters, final metrics, state and duration, best first."""
    from pipelines.compare import compare as compare_runs
    from pipelines.compare import render, varying_columns

    if format_ not in ("table", "csv", "markdown", "html"):
        raise _fail(f"--format: got {format_!r}; expected one of table, csv, markdown, html")
    if format_ == "table" and output is not None:
        raise _fail("--output needs --format csv, markdown or html")
    _close_dead_runs()
    try:
        frame = compare_runs(experiment, study, pipeline_run, metric, top)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    if format_ != "table":
        text = render(frame, format_)  # type: ignore[arg-type]
        if output is None:
            out.print(text, markup=False, highlight=False)
        else:
            output.write_text(text, encoding="utf-8")
            out.print(f"{len(frame)} runs written to {output}")
        return
    if frame.empty:
        out.print("no runs match")
        return
    table = Table(title=f"{len(frame)} runs" + (f", best {metric} first" if metric else ""))
    columns = varying_columns(frame, metric)
    if out.width < 120:  # a narrow terminal gets git-style short ids; --format csv has the full ones
        frame = frame.assign(run_id=frame["run_id"].str[:8])
    for column in columns:
        table.add_column(column, overflow="fold")
    for _, row in frame[columns].iterrows():
        table.add_row(*("" if value is None or value != value else _cell(value) for value in row))
    out.print(table)


def _cell(value: object) -> str:
    """A table cell: floats to 4 significant digits; `[image/png]` is text here, not rich markup."""
    return f"{value:.4g}" if isinstance(value, float) else escape(str(value))


@app.command()
def rerun(
    run_id: Annotated[str, typer.Argument(help="The MLflow run to execute again.")],
    tolerance: Annotated[float, typer.Option(min=0, help="Largest metric difference still called a match.")] = 0.0,
) -> None:
    """Execute a run again from its record and compare every final metric, old vs new."""
    from mlflow.exceptions import MlflowException

    from pipelines.rerun import rerun as rerun_run

    _stop_on_sigterm()
    try:
        done = rerun_run(run_id, tolerance)
    except (ValueError, MlflowException) as exc:
        raise _fail(" ".join(str(exc).split())) from None
    except KeyboardInterrupt as exc:
        raise _interrupted(exc) from None
    for name, (old, new) in done.changed.items():
        err.print(f"warning: {name} differs: {old or '-'} then, {new or '-'} now", markup=False)
    table = Table("metric", "old", "new", "diff", title=f"rerun of {run_id} → {done.result.run_id}")
    for _, row in done.metrics.iterrows():
        table.add_row(row["metric"], _cell(row["old"]), _cell(row["new"]), f"{row['diff']:+.3g}")
    out.print(table)
    out.print(f"verdict: {done.verdict}" + (f" (tolerance {tolerance:g})" if tolerance else ""))
    if done.verdict in ("differs", "failed"):
        raise _fail(done.result.error or "the rerun did not reproduce the run", code=1)


@app.command()
def diff(
    run_a: Annotated[str, typer.Argument(help="A run id, e.g. the best trial.")],
    run_b: Annotated[str, typer.Argument(help="Another run id, e.g. the runner-up.")],
) -> None:
    """What differs between two runs: parameters, final metrics, provenance, notebook cells."""
    from mlflow.exceptions import MlflowException

    from pipelines.diff import diff as diff_runs

    try:
        found = diff_runs(run_a, run_b)
    except (ValueError, MlflowException) as exc:
        raise _fail(" ".join(str(exc).split())) from None
    a, b = f"A {run_a[:8]}", f"B {run_b[:8]}"
    sections = [
        ("parameters that differ", found.params, ["name", "a", "b"]),
        ("final metrics", found.metrics, ["name", "a", "b", "diff"]),
        ("provenance that differs", found.tags, ["name", "a", "b"]),
        ("notebook cells whose source or outputs differ", found.cells, ["cell", "first_line", "changed", "a", "b"]),
    ]
    for title, frame, columns in sections:
        if frame.empty:
            out.print(f"{title}: none")
            continue
        table = Table(*[{"a": a, "b": b}.get(c, c) for c in columns], title=title)
        for _, row in frame[columns].iterrows():
            table.add_row(*("" if v is None or v != v else _cell(v) for v in row))
        out.print(table)


@app.command()
def reap(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list them; close nothing.")] = False,
) -> None:
    """Close runs whose driver died (kill -9, a lost machine) as FAILED "driver died", with their partial notebook.

    On this machine a driver is dead when none of its processes lives (a reused pid does not
    count); elsewhere when its heartbeat is 10 intervals old. run, tune, worker, compare and ui
    do this on the way in.
    """
    from pipelines.driver import heartbeat_seconds
    from pipelines.reap import reap as reap_runs
    from pipelines.tracking import store_problem, tracking_uri

    try:
        heartbeat_seconds()
        found = reap_runs(dry_run=dry_run)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    except Exception as exc:
        raise _fail(store_problem(exc) or f"{tracking_uri()}: {type(exc).__name__}", code=1) from None
    if not found:
        out.print("no run with a dead driver")
        return
    for item in found:  # one line a run, whole (a table would fold the run ids of a narrow terminal)
        verb = "would close" if dry_run else ("closed" if item.closed else "could not close")
        notebook = f"; partial notebook {item.notebook}" if item.notebook else ""
        line = f"{verb} run {item.run_id} ({item.experiment}/{item.run_name}) FAILED: {item.reason}{notebook}"
        out.print(line, markup=False, highlight=False)
    if not dry_run and not all(item.closed for item in found):
        raise typer.Exit(1)


@app.command()
def ui(
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 5000,
    host: Annotated[str, typer.Option(help="Interface to bind; 0.0.0.0 exposes it to the network.")] = "127.0.0.1",
    auth: Annotated[
        bool,
        typer.Option(
            help="MLflow's basic auth (as labbook server --auth): on a shared machine any local user reaches "
            "127.0.0.1; admin login from MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD."
        ),
    ] = False,
) -> None:
    """Start the MLflow UI on the store labbook's runs use."""
    from pipelines.tracking import tracking_uri

    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        out.print(f"runs are tracked by the MLflow server at {uri}: open it in a browser")
        return
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow_bin), "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    # One person's local UI: one server process (its requests run in a thread pool), not MLflow's
    # default 4, each importing MLflow (~2 s of CPU) and holding ~200 MB. `labbook server` scales.
    command += ["--workers", "1"]
    # MLflow's background job runner serves its GenAI features, not ours: off unless asked.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    if auth:
        from pipelines.server import basic_auth

        try:
            command += basic_auth(env)
        except ValueError as exc:
            raise _fail(str(exc)) from None
    _close_dead_runs()
    login = " (basic auth)" if auth else ""
    out.print(f"MLflow UI{login} for {uri} at http://{host}:{port}  (Ctrl-C to stop)")
    _serve(command, env)


def _serve(command: list[str], env: dict[str, str]) -> None:
    """Run a server in the foreground until it exits, Ctrl-C or SIGTERM; exit with its code."""
    # Its own process group, so stopping labbook (Ctrl-C or SIGTERM) stops the server's whole tree.
    server = subprocess.Popen(command, env=env, start_new_session=True)
    _stop_on_sigterm()
    try:
        code = server.wait()
    except KeyboardInterrupt as exc:
        code = _exit_code(exc)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
    raise typer.Exit(code)


@app.command()
def server(
    backend_store_uri: Annotated[
        str, typer.Option(help="Where runs live: postgresql://user@db/mlflow (or a sqlite:/// file).")
    ],
    artifacts_destination: Annotated[
        str, typer.Option(help="Where the server keeps artifacts: a folder, s3://, gs://, ... Workers need no access.")
    ],
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 5000,
    host: Annotated[str, typer.Option(help="Interface to bind; 0.0.0.0 lets other machines in.")] = "127.0.0.1",
    auth: Annotated[
        bool,
        typer.Option(help="MLflow's basic auth; admin login from MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD."),
    ] = False,
    auth_db: Annotated[
        str | None, typer.Option(help="Where --auth keeps users (default: sqlite:///mlruns/basic_auth.db).")
    ] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Server worker processes.")] = None,
) -> None:
    """Start an MLflow tracking server with proxied artifacts, for workers on many machines."""
    from pipelines.server import server_command
    from pipelines.tracking import redact

    try:
        command = server_command(backend_store_uri, artifacts_destination, host, port, auth, auth_db, workers)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    login = " (basic auth)" if auth else ""
    out.print(f"MLflow server{login} for {redact(backend_store_uri)} at {command.url}  (Ctrl-C to stop)")
    out.print(f"workers: MLFLOW_TRACKING_URI={command.url} labbook worker SPEC --storage postgresql://...")
    _serve(command.argv, command.env)


@app.command("kernel-server")
def kernel_server(
    socket_path: Annotated[Path, typer.Option("--socket", help="The Unix socket to listen on.")] = Path(
        "mlruns/kernels.sock"
    ),
    preload: Annotated[
        list[str] | None, typer.Option(help="Also import this module of yours once (repeatable).")
    ] = None,
) -> None:
    """Fork every labbook command, and every notebook's kernel, from one warm process.

    Point labbook at it with LABBOOK_KERNEL_SERVER=<socket>: a command then starts in ~0.5 s and
    its kernels too. Each kernel is still a fresh process running one notebook; the server stops
    itself when code it imported is edited.
    """
    from pipelines.socket_claim import SocketPathTaken, check_free

    path = socket_path.resolve()
    try:  # a user's file, or a live server's socket, is never replaced (the server checks again as it binds)
        check_free(str(path))
    except SocketPathTaken as exc:
        raise _fail(str(exc)) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    out.print(f"kernel server on {path}  (Ctrl-C to stop)")
    out.print(f"use it: export LABBOOK_KERNEL_SERVER={path}")
    command = [sys.executable, "-m", "pipelines.kernel_fork", "--listen", str(path)]
    command += [a for module in preload or [] for a in ("--preload", module)]
    _serve(command, dict(os.environ))


schedule_app = typer.Typer(help="Run pipelines on a schedule: add, list, remove, export.", no_args_is_help=True)
app.add_typer(schedule_app, name="schedule")
StoreOpt = Annotated[
    str | None,
    typer.Option(
        "--store", help="Schedule store URL (default: LABBOOK_SCHEDULER_DB, else sqlite:///mlruns/scheduler.db)."
    ),
]


@schedule_app.command("add")
def schedule_add(
    spec: SpecArg,
    cron: Annotated[str | None, typer.Option(help='Crontab expression, e.g. "0 3 * * *" (03:00 every day).')] = None,
    every: Annotated[float | None, typer.Option(min=1, help="Or: every this many seconds.")] = None,
    id_: Annotated[
        str | None, typer.Option("--id", help="Schedule id: 1-64 of A-Z a-z 0-9 . _ - (default: the spec's name).")
    ] = None,
    grace: Annotated[
        int, typer.Option(min=1, help="Seconds a missed fire time may be late and still run (missed ones coalesce).")
    ] = 3600,
    timezone: Annotated[
        str | None, typer.Option(help="IANA time zone the cron expression reads (default: this machine's).")
    ] = None,
    store: StoreOpt = None,
) -> None:
    """Schedule a pipeline spec; `labbook scheduler` fires it (cron expressions mean what crontab(5) says)."""
    from pipelines import schedule

    try:
        if cron is not None:  # before the spec: the flags are the likelier typos
            cron = schedule.check_cron(cron)
            timezone = schedule.check_timezone(timezone)
        if id_ is not None:
            schedule.check_id(id_)
        _load_pipeline(spec) if _is_pipeline(spec) else _load(spec, None)
        added = schedule.add(spec, cron, every, id_, grace, store, timezone)
    except SpecError as exc:
        raise _fail(str(exc)) from None
    out.print(f"schedule {added.id}: {added.spec}, {added.trigger}; next fire {schedule.when(added)}")


@schedule_app.command("list")
def schedule_list(store: StoreOpt = None) -> None:
    """Schedules with their next fire time and their last run's state."""
    from pipelines import schedule

    found, skipped = schedule.read_schedules(store)
    for line in skipped:
        err.print(f"warning: {line}", markup=False, highlight=False)
    if not found:
        out.print("no schedules")
        return
    last = schedule.last_runs([s.id for s in found])
    table = Table("id", "pipeline", "schedule", "next fire", "last run", "state", "run id", title="schedules")
    for s in found:
        when, state, run_id = last.get(s.id, (None, "", ""))
        row = (s.id, s.spec, s.trigger, schedule.when(s), _when(when) if when else "never", state, run_id)
        table.add_row(*(escape(cell) for cell in row))  # a path's [brackets] are not markup
    out.print(table)


@schedule_app.command("remove")
def schedule_remove(schedule_id: Annotated[str, typer.Argument(help="The schedule's id.")], store: StoreOpt = None):
    """Remove a schedule (runs already recorded stay in MLflow)."""
    from pipelines import schedule

    try:
        schedule.remove(schedule_id, store)
    except SpecError as exc:
        raise _fail(str(exc)) from None
    out.print(f"schedule {schedule_id} removed")


@schedule_app.command("export")
def schedule_export(
    format_: Annotated[str, typer.Option("--format", help="crontab or systemd.")] = "crontab",
    store: StoreOpt = None,
) -> None:
    """Print the schedules as crontab lines or systemd units that call `labbook run`."""
    from pipelines import schedule, schedule_export

    if format_ not in ("crontab", "systemd"):
        raise _fail(f"--format: got {format_!r}; expected crontab or systemd")
    found, skipped = schedule.read_schedules(store)
    for line in skipped:
        err.print(f"warning: {line}", markup=False, highlight=False)
    text = schedule_export.crontab(found) if format_ == "crontab" else schedule_export.systemd(found)
    print(text, end="")


@app.command()
def scheduler(store: StoreOpt = None) -> None:
    """Run due pipelines until SIGTERM or Ctrl-C (a foreground service; see README)."""
    import logging

    from pipelines import schedule

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout, force=True)
    logging.getLogger("apscheduler").setLevel(logging.ERROR)  # its own lines repeat ours
    raise typer.Exit(schedule.serve(store))


def _when(moment) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z") if moment else "-"


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
