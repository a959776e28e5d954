"""Where a training that may be resumed keeps its checkpoints, so the next attempt finds them.

A run's checkpoints normally live under its run id (`mlruns/outputs/<run id>/checkpoints`),
but a re-run or a retried trial is a new run with a new id. With `trainer.ckpt_path: last` the
checkpoints go instead to a folder named by what the training *is*: a study's trial, through
its retries, or the experiment, spec and settings of a `labbook run`. Lightning's own
`fit(ckpt_path="last")` then finds the crashed attempt's `last.ckpt` there and restores model,
optimizer, schedule, callbacks and epoch count. The folder is removed when a training ends (its
checkpoints are attached to its run by then); a failed or killed attempt leaves it for the next.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.tracking import tracking

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

# Settings that do not change what is trained: a crashed run may be resumed with more epochs.
_NOT_THE_TRAINING = frozenset({"max_epochs", "ckpt_path", "enable_progress_bar", "early_stopping_patience"})


def _safe(name: str) -> str:
    """A folder name from a user's experiment or study name: no separators, no `..`."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name).strip(".") or "_"


def run_key(experiment: str, spec_name: str, params: dict[str, Any]) -> str:
    """`<experiment>/<spec>-<digest of the settings>`: the same command resumes, changed settings do not."""
    settings = {k: v for k, v in params.items() if k not in _NOT_THE_TRAINING}
    identity = json.dumps([experiment, spec_name, settings], sort_keys=True, default=str)
    digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
    return f"{_safe(experiment)}/{_safe(spec_name)}-{digest}"


def trial_key(study_name: str, trial: FrozenTrial) -> str:
    """`<study>/trial-<n>`, where n is the first of the trial's retries: a retry resumes its original."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    history = RetryHeartbeatStaleTrialCallback.retry_history(trial)
    return f"{_safe(study_name)}/trial-{history[0] if history else trial.number}"


def checkpoint_dir(uri: str, key: str) -> Path:
    """The resumable checkpoints of `key`, beside the local store (on a shared disk when scaled out)."""
    return tracking.files_dir(uri) / "checkpoints" / key


def finished(path: Path) -> None:
    """The training ended (completed or pruned): nothing is left to resume."""
    shutil.rmtree(path, ignore_errors=True)
