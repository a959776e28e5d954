"""Seed-robust selection: re-run the best configurations with fresh seeds, choose by the mean.

The best trial of a study is often a lucky seed. `labbook tune --confirm-top K --seeds S`
re-runs the K best configurations S times each (seeds spec seed + 1 … + S, as notebook runs
nested under the study's parent run) and reports mean ± 95% interval (Student t) per
configuration; the champion is then the best by mean, not by one draw.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd
from optuna.trial import FrozenTrial, TrialState
from scipy import stats

from pipelines.execution.run import RunResult
from pipelines.tracking.tags import Tag


@dataclass(frozen=True)
class Confirmed:
    trial: int
    params: dict[str, Any]
    values: list[float]
    run_ids: list[str]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def ci95(self) -> float:
        """Half-width of the 95% interval of the mean (0 with a single value)."""
        if len(self.values) < 2:
            return 0.0
        return (
            float(stats.t.ppf(0.975, len(self.values) - 1))
            * statistics.stdev(self.values)
            / math.sqrt(len(self.values))
        )


def top_trials(trials: list[FrozenTrial], k: int, direction: str) -> list[FrozenTrial]:
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    return sorted(complete, key=lambda t: t.value, reverse=direction == "maximize")[:k]


def confirm(
    trials: list[FrozenTrial],
    k: int,
    seeds: list[int],
    direction: str,
    run_one: Callable[[FrozenTrial, int], tuple[RunResult, float | None]],
) -> list[Confirmed]:
    """Run each of the top-k trials' configurations once per seed; best mean first."""
    confirmed = []
    for trial in top_trials(trials, k, direction):
        values, run_ids = [], []
        for seed in seeds:
            result, value = run_one(trial, seed)
            run_ids.append(result.run_id)
            if value is not None:
                values.append(value)
        if values:
            confirmed.append(Confirmed(trial.number, dict(trial.params), values, run_ids))
    return sorted(confirmed, key=lambda c: c.mean, reverse=direction == "maximize")


def table(confirmed: list[Confirmed]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "trial": c.trial,
                **c.params,
                "mean": c.mean,
                "ci95": c.ci95,
                "n_seeds": len(c.values),
                "values": ", ".join(f"{v:.4f}" for v in c.values),
            }
            for c in confirmed
        ]
    )


def log_to_parent(mlflow: Any, parent: str, confirmed: list[Confirmed], metric: str) -> None:
    for c in confirmed:
        mlflow.log_metric(parent, f"confirm_trial{c.trial}_{metric}_mean", c.mean)
        mlflow.log_metric(parent, f"confirm_trial{c.trial}_{metric}_ci95", c.ci95)
    if confirmed:
        mlflow.set_tag(parent, Tag.BEST_BY_MEAN_TRIAL, str(confirmed[0].trial))
