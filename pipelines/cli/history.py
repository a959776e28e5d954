"""`labbook compare`, `rerun` and `diff`: recorded runs read back, compared, executed again."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from pipelines.cli.common import (
    app,
    cell,
    close_dead_runs,
    err,
    fail,
    out,
    reported,
    stop_on_sigterm,
)


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
    from pipelines.reports.compare import compare as compare_runs
    from pipelines.reports.compare import render, varying_columns

    if format_ not in ("table", "csv", "markdown", "html"):
        raise fail(f"--format: got {format_!r}; expected one of table, csv, markdown, html")
    if format_ == "table" and output is not None:
        raise fail("--output needs --format csv, markdown or html")
    close_dead_runs()
    with reported(ValueError):
        frame = compare_runs(experiment, study, pipeline_run, metric, top)
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
        table.add_row(*("" if value is None or value != value else cell(value) for value in row))
    out.print(table)


@app.command()
def rerun(
    run_id: Annotated[str, typer.Argument(help="The MLflow run to execute again.")],
    tolerance: Annotated[float, typer.Option(min=0, help="Largest metric difference still called a match.")] = 0.0,
) -> None:
    """Execute a run again from its record and compare every final metric, old vs new."""
    from mlflow.exceptions import MlflowException

    from pipelines.execution.rerun import rerun as rerun_run

    stop_on_sigterm()
    with reported(ValueError, MlflowException, squash=True, interrupts="the same command executes the run again"):
        done = rerun_run(run_id, tolerance)
    for name, (old, new) in done.changed.items():
        err.print(f"warning: {name} differs: {old or '-'} then, {new or '-'} now", markup=False)
    table = Table("metric", "old", "new", "diff", title=f"rerun of {run_id} → {done.result.run_id}")
    for _, row in done.metrics.iterrows():
        table.add_row(row["metric"], cell(row["old"]), cell(row["new"]), f"{row['diff']:+.3g}")
    out.print(table)
    out.print(f"verdict: {done.verdict}" + (f" (tolerance {tolerance:g})" if tolerance else ""))
    if done.verdict in ("differs", "failed"):
        raise fail(done.result.error or "the rerun did not reproduce the run", code=1)


@app.command()
def diff(
    run_a: Annotated[str, typer.Argument(help="A run id, e.g. the best trial.")],
    run_b: Annotated[str, typer.Argument(help="Another run id, e.g. the runner-up.")],
) -> None:
    """What differs between two runs: parameters, final metrics, provenance, notebook cells."""
    from mlflow.exceptions import MlflowException

    from pipelines.reports.diff import diff as diff_runs

    with reported(ValueError, MlflowException, squash=True):
        found = diff_runs(run_a, run_b)
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
            table.add_row(*("" if v is None or v != v else cell(v) for v in row))
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
    from pipelines.execution.reap import reap as reap_runs
    from pipelines.tracking.driver import heartbeat_seconds
    from pipelines.tracking.tracking import redact, store_problem, tracking_uri

    try:
        heartbeat_seconds()
        found = reap_runs(dry_run=dry_run)
    except ValueError as exc:
        raise fail(str(exc)) from None
    except Exception as exc:
        raise fail(store_problem(exc) or f"{redact(tracking_uri())}: {type(exc).__name__}", code=1) from None
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
