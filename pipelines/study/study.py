"""Optuna glue: storage, sampler, pruner, and what counts against a study's budget.

The embedded default storage is SQLite at `mlruns/optuna.db`: one URL that `optuna studies
--storage` and `optuna-dashboard` open unchanged, and Optuna's heartbeats (so a trial left
RUNNING by a dead worker is failed and retried) work on it. `--storage postgresql://...`, a
spec's `tune.storage` or `LABBOOK_OPTUNA_STORAGE` replace it with no other change.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
import warnings
from collections.abc import Callable, Container, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from pipelines.specs.tune_spec import PrunerSpec, SamplerSpec
from pipelines.study.guarded_sampler import GuardedSampler
from pipelines.tracking import tracking
from pipelines.tracking.tags import Attr, Tag

STORAGE_ENV = "LABBOOK_OPTUNA_STORAGE"


def storage_url(explicit: str | None = None) -> str:
    """`--storage`/spec, else `LABBOOK_OPTUNA_STORAGE`, else SQLite under `./mlruns/`.

    A SQLite file's folder is made, as the MLflow store's is (Optuna would fail on a missing one).
    """
    from pipelines.specs.environment import database_url

    if explicit:
        # A study's worker processes get it redacted on their command line (which every local
        # user can read) and the password in their environment (`tracking.share_with_kernels`).
        url = database_url(tracking.reveal(explicit, "--storage"), "--storage / tune.storage")
    elif os.environ.get(STORAGE_ENV):
        url = database_url(os.environ[STORAGE_ENV], STORAGE_ENV)
    else:
        return f"sqlite:///{tracking.default_store() / 'optuna.db'}"
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        with contextlib.suppress(OSError):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    tracking.share_with_kernels(url)  # trials' notebooks get it redacted (`tracking.notebook_parameter`)
    return url


def heartbeat_seconds() -> int:
    """`LABBOOK_HEARTBEAT_SECONDS`, else 10: how often a worker tells the storage it is alive.

    A worker silent for 3 intervals is dead: its trial is failed and retried.
    """
    from pipelines.specs import environment

    return environment.heartbeat_seconds()


def _engine_kwargs(url: str) -> dict[str, Any]:
    return {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}


def storage(url: str, heartbeat: bool = False) -> RDBStorage:
    """An RDB storage; workers turn heartbeats on, a kernel reporting values does not."""
    engine_kwargs = _engine_kwargs(url)
    if not heartbeat:
        return _created(lambda: RDBStorage(url, engine_kwargs=engine_kwargs))
    interval = heartbeat_seconds()
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since 2.9; we rely on them
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _created(
            lambda: RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=interval,
                grace_period=3 * interval,
                heartbeat_stale_trial_callback=_retry_and_close_run,
            )
        )


def pruning_storage(url: str) -> RDBStorage:
    """The storage a trial's kernel reports to and prunes from: Optuna's RDBStorage, reading less.

    Every write (intermediate values, the pruners' system attrs) and every read of one trial is
    Optuna's own; only the list of a study's trials, which the pruners read, is built lighter
    (see `_PrunerTrialsStorage`), so that a fresh kernel's first `should_prune` does not cost
    more as the study grows. No heartbeats: the worker that runs the kernel sends them.
    """
    return _created(lambda: _PrunerTrialsStorage(url, engine_kwargs=_engine_kwargs(url)))


class _PrunerTrialsStorage(RDBStorage):
    """An RDBStorage whose lists of trials carry what Optuna's pruners read, and nothing else.

    A kernel is a fresh process per trial, so its `_CachedStorage` (what `optuna.load_study`
    wraps an RDBStorage in) starts empty, and the pruner's first `study.get_trials` loads every
    trial of the study through `RDBStorage._get_trials`: one ORM object per row of five tables
    (about 13 per 8-epoch trial) and every parameter's distribution JSON decoded. Measured with
    bench/growth.py's kernel side: 0.2-0.7 s at trial 1,000 on a quiet 2-core machine, over 2 s
    under load, paid again by every trial: a study quadratic in its size. Optuna has no lighter
    read, hence this one, written by hand with SQLAlchemy Core on Optuna's own table models.

    What Optuna's pruners read of the other trials (median/percentile, successive halving,
    hyperband, threshold, patient, wilcoxon): number, state, values, intermediate values and
    system attrs (successive halving's rungs; hyperband's bracket is a hash of the number).
    Those are here, exactly as Optuna builds them; params, distributions, user attrs and the
    datetimes are left empty (a trial's kernel has no use for the other trials' parameters).
    `get_trial` (the kernel's own trial: `Trial.params`, `user_attrs`) stays Optuna's, full.

    The rows are selected with the filter `RDBStorage._get_trials` applies (the contract
    `_CachedStorage` relies on for its incremental reads: unfinished trials it holds, and every
    trial newer than the last finished one it has), so Optuna's own cache still takes in,
    at every `should_prune`, the trials other workers finished since. Like Optuna's query (one
    SELECT per table), each table is read in its own statement: a trial seen finished has all its
    rows written (Optuna writes them before its state), and an unfinished one is read again.
    """

    def _get_trials(
        self,
        study_id: int,
        states: Container[TrialState] | None,
        included_trial_ids: set[int],
        trial_id_greater_than: int,
    ) -> list[FrozenTrial]:
        import json

        import sqlalchemy as sa
        from optuna.storages._rdb import models

        trials = models.TrialModel.__table__
        where = [trials.c.study_id == study_id]
        if states is not None:
            where.append(trials.c.state.in_(list(states)))
        included = {i for i in included_trial_ids if i <= trial_id_greater_than}
        if included and trial_id_greater_than > -1:
            where.append(sa.or_(trials.c.trial_id.in_(included), trials.c.trial_id > trial_id_greater_than))
        elif trial_id_greater_than > -1:
            where.append(trials.c.trial_id > trial_id_greater_than)

        def rows(table: Any, *columns: str) -> Any:
            """`columns` of `table`'s rows that belong to the selected trials."""
            query = sa.select(*(table.c[c] for c in columns)).join(trials, table.c.trial_id == trials.c.trial_id)
            return connection.execute(query.where(*where)).all()

        with self.engine.connect() as connection:
            studies = models.StudyModel.__table__
            if connection.execute(sa.select(studies.c.study_id).where(studies.c.study_id == study_id)).first() is None:
                raise KeyError(f"No study with study_id {study_id} exists.")  # as Optuna's _get_trials
            found = connection.execute(
                sa.select(trials.c.trial_id, trials.c.number, trials.c.state).where(*where).order_by(trials.c.trial_id)
            ).all()
            values: dict[int, dict[int, float]] = {}
            value_model = models.TrialValueModel
            for trial_id, objective, value, kind in rows(
                value_model.__table__, "trial_id", "objective", "value", "value_type"
            ):
                values.setdefault(trial_id, {})[objective] = value_model.stored_repr_to_value(value, kind)
            intermediate: dict[int, dict[int, float]] = {}
            step_model = models.TrialIntermediateValueModel
            for trial_id, step, value, kind in rows(
                step_model.__table__, "trial_id", "step", "intermediate_value", "intermediate_value_type"
            ):
                intermediate.setdefault(trial_id, {})[step] = step_model.stored_repr_to_intermediate_value(value, kind)
            system: dict[int, dict[str, Any]] = {}
            for trial_id, key, value_json in rows(
                models.TrialSystemAttributeModel.__table__, "trial_id", "key", "value_json"
            ):
                system.setdefault(trial_id, {})[key] = json.loads(value_json)
        return [
            FrozenTrial(
                number=number,
                state=state,
                value=None,
                values=[v for _, v in sorted(values[trial_id].items())] if trial_id in values else None,
                datetime_start=None,
                datetime_complete=None,
                params={},
                distributions={},
                user_attrs={},
                system_attrs=system.get(trial_id, {}),
                intermediate_values=intermediate.get(trial_id, {}),
                trial_id=trial_id,
            )
            for trial_id, number, state in found
        ]


def _created(make: Callable[[], RDBStorage], attempts: int = 10) -> RDBStorage:
    """`make()`, again if another worker was creating the same empty database's tables.

    RDBStorage creates its schema on first use; two workers started together on a new
    PostgreSQL database race to `CREATE TABLE` and one gets a duplicate error. The loser's
    retry finds the tables made and goes on (Optuna has no lock of its own for this).
    """
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    for attempt in range(attempts):
        try:
            return make()
        except (IntegrityError, ProgrammingError, OperationalError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 + random.random())
    raise AssertionError("unreachable")


with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since 2.9; we rely on them
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    _retry = RetryHeartbeatStaleTrialCallback(max_retry=2)


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail (and retry) trials whose worker stopped sending heartbeats."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _retry_and_close_run(study: optuna.Study, trial: FrozenTrial) -> None:
    """A dead worker's trial: retried as a new trial, and its MLflow run closed as FAILED.

    Whichever live worker notices the silent heartbeat runs this; the dead one cannot.
    """
    _retry(study, trial)
    run_id = trial.user_attrs.get(Attr.RUN_ID)
    if run_id:
        reason = f"worker {trial.user_attrs.get(Attr.WORKER, '?')} died (no heartbeat); trial retried"
        fail_run(run_id, trial.number, reason)


def fail_run(run_id: str, number: int, reason: str) -> None:
    """The MLflow run of a trial Optuna holds FAIL: FAILED, `labbook.trial_state=FAIL`, with the reason.

    A run already saying so keeps its own reason. Never raises: the study's bookkeeping matters
    more than the run's record, which the next resume reconciles again.
    """
    mlflow = tracking.client()
    try:
        run = mlflow.get_run(run_id)
        if run.info.status == "FAILED" and run.data.tags.get(Tag.TRIAL_STATE) == "FAIL":
            return
        if run.info.status != "FAILED":
            tracking.finish_run(mlflow, run_id, reason)
        mlflow.set_tag(run_id, Tag.TRIAL_STATE, "FAIL")
    except Exception as exc:  # noqa: BLE001
        optuna.logging.get_logger(__name__).warning(f"could not close run {run_id} of trial {number}: {exc}")


def reconcile_runs(study: optuna.Study) -> None:
    """Every FAIL trial's MLflow run made to say FAIL too (a driver killed between the two writes,
    or a run another process closed FINISHED): the record agrees with Optuna."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        run_id = trial.user_attrs.get(Attr.RUN_ID)
        if run_id:
            reason = trial.user_attrs.get(Attr.ERROR) or "the trial failed (Optuna holds it FAIL)"
            fail_run(run_id, trial.number, str(reason))


def sampler(spec: SamplerSpec) -> optuna.samplers.BaseSampler:
    """The spec's sampler; with a seed, every trial samples from a seed of its own (see `_SeedPerTrial`)."""
    startup = {} if spec.n_startup_trials is None else {"n_startup_trials": spec.n_startup_trials}

    def make(seed: int | None) -> optuna.samplers.BaseSampler:
        if spec.name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, **startup)
        if spec.name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if spec.name == "gp":
            return optuna.samplers.GPSampler(seed=seed, **startup)
        return optuna.samplers.CmaEsSampler(seed=seed, **startup)

    # Guarded: a sampler's exception fails its trial with the reason, never the whole study.
    return GuardedSampler(make(None) if spec.seed is None else _SeedPerTrial(make, spec.seed))


def trial_seed(seed: int, number: int) -> int:
    """The sampler seed of trial `number` of a study seeded `seed` (numpy's SeedSequence: independent streams)."""
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


class _SeedPerTrial(optuna.samplers.BaseSampler):
    """A sampler made afresh for each trial, seeded from (the spec's seed, the trial's number).

    Every process that runs trials of a study (`labbook tune` twice, `labbook worker`, `--workers`)
    loads the study with the spec's seed. A sampler seeded once per process draws the same random
    sequence in each: two drivers started at once ran each parameter set twice. Trial numbers are
    unique in a study, so seeding per trial keeps the processes apart, and a study's trial n draws
    from the same seed however many processes ran it (reproducible with one). The samplers keep
    their state in the study (TPE, GP and CMA-ES read the trials, CMA-ES its generation too), so
    a fresh one per trial loses nothing but caches.
    """

    def __init__(self, make: Callable[[int | None], optuna.samplers.BaseSampler], seed: int) -> None:
        self._make = make
        self._seed = seed
        self._number: int | None = None
        self._sampler = make(seed)

    def _for(self, trial: FrozenTrial) -> optuna.samplers.BaseSampler:
        if trial.number != self._number:
            self._number = trial.number
            self._sampler = self._make(trial_seed(self._seed, trial.number))
        return self._sampler

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._for(trial).before_trial(study, trial)

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, optuna.distributions.BaseDistribution]:
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, optuna.distributions.BaseDistribution]
    ) -> dict[str, Any]:
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: optuna.distributions.BaseDistribution,
    ) -> Any:
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        self._for(trial).after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._sampler.reseed_rng()


# A study's steps count epochs trained: a value reported after the first epoch is step 1. Optuna's
# pruners read steps as the resource a trial has used (successive halving and Hyperband cut at
# min_resource × factor^k; the median pruner waits n_warmup_steps), so `min_resource: 1` cuts
# after one epoch, as `tune.pruner` says. optuna-integration's Lightning callback reports
# Lightning's 0-based epoch instead, which put every cut one epoch late (R5 in bench/overhead.py:
# 3.2× → 4.2× fewer epochs at the same best value). Studies created before keep their 0-based
# steps (no `Attr.PRUNING_STEP`), so no study mixes the two.
EPOCHS_TRAINED = "epochs_trained"


class EpochsTrainedTrial:
    """An `optuna.Trial` whose reported step is the number of epochs trained (`step + 1`).

    Wraps the trial handed to optuna-integration's `PyTorchLightningPruningCallback`, which reports
    `current_epoch`; everything else (should_prune, the storage its DDP path writes to) is the
    trial's own. A step it re-reports after DDP (`check_pruned`) maps to the same step again.
    """

    def __init__(self, trial: optuna.Trial) -> None:
        self._trial = trial

    def __getattr__(self, name: str) -> Any:
        return getattr(self._trial, name)

    def report(self, value: float, step: int) -> None:
        self._trial.report(value, step + 1)


def counts_epochs_trained(study: optuna.Study) -> bool:
    """Whether `study`'s steps count epochs trained (`mark_steps`), not Lightning's 0-based epoch."""
    return study.user_attrs.get(Attr.PRUNING_STEP) == EPOCHS_TRAINED


def pruning_trial(study: optuna.Study, trial: optuna.Trial) -> Any:
    """`trial` as the pruning callback should report to it: in epochs trained where `study` counts so."""
    return EpochsTrainedTrial(trial) if counts_epochs_trained(study) else trial


def mark_steps(study: optuna.Study) -> None:
    """Record that `study`'s steps count epochs trained, unless it already has trials (older
    studies keep the 0-based steps their trials were reported with)."""
    if Attr.PRUNING_STEP not in study.user_attrs and not study.get_trials(deepcopy=False):
        study.set_user_attr(Attr.PRUNING_STEP, EPOCHS_TRAINED)


def pruner(spec: PrunerSpec, max_resource: int | None = None) -> optuna.pruners.BasePruner:
    """Optuna's pruner for `spec`. `max_resource`: Hyperband's most epochs a trial trains, where
    steps count epochs trained (Optuna's "auto" reads it as the last step + 1, which assumes
    0-based steps and would add a bracket whose first rung no trial reaches)."""
    if spec.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=spec.n_startup_trials, n_warmup_steps=spec.n_warmup_steps)
    if spec.name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=spec.min_resource, reduction_factor=spec.reduction_factor
        )
    if spec.name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=1 if spec.min_resource == "auto" else spec.min_resource,
            max_resource=max_resource or "auto",
            reduction_factor=spec.reduction_factor,
        )
    return optuna.pruners.NopPruner()


def budget_used(trials: list[FrozenTrial], before: int | None = None) -> int:
    """Trials that count against `n_trials`: finished, running, or failed by their own doing.

    A trial failed by a dead worker's missing heartbeat is retried as a new trial, and one cut
    short by Ctrl-C/SIGTERM is run again on resume: neither should cost the user a trial. Nor
    does one that was never run because the budget was gone. `before`: count only the trials
    numbered below it.
    """
    retried = {t.system_attrs.get("failed_trial") for t in trials} - {None}
    counted = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)

    def counts_against(t: FrozenTrial) -> bool:
        if before is not None and t.number >= before:
            return False
        if t.state in counted:
            return True
        return t.state == TrialState.FAIL and t.number not in retried and not _not_run(t)

    return sum(1 for t in trials if counts_against(t))


def over_budget(trials: list[FrozenTrial], number: int, n_trials: int) -> bool:
    """Whether trial `number` is one too many: the trials numbered before it use the whole budget.

    A worker checks the budget before asking Optuna for its next trial, but two workers can pass
    that check at once and both create one (Optuna's MaxTrialsCallback has the same race; four
    workers on one SQLite store ran 21 trials of 20). The storage numbers trials in the order it
    creates them, so the lower number runs and the other is dropped unrun.
    """
    return budget_used(trials, before=number) >= n_trials


def _not_run(t: FrozenTrial) -> bool:
    return bool(t.user_attrs.get(Attr.INTERRUPTED) or t.user_attrs.get(Attr.OVER_BUDGET))


def counts(trials: list[FrozenTrial]) -> dict[str, int]:
    """How many trials are in each state, by Optuna's state names."""
    found = {state.name: 0 for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)}
    for t in trials:
        if t.state.name in found and not t.user_attrs.get(Attr.OVER_BUDGET):
            found[t.state.name] += 1
    return found
