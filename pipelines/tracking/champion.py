"""The MLflow Model Registry step: register a model, move `champion` only on improvement.

Deciding is read-compare-write (read the champion's value, compare, move the alias), so two
promotions of one model name at once could both read the old champion and the worse one move
the alias last: 1 of 8 such races ended on the worse model. The decision is therefore taken
under a lock that every process using the store sees: an flock beside a SQLite store, a
PostgreSQL advisory lock on a PostgreSQL store. A store reached through an MLflow server (or
any other) offers no lock to a client: there the alias is moved compare-and-set style, re-read
after a pause long enough for a racing move to land, and moved again if a worse model took it.

A non-finite metric (NaN, ±inf) never becomes champion, and a champion whose recorded value is
not finite (or unreadable) is replaced by any finite one: with NaN first, nothing ever beat it.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipelines.tracking import tracking
from pipelines.tracking.tags import Tag

CHAMPION = "champion"
DIRECTIONS = ("maximize", "minimize")
_SETTLE_SECONDS = 1.0  # a server store: how long a racing promotion's move may take to land
_ATTEMPTS = 5


def promote(name: str, run_id: str, metric: str, direction: str, value: float) -> dict[str, Any]:
    """Register the run's model under `name`; point `champion` at it only if it beats the current
    champion on `metric`. Both values are recorded as tags on the new version.

    Returns the decision: `version` (the new one), `promoted`, `champion_version` (None when the
    model has no champion), `previous_value` (the champion's value before; None if none or not
    finite) and `reason`. Raises ValueError for a `direction` other than maximize or minimize.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction: got {direction!r}; expected maximize or minimize")
    uri = tracking.tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = tracking.client(uri)
    model_uri = tracking.model_uri(client, run_id)
    version = mlflow.register_model(model_uri, name, tags={Tag.RUN_ID: run_id})
    key = Tag.of(metric)
    client.set_model_version_tag(name, version.version, key, str(value))
    with _serialized(uri, name) as locked:
        promoted, current, current_value = _decide(client, name, int(version.version), key, value, direction, locked)
    client.set_model_version_tag(name, version.version, Tag.champion_before(metric), str(current_value))
    if promoted and current is None:
        reason = "no champion yet"
    elif promoted:
        was = f"{current_value}" if current_value is not None else f"no finite {metric}"
        reason = f"beats version {current.version} ({was})"
    elif not math.isfinite(value):
        reason = f"{metric} is {value}: a non-finite value is never promoted"
    else:
        reason = f"does not beat version {current.version if current else '?'} ({current_value})"
    return {
        "name": name,
        "version": int(version.version),
        "value": value,
        "previous_value": current_value,
        "promoted": promoted,
        "champion_version": int(version.version) if promoted else (int(current.version) if current else None),
        "reason": reason,
    }


def _decide(
    client: MlflowClient, name: str, version: int, key: str, value: float, direction: str, locked: bool
) -> tuple[bool, Any, float | None]:
    """Move the alias to `version` if `value` beats the champion: (promoted, champion before, its value).

    Under a lock, once. Without one (a server store), again after each pause while a worse model
    took the alias from ours, up to `_ATTEMPTS` times.
    """
    before: tuple[Any, float | None] = (None, None)
    for attempt in range(1 if locked else _ATTEMPTS):
        current, current_value = _champion(client, name, key)
        if current is not None and int(current.version) == version:
            return True, *before  # our earlier move held
        if not (math.isfinite(value) and _better(value, current_value, direction)):
            return False, current, current_value
        if attempt == 0:
            before = (current, current_value)
        client.set_registered_model_alias(name, CHAMPION, str(version))
        if not locked:
            time.sleep(_SETTLE_SECONDS)  # let a racing move land; the next pass checks it did not undo ours
    return True, *before


def _champion(client: MlflowClient, name: str, key: str) -> tuple[Any, float | None]:
    """The version the alias points at (None if none) and its finite value of `key` (else None)."""
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None, None
    try:
        found = float(current.tags[key])
    except (KeyError, ValueError):
        return current, None
    return current, found if math.isfinite(found) else None


def _better(value: float, current: float | None, direction: str) -> bool:
    """Whether finite `value` beats the champion's (None: no champion, or one without a finite value)."""
    if current is None:
        return True
    return value > current if direction == "maximize" else value < current


@contextlib.contextmanager
def _serialized(uri: str, name: str) -> Iterator[bool]:
    """Hold the store's promotion lock for `name`; yields False where the store offers none."""
    database = re.match(r"sqlite:///(.+)$", uri)
    if database is not None:
        path = Path(database.group(1))
        with open(path.with_name(path.name + ".champion.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when closed; all model names share it
            yield True
        return
    if uri.startswith("postgresql"):
        with tracking.advisory_lock(uri, f"labbook.champion:{name}"):
            yield True
        return
    yield False
