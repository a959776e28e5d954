"""A trial's kernel prunes exactly as Optuna's own pruner would, from a storage that reads less.

`in_notebook.pruning_callback` rebuilds the trial on `study.pruning_storage`, whose lists of
trials carry only what Optuna's pruners read (bench/growth.py: a fresh kernel loading every trial
in full made a study quadratic in its size). These tests hold it to Optuna: the same trial lists
in what the pruners read, the same decision at every epoch for every pruner labbook builds, and
trials other workers finish after the kernel's cache was filled still counted.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from pipelines.nb import in_notebook
from pipelines.specs.tune_spec import PrunerSpec
from pipelines.study import study
from pipelines.tracking.tags import Attr

pytestmark = pytest.mark.fast
optuna.logging.set_verbosity(optuna.logging.ERROR)

NAME = "pruning"
EPOCHS = 6
PRUNERS = [
    {"name": "median", "n_startup_trials": 3, "n_warmup_steps": 2},
    {"name": "successive_halving", "min_resource": 1, "reduction_factor": 2},
    {"name": "successive_halving"},  # min_resource "auto": estimated from the completed trials
    {"name": "hyperband", "min_resource": 1, "reduction_factor": 3},
    {"name": "none"},
]


def _curve(rng: random.Random) -> list[float]:
    """A learning curve of EPOCHS values, better or worse by chance."""
    top = rng.uniform(0.3, 0.95)
    return [top * (1 - 0.5 ** (epoch + 1)) for epoch in range(EPOCHS)]


def _store(tmp_path: Path, label: str, pruner: dict[str, Any], n_completed: int = 16) -> str:
    """A SQLite study as workers leave it: trials its pruner pruned (successive halving's rungs in
    their system attrs), completed ones, one pruned by hand, one still running.

    The same trials for the same arguments, whatever the label: two stores to compare.
    """
    url = f"sqlite:///{tmp_path / label}.db"
    made = optuna.create_study(
        study_name=NAME, storage=study.storage(url), direction="maximize", pruner=study.pruner(PrunerSpec(**pruner))
    )
    made.set_user_attr(Attr.PRUNER, PrunerSpec(**pruner).model_dump())
    rng = random.Random(7)
    for number in range(n_completed + 2):
        trial = made.ask()
        trial.set_user_attr(Attr.RUN_ID, f"run-{number}")
        trial.suggest_float("lr", 1e-4, 1e-2, log=True)
        curve = _curve(rng)
        if number == 5:
            curve[1] = math.nan  # a diverged epoch: stored as NaN, read back as NaN
        pruned = False
        for epoch, value in enumerate(curve):
            trial.report(value, epoch)
            if number > 3 and trial.should_prune():
                pruned = True
                break
        if number == n_completed + 1:
            continue  # left RUNNING: a trial another worker has in hand
        if pruned or number == 9:
            made.tell(trial, state=TrialState.PRUNED)
        else:
            made.tell(trial, curve[-1])
    return url


def _seen(trial: optuna.trial.FrozenTrial) -> tuple[Any, ...]:
    """What a pruner reads of a trial, NaN made comparable."""

    def same(value: Any) -> Any:
        return repr(value) if isinstance(value, float) else value

    return (
        trial._trial_id,
        trial.number,
        trial.state,
        None if trial.values is None else [same(v) for v in trial.values],
        {step: same(v) for step, v in trial.intermediate_values.items()},
        trial.system_attrs,
    )


def test_the_trial_lists_hold_what_the_pruners_read_as_optuna_stores_it(tmp_path: Path) -> None:
    url = _store(tmp_path, "lists", PRUNERS[1])
    loaded = optuna.load_study(study_name=NAME, storage=url)
    study_id = loaded._study_id
    optunas = optuna.storages.RDBStorage(url).get_all_trials(study_id, deepcopy=False)
    ours = study.pruning_storage(url).get_all_trials(study_id, deepcopy=False)
    assert [_seen(t) for t in ours] == [_seen(t) for t in optunas]
    assert {t.state for t in ours} == {TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING}
    assert sum(t.state == TrialState.COMPLETE for t in ours) >= 5
    assert any("completed_rung_0" in t.system_attrs for t in ours)  # successive halving's rungs
    # The kernel's own trial is read whole, as Optuna reads it (its params and user attrs).
    running = next(t for t in ours if t.state == TrialState.RUNNING)
    assert study.pruning_storage(url).get_trial(running._trial_id).params == loaded.trials[running.number].params
    # The states filter is Optuna's too.
    only = study.pruning_storage(url)._get_trials(study_id, (TrialState.PRUNED,), set(), -1)
    assert [t.number for t in only] == [t.number for t in optunas if t.state == TrialState.PRUNED]


@pytest.mark.parametrize("pruner", PRUNERS, ids=[str(p) for p in PRUNERS])
def test_the_kernels_pruning_decisions_are_optunas_own(tmp_path: Path, pruner: dict[str, Any]) -> None:
    """Two identical studies: in one each new trial is judged through labbook's kernel path (a
    fresh `pruning_callback` per trial, as a fresh kernel), in the other by Optuna's own pruner on
    Optuna's own storage. Same decision at every epoch, trial after trial."""
    ours_url, optunas_url = _store(tmp_path, "ours", pruner), _store(tmp_path, "optunas", pruner)
    driver = optuna.load_study(study_name=NAME, storage=study.storage(ours_url))
    reference = optuna.load_study(study_name=NAME, storage=optunas_url, pruner=study.pruner(PrunerSpec(**pruner)))
    rng = random.Random(11)
    decisions = []
    for _ in range(8):
        curve = _curve(rng)
        trial, twin = driver.ask(), reference.ask()
        assert trial.number == twin.number
        callback = in_notebook.pruning_callback(
            {"optuna_storage": ours_url, "study_name": NAME, "trial_number": trial.number, "monitor": "val"}
        )
        kernel_trial = callback._trial
        pruned = False
        for epoch, value in enumerate(curve):
            kernel_trial.report(value, epoch)
            twin.report(value, epoch)
            ours, optunas = kernel_trial.should_prune(), twin.should_prune()
            assert ours == optunas, (trial.number, epoch, pruner)
            decisions.append(ours)
            if ours:
                pruned = True
                break
        for which, one in ((driver, trial), (reference, twin)):
            which.tell(one, state=TrialState.PRUNED) if pruned else which.tell(one, curve[-1])
    if pruner["name"] == "none":
        assert not any(decisions)
    else:  # the comparison met both answers
        assert any(decisions) and not all(decisions)


def _finish(on: optuna.Study, value: float) -> None:
    """One trial that reports `value` at steps 0-2 and completes with it."""
    trial = on.ask()
    for step in range(3):
        trial.report(value, step)
    on.tell(trial, value)


def test_a_trial_finished_after_the_kernels_cache_was_filled_still_counts(tmp_path: Path) -> None:
    """The kernel's storage caches finished trials (Optuna's `_CachedStorage`); trials another
    worker finishes meanwhile, one of them already running when the cache was filled, change the
    median the next epoch is judged by, as they change Optuna's own decision."""
    url = f"sqlite:///{tmp_path / 'fresh'}.db"
    spec = PrunerSpec(name="median", n_startup_trials=3, n_warmup_steps=0)
    made = optuna.create_study(study_name=NAME, storage=study.storage(url), direction="maximize")
    made.set_user_attr(Attr.PRUNER, spec.model_dump())
    for _ in range(3):
        _finish(made, 0.5)

    # Another worker's trial, running when the kernel fills its cache, older than a finished one
    # (so the cache reads it again as an unfinished trial it holds, not as a newer trial).
    already_running = made.ask()
    _finish(made, 0.5)
    mine = made.ask()
    callback = in_notebook.pruning_callback(
        {"optuna_storage": url, "study_name": NAME, "trial_number": mine.number, "monitor": "val"}
    )
    kernel_trial = callback._trial
    kernel_trial.report(0.6, 0)
    assert not kernel_trial.should_prune()  # 0.6 over the median 0.5 of the four finished ones
    assert kernel_trial.study._storage._studies[kernel_trial.study._study_id].trials  # the cache is filled

    other = optuna.load_study(study_name=NAME, storage=study.storage(url))  # another worker's process
    for step in range(3):
        already_running.report(0.9, step)
    other.tell(already_running.number, 0.9)
    for _ in range(3):
        _finish(other, 0.9)

    kernel_trial.report(0.6, 1)
    assert kernel_trial.should_prune()  # the median at step 1 is 0.7 now: four 0.5, four 0.9
    fresh = optuna.load_study(study_name=NAME, storage=url, pruner=study.pruner(spec))
    assert fresh.pruner.prune(fresh, fresh._storage.get_trial(kernel_trial._trial_id))
    seen = kernel_trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    assert already_running.number in {t.number for t in seen} and len(seen) == 8


def _fit_with_pruning(url: str, number: int, epochs: int = 3) -> tuple[Any, bool]:
    """A real 3-epoch fit of a small regression MLP, judged by the notebook's pruning callback."""
    import lightning.pytorch as L

    from lightning_modules import build_data, build_model

    callback = in_notebook.pruning_callback(
        {"optuna_storage": url, "study_name": NAME, "trial_number": number, "monitor": "val_r2"}
    )
    params = {"model": "mlp_regressor", "data": "regression", "n_samples": 200, "batch_size": 50}
    datamodule = build_data(params)
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    try:
        trainer.fit(build_model(params, datamodule), datamodule=datamodule)
    except optuna.TrialPruned:
        return trainer, True
    return trainer, False


def test_a_new_studys_steps_count_epochs_trained_and_an_older_study_keeps_its_own(tmp_path: Path) -> None:
    """`min_resource: 1` means one epoch: a labbook study's steps are epochs trained (1, 2, 3).
    A study that already has trials from before keeps Lightning's 0-based epochs, so no study
    holds both counts."""
    for label, before, expected in (("new", 0, [1, 2, 3]), ("older", 1, [0, 1, 2])):
        url = f"sqlite:///{tmp_path / label}.db"
        made = optuna.create_study(study_name=NAME, storage=study.storage(url), direction="maximize")
        for _ in range(before):
            _finish(made, 0.5)
        study.mark_steps(made)
        study.mark_steps(made)  # a resumed study is marked (or not) the same way again
        trial = made.ask()
        _fit_with_pruning(url, trial.number)
        reported = study.storage(url).get_trial(trial._trial_id).intermediate_values
        assert sorted(reported) == expected, label


def test_successive_halving_with_min_resource_1_cuts_after_one_epoch_trained(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sh'}.db"
    spec = PrunerSpec(name="successive_halving", min_resource=1, reduction_factor=2)
    made = optuna.create_study(
        study_name=NAME, storage=study.storage(url), direction="maximize", pruner=study.pruner(spec)
    )
    made.set_user_attr(Attr.PRUNER, spec.model_dump())
    study.mark_steps(made)
    for _ in range(3):  # three trials that were excellent after their first epoch
        trial = made.ask()
        trial.report(0.999, 1)
        assert not trial.should_prune()
        made.tell(trial, 0.999)
    trial = made.ask()
    trainer, pruned = _fit_with_pruning(url, trial.number)
    assert pruned and trainer.current_epoch == 0  # cut in the first epoch's validation: 1 epoch trained


def test_hyperband_on_epochs_trained_spans_exactly_the_trials_epochs(tmp_path: Path) -> None:
    """Optuna's `max_resource="auto"` is the last step + 1 (0-based steps): counted in epochs
    trained it would be max_epochs + 1, a bracket too many at 8 epochs and factor 3, whose first
    rung no trial reaches (its trials never pruned). The kernel gives Hyperband max_epochs."""
    url = f"sqlite:///{tmp_path / 'hb'}.db"
    spec = PrunerSpec(name="hyperband", min_resource=1, reduction_factor=3)
    made = optuna.create_study(study_name=NAME, storage=study.storage(url), direction="maximize")
    made.set_user_attr(Attr.PRUNER, spec.model_dump())
    study.mark_steps(made)
    trial = made.ask()
    callback = in_notebook.pruning_callback(
        {"optuna_storage": url, "study_name": NAME, "trial_number": trial.number, "monitor": "v", "max_epochs": 8}
    )
    hyperband = callback._trial.study.pruner
    assert hyperband._max_resource == 8
    assert hyperband._try_initialization(callback._trial.study) is None and hyperband._n_brackets == 2
