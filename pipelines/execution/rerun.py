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
from mlflow.utils.mlflow_tags import MLFLOW_SOURCE_NAME

from pipelines.execution.run import RunResult, run_notebook
from pipelines.specs.spec import PROJECT_ROOT, TRACKING_PARAMETERS
from pipelines.tracking import tracking
from pipelines.tracking.records import (  # noqa: F401
    PROVENANCE,
    executed_notebook,
    notebook_record,
    recorded_parameters,
    run_parameters,
)
from pipelines.tracking.tags import Tag


@dataclass
class Rerun:
    original: str
    result: RunResult
    metrics: pd.DataFrame  # metric, old, new, diff
    changed: dict[str, tuple[str, str]] = field(default_factory=dict)  # provenance name: (old, new)
    verdict: str = "exact"  # exact | within tolerance | differs | failed


def notebook_to_run(
    run_id: str, tags: dict[str, str], copy: nbformat.NotebookNode, folder: Path
) -> tuple[Path, dict[str, str]]:
    """The notebook `rerun` executes for run `run_id`, written into `folder`, and the tags naming it on the new run.

    The source notebook named by the run's `labbook.notebook` tag, when it lies inside this
    checkout and its bytes hash to the run's recorded `labbook.notebook_sha256` (read once: what
    was checked is what runs); the run's own executed copy `copy` when that source is gone, lies
    outside the checkout, or the run recorded no hash (older runs). Raises ValueError (one line,
    nothing run) when the source exists and differs: it was edited since the run, or the tag was
    changed to name another notebook.
    """
    named = tags[Tag.NOTEBOOK]
    recorded = tags.get(Tag.NOTEBOOK_SHA256, "")
    source = Path(named) if Path(named).is_absolute() else PROJECT_ROOT / named
    # The hash is a tag in the same store as the notebook's name: whoever can rewrite one can
    # rewrite both. A matching source runs only inside this checkout (symlinks resolved), which a
    # store writer cannot edit; a matching one anywhere else gives way to the run's executed copy.
    inside = source.resolve().is_relative_to(PROJECT_ROOT.resolve())
    try:
        data = source.read_bytes() if recorded and source.is_file() else None
    except OSError:
        data = None
    target = folder / (Path(named).name if Path(named).suffix == ".ipynb" else "notebook.ipynb")
    same = {Tag.NOTEBOOK: named, MLFLOW_SOURCE_NAME: named}
    if data is not None and re.fullmatch(r"[0-9a-f]{64}", recorded):
        if tracking.notebook_sha256(data) != recorded:
            commit = tags.get(Tag.GIT_COMMIT, "unknown")
            raise ValueError(
                f"run {run_id}: {named[:200]} is not the notebook the run executed (its sha256 differs from "
                f"the one recorded then: edited since, or the run's {Tag.NOTEBOOK} tag was changed); "
                f"nothing was run. Restore it as of git commit {commit[:12]} to rerun"
            )
        if inside:
            target.write_bytes(data)
            return target, {**same, Tag.NOTEBOOK_SHA256: recorded}
    nbformat.write(copy, target)  # the record itself: exactly the cells that ran
    return target, {**same, Tag.NOTEBOOK_SHA256: "unknown"}  # this copy is not the source


def rerun(run_id: str, tolerance: float = 0.0) -> Rerun:
    """Execute `run_id` again into a new run tagged `labbook.rerun_of`, and compare the two."""
    client = tracking.client()
    old = client.get_run(run_id)
    _, copy = notebook_record(client, run_id)
    params = {k: v for k, v in run_parameters(run_id, copy).items() if k not in TRACKING_PARAMETERS}
    experiment = client.get_experiment(old.info.experiment_id).name
    with tempfile.TemporaryDirectory(prefix="labbook-rerun-") as folder:
        notebook, named = notebook_to_run(run_id, old.data.tags, copy, Path(folder))
        result = run_notebook(
            notebook,
            params,
            experiment,
            run_name=f"rerun-of-{old.info.run_name or run_id[:8]}",
            tags={**named, Tag.RERUN_OF: run_id},
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
    client.set_tag(result.run_id, Tag.RERUN_VERDICT, verdict)
    if changed:
        client.set_tag(result.run_id, Tag.RERUN_CHANGED, json.dumps(changed))
    return Rerun(run_id, result, metrics, changed, verdict)


def _diff(old: float, new: float | None) -> float:
    return float("nan") if new is None else new - old
