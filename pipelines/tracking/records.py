"""A run's record read back: the executed notebook it attached, and the parameters papermill injected.

What `labbook rerun` and `labbook diff` compare, and what a notebook reopening a trained run
(`pipelines/nb/trained.py`, `evaluate.ipynb`) rebuilds its data from. MLflow and nbformat only:
no papermill, so a kernel may import it.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from mlflow import MlflowClient

from pipelines.tracking import tracking
from pipelines.tracking.tags import Tag

# Provenance that may move between two runs of the same settings, by the name a report gives it.
PROVENANCE = {
    "git commit": Tag.GIT_COMMIT,
    "dirty tree": Tag.GIT_DIRTY,
    "data fingerprint": Tag.DATA_FINGERPRINT,
    "torch": Tag.TORCH_VERSION,
    "lightning": Tag.LIGHTNING_VERSION,
    "mlflow": Tag.MLFLOW_VERSION,
    "python": Tag.PYTHON_VERSION,
}


def executed_notebook(client: MlflowClient, run_id: str) -> nbformat.NotebookNode:
    """The executed notebook attached to a run (`notebook/*.ipynb`)."""
    executed = [a.path for a in client.list_artifacts(run_id, "notebook") if a.path.endswith(".ipynb")]
    if not executed:
        raise ValueError(f"run {run_id} has no executed notebook recorded: it was not made by labbook")
    return nbformat.read(client.download_artifacts(run_id, executed[0]), as_version=4)


def recorded_parameters(run_id: str) -> tuple[Path, dict]:
    """The notebook and the parameters papermill injected into it, from the run's executed copy."""
    client = tracking.client()
    run = client.get_run(run_id)
    notebook_tag = run.data.tags.get(Tag.NOTEBOOK)
    if not notebook_tag:
        raise ValueError(f"run {run_id} has no executed notebook recorded: it was not made by labbook")
    copy = executed_notebook(client, run_id)
    params = dict(copy.metadata.get("papermill", {}).get("parameters", {}))
    if not params:
        raise ValueError(f"run {run_id}: its executed notebook records no parameters")
    source = Path(notebook_tag)
    return (source if source.is_absolute() else tracking.PROJECT_ROOT / source), params
