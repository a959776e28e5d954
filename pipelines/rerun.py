"""`labbook rerun`: execute a run again from its own record and say whether it reproduced.

The record is the executed notebook attached to the run: papermill keeps the parameters it
injected in the notebook's metadata, so the rerun gets exactly those values, the same
notebook and the same seed. Provenance that may have moved (git commit, dirty tree, package
versions, data fingerprint) is compared and reported, then every final metric, old vs new.

What runs is never just what a tag names (anyone who can write the store can edit a tag): the
source notebook only when its content is the one the run recorded (`labbook.notebook_sha256`),
else the run's own executed copy, and a source notebook that differs is refused (`notebook_to_run`).
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import pandas as pd
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_SOURCE_NAME

from pipelines import tracking
from pipelines.run import RunResult, run_notebook
from pipelines.spec import PROJECT_ROOT, TRACKING_PARAMETERS

PROVENANCE = {
    "git commit": tracking.GIT_COMMIT_TAG,
    "dirty tree": f"{tracking.TAG_PREFIX}git_dirty",
    "data fingerprint": f"{tracking.TAG_PREFIX}data_fingerprint",
    "torch": f"{tracking.TAG_PREFIX}torch_version",
    "lightning": f"{tracking.TAG_PREFIX}lightning_version",
    "mlflow": f"{tracking.TAG_PREFIX}mlflow_version",
    "python": f"{tracking.TAG_PREFIX}python_version",
}


@dataclass
class Rerun:
    original: str
    result: RunResult
    metrics: pd.DataFrame  # metric, old, new, diff
    changed: dict[str, tuple[str, str]] = field(default_factory=dict)  # provenance name: (old, new)
    verdict: str = "exact"  # exact | within tolerance | differs | failed


def executed_notebook(client: MlflowClient, run_id: str) -> nbformat.NotebookNode:
    """The executed notebook attached to a run (`notebook/*.ipynb`)."""
    executed = [a.path for a in client.list_artifacts(run_id, "notebook") if a.path.endswith(".ipynb")]
    if not executed:
        raise ValueError(f"run {run_id} has no executed notebook recorded: it was not made by labbook")
    return nbformat.read(client.download_artifacts(run_id, executed[0]), as_version=4)


def recorded_parameters(run_id: str) -> tuple[Path, dict]:
    """The notebook the run's tag names and the parameters papermill injected, from its executed copy.

    The path is what the tag says, unchecked: `notebook_to_run` decides what may be executed.
    """
    client = tracking.client()
    notebook_tag, copy = _record(client, run_id)
    params = _parameters(run_id, copy)
    source = Path(notebook_tag)
    return (source if source.is_absolute() else PROJECT_ROOT / source), params


def _record(client: MlflowClient, run_id: str) -> tuple[str, nbformat.NotebookNode]:
    run = client.get_run(run_id)
    notebook_tag = run.data.tags.get(tracking.NOTEBOOK_TAG)
    if not notebook_tag:
        raise ValueError(f"run {run_id} has no executed notebook recorded: it was not made by labbook")
    return notebook_tag, executed_notebook(client, run_id)


def _parameters(run_id: str, copy: nbformat.NotebookNode) -> dict:
    params = dict(copy.metadata.get("papermill", {}).get("parameters", {}))
    if not params:
        raise ValueError(f"run {run_id}: its executed notebook records no parameters")
    return params


def notebook_to_run(
    run_id: str, tags: dict[str, str], copy: nbformat.NotebookNode, folder: Path
) -> tuple[Path, dict[str, str]]:
    """The notebook `rerun` executes for run `run_id`, written into `folder`, and the tags naming it on the new run.

    The source notebook named by the run's `labbook.notebook` tag, when its bytes hash to the
    run's recorded `labbook.notebook_sha256` (read once: what was checked is what runs); the
    run's own executed copy `copy` when that source is gone or the run recorded no hash (older
    runs). Raises ValueError (one line, nothing run) when the source exists and differs: it was
    edited since the run, or the tag was changed to name another notebook.
    """
    named = tags[tracking.NOTEBOOK_TAG]
    recorded = tags.get(tracking.NOTEBOOK_SHA256_TAG, "")
    source = Path(named) if Path(named).is_absolute() else PROJECT_ROOT / named
    try:
        data = source.read_bytes() if recorded and source.is_file() else None
    except OSError:
        data = None
    target = folder / (Path(named).name if Path(named).suffix == ".ipynb" else "notebook.ipynb")
    same = {tracking.NOTEBOOK_TAG: named, MLFLOW_SOURCE_NAME: named}
    if data is not None and re.fullmatch(r"[0-9a-f]{64}", recorded):
        if tracking.notebook_sha256(data) != recorded:
            commit = tags.get(tracking.GIT_COMMIT_TAG, "unknown")
            raise ValueError(
                f"run {run_id}: {named[:200]} is not the notebook the run executed (its sha256 differs from "
                f"the one recorded then: edited since, or the run's {tracking.NOTEBOOK_TAG} tag was changed); "
                f"nothing was run. Restore it as of git commit {commit[:12]} to rerun"
            )
        target.write_bytes(data)
        return target, {**same, tracking.NOTEBOOK_SHA256_TAG: recorded}
    nbformat.write(copy, target)  # the record itself: exactly the cells that ran
    return target, {**same, tracking.NOTEBOOK_SHA256_TAG: "unknown"}  # this copy is not the source


def rerun(run_id: str, tolerance: float = 0.0) -> Rerun:
    """Execute `run_id` again into a new run tagged `labbook.rerun_of`, and compare the two."""
    client = tracking.client()
    old = client.get_run(run_id)
    _, copy = _record(client, run_id)
    params = {k: v for k, v in _parameters(run_id, copy).items() if k not in TRACKING_PARAMETERS}
    experiment = client.get_experiment(old.info.experiment_id).name
    with tempfile.TemporaryDirectory(prefix="labbook-rerun-") as folder:
        notebook, named = notebook_to_run(run_id, old.data.tags, copy, Path(folder))
        result = run_notebook(
            notebook,
            params,
            experiment,
            run_name=f"rerun-of-{old.info.run_name or run_id[:8]}",
            tags={**named, f"{tracking.TAG_PREFIX}rerun_of": run_id},
        )
    new = client.get_run(result.run_id)
    changed = {
        name: (old.data.tags.get(tag, ""), new.data.tags.get(tag, ""))
        for name, tag in PROVENANCE.items()
        if old.data.tags.get(tag, "") != new.data.tags.get(tag, "")
    }
    rows = [
        {"metric": k, "old": v, "new": new.data.metrics.get(k), "diff": _diff(v, new.data.metrics.get(k))}
        for k, v in sorted(old.data.metrics.items())
        if k.startswith(("train_", "val_", "test_"))
    ]
    metrics = pd.DataFrame(rows, columns=["metric", "old", "new", "diff"])
    if result.error:
        verdict = "failed"
    elif metrics.empty or (metrics["diff"] == 0).all():
        verdict = "exact"
    elif metrics["diff"].abs().max() <= tolerance:
        verdict = "within tolerance"
    else:
        verdict = "differs"
    client.set_tag(result.run_id, f"{tracking.TAG_PREFIX}rerun_verdict", verdict)
    if changed:
        client.set_tag(result.run_id, f"{tracking.TAG_PREFIX}rerun_changed", json.dumps(changed))
    return Rerun(run_id, result, metrics, changed, verdict)


def _diff(old: float, new: float | None) -> float:
    return float("nan") if new is None else new - old
