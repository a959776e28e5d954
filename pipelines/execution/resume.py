"""Where a training that may be resumed keeps its checkpoints, so the next attempt finds them.

A run's checkpoints normally live under its run id (`mlruns/outputs/<run id>/checkpoints`),
but a re-run or a retried trial is a new run with a new id. With `trainer.ckpt_path: last` the
checkpoints go instead to a folder named by what the training *is*: a study's trial, through
its retries, or the experiment, spec and settings of a `labbook run`. Lightning's own
`fit(ckpt_path="last")` then finds the crashed attempt's `last.ckpt` there and restores model,
optimizer, schedule, callbacks and epoch count. The folder is removed when a training ends (its
checkpoints are attached to its run by then); a failed or killed attempt leaves it for the next.

A folder belongs to one live training: the driver holds an flock on its `.owner.lock` for the
training's life (the system lets go when the process dies, however it dies). Two runs of the
same command at once used to share one folder: the second resumed from the first's live
checkpoint and failed when the first finished and removed it. Now a training that finds the
folder held takes the next free one of the same training (`<key>+2`, `<key>+3`, ...), where a
crashed attempt's checkpoints are resumed too, and starts from scratch in an empty one. Study
names get a digest of the exact name beside their cleaned-up form: `exp b` and `exp_b` once
shared `exp_b/` and the second study resumed (and then deleted) the first one's training.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.tracking import tracking

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

# Settings that do not change what is trained: a crashed run may be resumed with more epochs.
_NOT_THE_TRAINING = frozenset({"max_epochs", "ckpt_path", "enable_progress_bar", "early_stopping_patience"})


def _safe(name: str) -> str:
    """A folder name from a user's experiment or study name (`tracking.folder_name`)."""
    return tracking.folder_name(name)


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
    return f"{_unique(study_name)}/trial-{history[0] if history else trial.number}"


def _unique(name: str) -> str:
    """`_safe(name)` and a digest of the exact name: names that clean up alike never share a folder."""
    return f"{_safe(name)[:80]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def checkpoint_dir(uri: str, key: str) -> Path:
    """The resumable checkpoints of `key`, beside the local store (on a shared disk when scaled out)."""
    return tracking.files_dir(uri) / "checkpoints" / key


LOCK_FILE = ".owner.lock"
_MAX_FOLDERS = 100  # of one training at once: a bound on the search, not a limit anyone meets


@dataclass
class Claimed:
    """A checkpoint folder held by this process's training until `release`."""

    path: Path
    fd: int
    extra: bool  # not the training's own folder: another live training of the same key holds that

    def release(self, finished: bool) -> None:
        """Let the folder go; `finished` (completed or pruned): remove it first, nothing is left to resume."""
        try:
            if finished:
                shutil.rmtree(self.path, ignore_errors=True)
        finally:
            os.close(self.fd)


def claim(uri: str, key: str) -> Claimed:
    """The checkpoint folder of `key` for a training starting now, held until `Claimed.release`.

    The key's own folder if no live training holds it; else the first of `<key>+2`, `<key>+3`, ...
    that none holds, preferring one with a crashed attempt's `last.ckpt` to resume. Raises
    RuntimeError when `_MAX_FOLDERS` live trainings of one key hold them all.
    """
    base = checkpoint_dir(uri, key)
    chosen: Claimed | None = None
    for n in range(1, _MAX_FOLDERS + 1):
        path = base if n == 1 else base.with_name(f"{base.name}+{n}")
        if not path.exists() and chosen is not None:
            break  # no further leftovers to resume: the empty one found is it
        fd = _lock(path)
        if fd is None:
            continue
        if any(path.glob("last*.ckpt")):  # a crashed attempt of this training: resume it
            if chosen is not None:
                os.close(chosen.fd)
            return Claimed(path, fd, extra=n > 1)
        if chosen is None:
            chosen = Claimed(path, fd, extra=n > 1)
        else:
            os.close(fd)
    if chosen is None:
        raise RuntimeError(f"checkpoints of {key}: {_MAX_FOLDERS} live trainings hold its folders")
    return chosen


def _lock(path: Path) -> int | None:
    """An open descriptor holding `path`'s owner lock (made with the folder if missing); None if held."""
    while True:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            ours = os.path.samestat(os.fstat(fd), os.stat(path / LOCK_FILE))
        except FileNotFoundError:
            ours = False
        if ours:
            return fd
        os.close(fd)  # its training finished and removed the folder as we locked: take it anew
