"""`labbook validate`, `script` and `run`: one spec checked, turned into a script, or run (a pipeline too)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
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
    err,
    fail,
    is_pipeline,
    load_pipeline_spec,
    load_training_spec,
    out,
    reported,
    slurm_options,
    stop_on_sigterm,
)
from pipelines.errors import reason
from pipelines.specs.spec_io import SpecError


@app.command()
def validate(spec: SpecArg, set_: SetOpt = None) -> None:
    """Check a spec (and overrides), or a pipeline with its steps and references, running nothing."""
    if is_pipeline(spec):
        pipeline = load_pipeline_spec(spec)
        out.print(f"{spec}: ok (pipeline: {' → '.join(f'{s.name} ({s.kind})' for s in pipeline.steps)})")
        return
    loaded = load_training_spec(spec, set_)
    slurm_options(loaded, None, None, None, None, None, None)  # a SLURM `launcher:` is checked against the cluster
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
    from pipelines.execution.script import notebook_script

    loaded = load_training_spec(spec, set_)
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
    from pipelines.tracking.tags import Tag
    from pipelines.tracking.tracking import check_server, redact, tracking_uri

    if trigger not in ("manual", "scheduled"):
        raise fail(f"--trigger: got {trigger!r}; expected manual or scheduled")
    if is_pipeline(spec):
        if set_:
            raise fail("--set: a pipeline's steps take their settings from its spec (steps.<name>.set)")
        _run_pipeline(spec, from_step, pipeline_run, trigger, schedule_id)
        return
    if from_step or pipeline_run:
        raise fail("--from/--pipeline-run: only a pipeline spec (with steps:) has steps to continue")
    from pipelines.execution.run import run_training

    loaded = load_training_spec(spec, set_)
    slurm = slurm_options(
        loaded, launcher, partition, time_limit, cpus_per_task, gpus_per_task, mem, nodes or 1, devices or 1
    )
    if slurm is None and (nodes or devices):
        raise fail("--nodes/--devices: only with --launcher slurm (locally: --set devices=N)")
    before_writing()
    stop_on_sigterm()
    # As a pipeline's run is tagged: `schedule list` finds a schedule's last run by these.
    tags = {Tag.TRIGGER: trigger, **({Tag.SCHEDULE_ID: schedule_id} if schedule_id else {})}
    if slurm is not None:
        _run_on_slurm(loaded, spec, slurm, nodes or 1, devices or 1, run_name, tags)
        return
    out.print(f"running {spec} → {redact(tracking_uri())}")
    with reported(tracking=True, interrupts=next_training(loaded), store=True):
        check_server()
        close_dead_runs()
        result = run_training(loaded, spec_path=spec, run_name=run_name, extra_tags=tags)
    out.print(f"run id: {result.run_id}  status: {result.status}")
    out.print(f"executed notebook: {result.notebook}")
    if result.metrics:
        table = Table("metric", "value", title="final metrics")
        for name in sorted(k for k in result.metrics if k.startswith(("test_", "val_", "train_"))):
            table.add_row(name, f"{result.metrics[name]:.4f}")
        out.print(table)
    if result.error:
        raise fail(f"notebook failed: {result.error}", code=1)


def next_training(loaded: Any) -> str:
    """What the same `labbook run` does after an interruption: resume only with `ckpt_path: last`."""
    if loaded.trainer.ckpt_path == "last":
        return "run the same command again to resume from the last checkpoint (trainer.ckpt_path: last)"
    return "the same command trains from the start again (trainer.ckpt_path: last would resume from a checkpoint)"


def _run_on_slurm(
    loaded, spec: Path, options, nodes: int, devices: int, run_name: str | None, tags: dict[str, str]
) -> None:
    from pipelines.launchers.slurm import LaunchFailed, submit_training
    from pipelines.tracking.tracking import check_server, redact, tracking_uri

    out.print(f"running {spec} on SLURM → {redact(tracking_uri())}")
    with reported(tracking=True, failures=(LaunchFailed,), interrupts=next_training(loaded)):
        check_server()
        job = submit_training(loaded, spec, options, nodes, devices, run_name, console=out, tags=tags)
    requeues = f", requeued {job.restarts}x" if job.restarts else ""
    out.print(f"run id: {job.run_id}  SLURM job {job.job_id}: {job.state}{requeues}")
    if job.state != "COMPLETED":
        raise fail(f"SLURM job {job.job_id} ended {job.state}; its log: {job.folder}/slurm-{job.job_id}.log", code=1)


def _run_pipeline(spec: Path, from_step: str | None, pipeline_run: str | None, trigger: str, schedule_id: str | None):
    from pipelines.pipeline.pipeline import run_pipeline
    from pipelines.tracking.tracking import redact, tracking_uri

    pipeline = load_pipeline_spec(spec)
    if from_step:
        with reported(SpecError):
            pipeline.step(from_step)
    before_writing()
    stop_on_sigterm()
    out.print(f"running pipeline {spec} → {redact(tracking_uri())}")
    with reported(SpecError, interrupts=f"labbook run {spec} --from STEP continues this pipeline run at STEP"):
        close_dead_runs()
        result = run_pipeline(pipeline, spec, from_step, pipeline_run, trigger, schedule_id, console=out)
    out.print(f"pipeline run {result.run_id}: {result.status}")
    if result.error:
        err.print(reason(f"error: {result.error}"), markup=False, highlight=False)
        err.print(f"fix it, then continue with: labbook run {spec} --from {result.failed_step}", markup=False)
        raise typer.Exit(1)
