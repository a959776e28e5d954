"""A sampler wrapper under which a sampler's exception fails one trial, never the study.

Optuna runs a sampler in two places: relative sampling while `study.ask()` creates the trial
(outside the objective, so an exception there ends `study.optimize` with a traceback), and
independent sampling inside `trial.suggest_*` (inside the objective). This wrapper keeps a
relative-sampling error until the trial's first `suggest_*`, where it is raised as
`SamplerFailed` in the objective, which fails that trial with its reason and goes on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState


class SamplerFailed(Exception):
    """The study's sampler raised while choosing this trial's parameters."""


def _reason(exc: BaseException) -> str:
    return f"sampler failed: {type(exc).__name__}: {str(exc)[:300]}"


class GuardedSampler(BaseSampler):
    """Delegates to `inner`; its exceptions become one trial's `SamplerFailed`."""

    def __init__(self, inner: BaseSampler) -> None:
        self.inner = inner
        self._errors: dict[int, str] = {}  # trial id → why its relative sampling failed

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        try:
            return self.inner.infer_relative_search_space(study, trial)
        except Exception as exc:  # noqa: BLE001 - any sampler bug fails this trial only
            self._errors[trial._trial_id] = _reason(exc)
            return {}

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if trial._trial_id in self._errors:
            return {}
        try:
            return self.inner.sample_relative(study, trial, search_space)
        except Exception as exc:  # noqa: BLE001
            self._errors[trial._trial_id] = _reason(exc)
            return {}

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        error = self._errors.pop(trial._trial_id, None)
        if error is not None:
            raise SamplerFailed(error)
        try:
            return self.inner.sample_independent(study, trial, param_name, param_distribution)
        except Exception as exc:
            raise SamplerFailed(_reason(exc)) from exc

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        try:
            self.inner.before_trial(study, trial)
        except Exception as exc:  # noqa: BLE001
            self._errors[trial._trial_id] = _reason(exc)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        self._errors.pop(trial._trial_id, None)
        try:
            self.inner.after_trial(study, trial, state, values)
        except Exception as exc:  # noqa: BLE001 - the trial is over; its sampler's bookkeeping is not worth the study
            optuna.logging.get_logger(__name__).warning(f"trial {trial.number}: {_reason(exc)}")

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()
