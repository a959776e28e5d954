"""The MLflow Model Registry step: register a model, move `champion` only on improvement."""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

from pipelines.tracking import tracking
from pipelines.tracking.tags import Tag

CHAMPION = "champion"


def promote(name: str, run_id: str, metric: str, direction: str, value: float) -> dict[str, Any]:
    """Register the run's model under `name`; point `champion` at it only if it beats the
    current champion on `metric`. Both values are recorded as tags on the new version."""
    uri = tracking.tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = tracking.client(uri)
    model_uri = tracking.model_uri(client, run_id)
    version = mlflow.register_model(model_uri, name, tags={Tag.RUN_ID: run_id})
    key = Tag.of(metric)
    client.set_model_version_tag(name, version.version, key, str(value))
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        current = None
    current_value = float(current.tags[key]) if current is not None and key in current.tags else None
    client.set_model_version_tag(name, version.version, Tag.champion_before(metric), str(current_value))
    better = current_value is None or (value > current_value if direction == "maximize" else value < current_value)
    if better:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    return {
        "name": name,
        "version": int(version.version),
        "value": value,
        "previous_value": current_value,
        "promoted": better,
        "champion_version": int(version.version) if better else int(current.version),
    }
