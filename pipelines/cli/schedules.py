"""`labbook schedule add|list|remove|export` and `labbook scheduler`."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from pipelines.cli.common import (
    SpecArg,
    app,
    err,
    fail,
    is_pipeline,
    load_pipeline_spec,
    load_training_spec,
    out,
    reported,
    when,
)
from pipelines.specs.spec_io import SpecError

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
    every: Annotated[float | None, typer.Option(help="Or: every this many seconds (1 to 366 days).")] = None,
    id_: Annotated[
        str | None, typer.Option("--id", help="Schedule id: 1-64 of A-Z a-z 0-9 . _ - (default: the spec's name).")
    ] = None,
    grace: Annotated[
        int,
        typer.Option(
            help="Seconds a missed fire time may be late and still run (1 to 366 days; missed ones coalesce)."
        ),
    ] = 3600,
    timezone: Annotated[
        str | None, typer.Option(help="IANA time zone the cron expression reads (default: this machine's).")
    ] = None,
    store: StoreOpt = None,
) -> None:
    """Schedule a pipeline spec; `labbook scheduler` fires it (cron expressions mean what crontab(5) says)."""
    from pipelines.schedule import schedule

    with reported(SpecError):
        if cron is not None:  # before the spec: the flags are the likelier typos
            cron = schedule.check_cron(cron)
            timezone = schedule.check_timezone(timezone)
        if id_ is not None:
            schedule.check_id(id_)
        if every is not None:
            schedule.check_every(every)
        schedule.check_grace(grace)
        load_pipeline_spec(spec) if is_pipeline(spec) else load_training_spec(spec, None)
        added = schedule.add(spec, cron, every, id_, grace, store, timezone)
    out.print(f"schedule {added.id}: {added.spec}, {added.trigger}; next fire {schedule.when(added)}")


@schedule_app.command("list")
def schedule_list(store: StoreOpt = None) -> None:
    """Schedules with their next fire time and their last run's state."""
    from pipelines.schedule import schedule

    with reported(SpecError):
        found, skipped = schedule.read_schedules(store)
    for line in skipped:
        err.print(f"warning: {line}", markup=False, highlight=False)
    if not found:
        out.print("no schedules")
        return
    last = schedule.last_runs([s.id for s in found])
    table = Table("id", "pipeline", "schedule", "next fire", "last run", "state", "run id", title="schedules")
    for s in found:
        ran, state, run_id = last.get(s.id, (None, "", ""))
        row = (s.id, s.spec, s.trigger, schedule.when(s), when(ran) if ran else "never", state, run_id)
        table.add_row(*(escape(cell) for cell in row))  # a path's [brackets] are not markup
    out.print(table)


@schedule_app.command("remove")
def schedule_remove(schedule_id: Annotated[str, typer.Argument(help="The schedule's id.")], store: StoreOpt = None):
    """Remove a schedule (runs already recorded stay in MLflow)."""
    from pipelines.schedule import schedule

    with reported(SpecError):
        schedule.remove(schedule_id, store)
    out.print(f"schedule {schedule_id} removed")


@schedule_app.command("export")
def schedule_export(
    format_: Annotated[str, typer.Option("--format", help="crontab or systemd.")] = "crontab",
    store: StoreOpt = None,
) -> None:
    """Print the schedules as crontab lines or systemd units that call `labbook run`."""
    from pipelines.schedule import schedule, schedule_export

    if format_ not in ("crontab", "systemd"):
        raise fail(f"--format: got {format_!r}; expected crontab or systemd")
    with reported(SpecError):
        found, skipped = schedule.read_schedules(store)
    for line in skipped:
        err.print(f"warning: {line}", markup=False, highlight=False)
    text = schedule_export.crontab(found) if format_ == "crontab" else schedule_export.systemd(found)
    print(text, end="")


@app.command()
def scheduler(store: StoreOpt = None) -> None:
    """Run due pipelines until SIGTERM or Ctrl-C (a foreground service; see README)."""
    import logging

    from pipelines.schedule import schedule

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout, force=True)
    logging.getLogger("apscheduler").setLevel(logging.ERROR)  # its own lines repeat ours
    with reported(SpecError):
        code = schedule.serve(store)
    raise typer.Exit(code)
