"""`labbook rerun`: execute a run again from its own record and say whether it reproduced.

The record is the executed notebook attached to the run: papermill keeps the parameters it
injected in the notebook's metadata, so the rerun gets exactly those values, the same
notebook and the same seed. Provenance that may have moved (git commit, dirty tree, package
versions, data fingerprint) is compared and reported, then every final metric, old vs new.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pandas as pd

from pipelines.execution.run import RunResult, run_notebook
from pipelines.specs.spec import TRACKING_PARAMETERS
from pipelines.tracking import tracking
from pipelines.tracking.records import PROVENANCE, executed_notebook, recorded_parameters  # noqa: F401
from pipelines.tracking.tags import Tag


@dataclass
class Rerun:
    original: str
    result: RunResult
    metrics: pd.DataFrame  # metric, old, new, diff
    changed: dict[str, tuple[str, str]] = field(default_factory=dict)  # provenance name: (old, new)
    verdict: str = "exact"  # exact | within tolerance | differs | failed


def rerun(run_id: str, tolerance: float = 0.0) -> Rerun:
    """Execute `run_id` again into a new run tagged `labbook.rerun_of`, and compare the two."""
    client = tracking.client()
    old = client.get_run(run_id)
    notebook, params = recorded_parameters(run_id)
    params = {k: v for k, v in params.items() if k not in TRACKING_PARAMETERS}
    experiment = client.get_experiment(old.info.experiment_id).name
    result = run_notebook(
        notebook,
        params,
        experiment,
        run_name=f"rerun-of-{old.info.run_name or run_id[:8]}",
        tags={Tag.RERUN_OF: run_id},
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
