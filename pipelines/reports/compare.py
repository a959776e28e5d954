"""Compare runs as a pandas DataFrame built from `mlflow.search_runs`.

Importable for notebooks (`from pipelines.reports.compare import compare`) and behind
`labbook compare`. One row per run: run id and name, state, duration, every parameter and
final metric under its own name (`lr`, `val_acc`), sorted by the metric you name.
"""

from __future__ import annotations

from typing import Literal

import mlflow
import pandas as pd

from pipelines.errors import listing
from pipelines.specs.spec_io import shown
from pipelines.tracking import tracking
from pipelines.tracking.tags import Tag

Format = Literal["table", "csv", "markdown", "html"]
LOWER_IS_BETTER = ("loss", "mse", "mae", "perplexity", "error")


def lower_is_better(metric: str) -> bool:
    return metric.endswith(LOWER_IS_BETTER)


def compare(
    experiment: str | None = None,
    study: str | None = None,
    pipeline_run: str | None = None,
    metric: str | None = None,
    top: int | None = None,
    ascending: bool | None = None,
) -> pd.DataFrame:
    """Runs of an experiment, a study's trials or a pipeline run's steps, best first by `metric`.

    With no filter: every run of every experiment in the store. A study's own parent run is
    left out (its trials are the rows); `ascending` defaults to True for losses and errors.
    """
    uri = tracking.tracking_uri()
    mlflow.set_tracking_uri(uri)
    filters = []
    if study:
        filters.append(f"tags.`{Tag.STUDY_NAME}` = {tracking.literal(study)}")
    if pipeline_run:
        filters.append(f"tags.`mlflow.parentRunId` = {tracking.literal(pipeline_run)}")
    names = [experiment] if experiment else None
    if experiment and tracking.client(uri).get_experiment_by_name(experiment) is None:
        raise ValueError(f"--experiment: no experiment named {experiment!r} in {uri}")
    if metric and top:  # the K best: sorted and cut by the store, not by fetching every run
        best = _top_runs(names, " and ".join(filters), metric, top, ascending, study)
        if best is not None:
            return best
    runs = mlflow.search_runs(
        experiment_names=names, search_all_experiments=names is None, filter_string=" and ".join(filters)
    )
    if runs.empty:
        return runs
    kind = runs.get(f"tags.{Tag.KIND}")
    if study and kind is not None:
        runs = runs[kind.fillna("") != "study"]
    frame = _tidy(runs)
    if metric:
        if metric not in frame.columns:
            known = sorted(c for c in frame.columns if c.startswith(("train_", "val_", "test_")))
            raise ValueError(f"--metric: no metric {shown(metric)} in these runs; known: {listing(known, metric)}")
        frame = frame.sort_values(  # stable: ties stay newest first, as MLflow lists runs and orders `--top`
            metric,
            ascending=lower_is_better(metric) if ascending is None else ascending,
            na_position="last",
            kind="stable",
        )
    frame = frame.reset_index(drop=True)
    return frame.head(top) if top else frame


def _top_runs(
    names: list[str] | None, filters: str, metric: str, top: int, ascending: bool | None, study: str | None
) -> pd.DataFrame | None:
    """The `top` runs best by `metric`, ordered and limited by the store (MLflow's `order_by`,
    NaN and missing values last, as pandas sorts them); None when no run returned has the metric
    or fewer than `top` runs have a value (the caller then ranks every run, as without `top`).

    Measured (bench/growth.py): fetching every run to keep 10 took `labbook compare --top 10`
    from ~13 s on 50 runs to ~47 s on 10,000 (MLflow builds each run's params, tags and metrics).
    One more row than asked: a study's own parent run is dropped from its trials.
    """
    asc = lower_is_better(metric) if ascending is None else ascending
    runs = mlflow.search_runs(
        experiment_names=names,
        search_all_experiments=names is None,
        filter_string=filters,
        order_by=[f"metrics.`{metric}` {'ASC' if asc else 'DESC'}"],
        max_results=top + 1,
    )
    if runs.empty or f"metrics.{metric}" not in runs.columns:
        return None
    kind = runs.get(f"tags.{tracking.TAG_PREFIX}kind")
    if study and kind is not None:
        runs = runs[kind.fillna("") != "study"]
    frame = _tidy(runs)
    if metric not in frame.columns or frame[metric].head(top).isna().any():
        return None  # fewer than `top` runs have a value: NaN and missing then order as in the whole ranking
    frame = frame.sort_values(metric, ascending=asc, na_position="last", kind="stable")
    return frame.reset_index(drop=True).head(top)


def _tidy(runs: pd.DataFrame) -> pd.DataFrame:
    """Rename MLflow's `params.lr` / `metrics.val_acc` columns to the names used everywhere else."""
    frame = pd.DataFrame(
        {
            "run_id": runs["run_id"],
            "run_name": runs.get("tags.mlflow.runName"),
            "state": runs["status"],
            "trial_state": runs.get(f"tags.{Tag.TRIAL_STATE}"),
            "duration_s": _duration(runs),
        }
    )
    params = {c.removeprefix("params."): _numeric(runs[c]) for c in runs.columns if c.startswith("params.")}
    metrics = {c.removeprefix("metrics."): runs[c] for c in runs.columns if c.startswith("metrics.")}
    frame = pd.concat([frame, pd.DataFrame(params), pd.DataFrame(metrics)], axis=1).dropna(axis=1, how="all")
    frame.attrs["params"] = [c for c in params if c in frame]
    frame.attrs["metrics"] = [c for c in metrics if c in frame]
    return frame


def _duration(runs: pd.DataFrame) -> pd.Series:
    """Seconds from start to end; empty (NaN) for a run not ended. When no run has ended, MLflow's
    `end_time` column holds no timestamps at all (tz-naive), and subtracting the tz-aware
    `start_time` from it raised TypeError: both are read as UTC here."""
    end = pd.to_datetime(runs["end_time"], utc=True)
    start = pd.to_datetime(runs["start_time"], utc=True)
    return (end - start).dt.total_seconds().round(1)


def _numeric(column: pd.Series) -> pd.Series:
    """MLflow keeps params as text; `lr` should sort and print as a number."""
    try:
        return pd.to_numeric(column)
    except (ValueError, TypeError):
        return column


def varying_columns(frame: pd.DataFrame, metric: str | None = None, max_params: int = 5) -> list[str]:
    """What a person wants to see first: name, state, the params that differ, the metrics that matter."""
    fixed = ["run_name", "trial_state" if "trial_state" in frame else "state"]
    params = [c for c in frame.attrs.get("params", []) if frame[c].astype(str).nunique() > 1][:max_params]
    split_metrics = [c for c in frame.attrs.get("metrics", []) if c.startswith(("val_", "test_"))]
    family = metric.split("_", 1)[1] if metric and "_" in metric else None
    others = [c for c in split_metrics if c != metric and (family is None or c.endswith(f"_{family}"))]
    return [
        c for c in fixed + params + ([metric] if metric else []) + others[:2] + ["duration_s", "run_id"] if c in frame
    ]


def render(frame: pd.DataFrame, fmt: Format) -> str:
    """The DataFrame as CSV, Markdown or a standalone HTML table."""
    if fmt == "csv":
        return frame.to_csv(index=False)
    if fmt == "markdown":
        return frame.to_markdown(index=False)
    if fmt == "html":
        return frame.to_html(index=False, na_rep="", border=0)
    raise ValueError(f"--format: {fmt!r} is not one of table, csv, markdown, html")
