"""A trained run, reopened: its LightningModule from the best checkpoint and its exact data split.

What the compress and explain notebooks start from. The MLflow model (`pt2`, torch.export) is
what a deployment loads, but compression and attribution need the module itself (its layers,
its training step), so they load the Lightning checkpoint the run attached.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from pipelines.tracking import tracking
from pipelines.tracking.tags import Tag


def resolve_run(ref: str, client: MlflowClient | None = None) -> str:
    """A run id from a run id, `runs:/<id>/...`, or a registered model `models:/name@alias` / `models:/name/3`."""
    client = client or tracking.client()
    if ref.startswith("runs:/"):
        return ref.removeprefix("runs:/").split("/", 1)[0]
    if ref.startswith("models:/"):
        name, _, alias = ref.removeprefix("models:/").partition("@")
        if alias:
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = name.partition("/")
            version = client.get_model_version(name, number)
        if not version.run_id:
            raise ValueError(f"{ref}: this model version records no training run")
        return version.run_id
    if not ref:
        raise ValueError("no trained run given: set train_run_id (a run id) or model_ref (models:/name@alias)")
    return ref


def best_checkpoint(client: MlflowClient, run_id: str, destination: Path) -> Path:
    """Download the run's best checkpoint (`checkpoints/best-*.ckpt`, else `last.ckpt`)."""
    names = [a.path for a in client.list_artifacts(run_id, "checkpoints")]
    best = [n for n in names if Path(n).name.startswith("best-")] or [n for n in names if n.endswith("last.ckpt")]
    if not best:
        raise ValueError(f"run {run_id} attached no checkpoint under checkpoints/; train it with labbook run")
    destination.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, best[0], str(destination)))


def load_trained(run_id: str, destination: Path) -> tuple[Any, Any, dict[str, Any]]:
    """(module, datamodule set up, the run's parameters): the model as trained, on its own split.

    The data is rebuilt from the parameters the run's executed notebook recorded and checked
    against the run's data fingerprint, so a variant is never scored on different data.
    """
    from lightning_modules import build_data, model_class
    from pipelines.tracking.records import recorded_parameters

    client = tracking.client()
    _, params = recorded_parameters(run_id)
    datamodule = build_data(params)
    datamodule.setup()
    recorded = client.get_run(run_id).data.tags.get(Tag.DATA_FINGERPRINT)
    if recorded and recorded != datamodule.fingerprint:
        raise ValueError(f"data fingerprint {datamodule.fingerprint} differs from run {run_id}'s {recorded}")
    module = model_class(params["model"]).load_from_checkpoint(best_checkpoint(client, run_id, destination))
    return module.cpu().eval(), datamodule, params
