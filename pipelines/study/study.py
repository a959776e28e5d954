"""Optuna glue: storage, sampler, pruner, and what counts against a study's budget.

The embedded default storage is SQLite at `mlruns/optuna.db`: one URL that `optuna studies
--storage` and `optuna-dashboard` open unchanged, and Optuna's heartbeats (so a trial left
RUNNING by a dead worker is failed and retried) work on it. `--storage postgresql://...`, a
spec's `tune.storage` or `LABBOOK_OPTUNA_STORAGE` replace it with no other change.
"""

from __future__ import annotations

import os
import random
import time
import warnings
import zlib
from collections.abc import Callable

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from pipelines.specs.tune_spec import PrunerSpec, SamplerSpec
from pipelines.tracking import tracking
from pipelines.tracking.tags import Attr

STORAGE_ENV = "LABBOOK_OPTUNA_STORAGE"
HEARTBEAT_ENV = "LABBOOK_HEARTBEAT_SECONDS"
HEARTBEAT_SECONDS = 10  # a worker silent for 3 intervals is dead: its trial is failed and retried


def storage_url(explicit: str | None = None) -> str:
    """`--storage`/spec, else `LABBOOK_OPTUNA_STORAGE`, else SQLite under `./mlruns/`."""
    if explicit:
        return explicit
    if os.environ.get(STORAGE_ENV):
        return os.environ[STORAGE_ENV]
    return f"sqlite:///{tracking.default_store() / 'optuna.db'}"


def heartbeat_seconds() -> int:
    """`LABBOOK_HEARTBEAT_SECONDS`, else 10: how often a worker tells the storage it is alive."""
    value = os.environ.get(HEARTBEAT_ENV, "").strip()
    if not value:
        return HEARTBEAT_SECONDS
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{HEARTBEAT_ENV}: expected a whole number of seconds >= 1, got {value!r}")
    return int(value)


def storage(url: str, heartbeat: bool = False) -> RDBStorage:
    """An RDB storage; workers turn heartbeats on, a kernel reporting values does not."""
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    if not heartbeat:
        return _created(lambda: RDBStorage(url, engine_kwargs=engine_kwargs))
    interval = heartbeat_seconds()
    return _created(
        lambda: RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=interval,
            grace_period=3 * interval,
            heartbeat_stale_trial_callback=_retry_and_close_run,
        )
    )


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
    if not run_id:
        return
    mlflow = tracking.client()
    try:
        if mlflow.get_run(run_id).info.status == "RUNNING":
            reason = f"worker {trial.user_attrs.get('worker', '?')} died (no heartbeat); trial retried"
            tracking.finish_run(mlflow, run_id, reason)
    except Exception as exc:  # the study's bookkeeping matters more than the run's status
        optuna.logging.get_logger(__name__).warning(f"could not close run {run_id} of trial {trial.number}: {exc}")


def sampler(spec: SamplerSpec, worker: str | None = None) -> optuna.samplers.BaseSampler:
    """The spec's sampler; in a joined worker process (`worker` names it), seeded apart.

    Each process samples with its own generator: with one seed for all, every worker drew the
    same random start-up points, so 2 workers ran each parameter set twice. The study's own
    process keeps the spec's seed, so a one-worker study is reproducible.
    """
    seed = spec.seed
    if seed is not None and worker is not None:
        seed = (seed + zlib.crc32(worker.encode())) % 2**32
    startup = {} if spec.n_startup_trials is None else {"n_startup_trials": spec.n_startup_trials}
    if spec.name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, **startup)
    if spec.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.name == "gp":
        return optuna.samplers.GPSampler(seed=seed, **startup)
    return optuna.samplers.CmaEsSampler(seed=seed, **startup)


def pruner(spec: PrunerSpec) -> optuna.pruners.BasePruner:
    if spec.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=spec.n_startup_trials, n_warmup_steps=spec.n_warmup_steps)
    if spec.name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=spec.min_resource, reduction_factor=spec.reduction_factor
        )
    if spec.name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=1 if spec.min_resource == "auto" else spec.min_resource, reduction_factor=spec.reduction_factor
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
