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
    """The notebook the run's tag names and the parameters papermill injected, from its executed copy.

    The path is what the tag says, unchecked: `rerun.notebook_to_run` decides what may be executed.
    """
    client = tracking.client()
    notebook_tag, copy = notebook_record(client, run_id)
    params = run_parameters(run_id, copy)
    source = Path(notebook_tag)
    return (source if source.is_absolute() else tracking.PROJECT_ROOT / source), params


def notebook_record(client: MlflowClient, run_id: str) -> tuple[str, nbformat.NotebookNode]:
    """The notebook a run's `labbook.notebook` tag names, and the executed copy attached to the run."""
    run = client.get_run(run_id)
    notebook_tag = run.data.tags.get(Tag.NOTEBOOK)
    if not notebook_tag:
        raise ValueError(f"run {run_id} has no executed notebook recorded: it was not made by labbook")
    return notebook_tag, executed_notebook(client, run_id)


def run_parameters(run_id: str, copy: nbformat.NotebookNode) -> dict:
    """The parameters papermill injected, from a run's executed copy `copy`."""
    params = dict(copy.metadata.get("papermill", {}).get("parameters", {}))
    if not params:
        raise ValueError(f"run {run_id}: its executed notebook records no parameters")
    return params
