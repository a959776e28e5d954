"""`labbook run`: a notebook executed into one MLflow run, from a spec or from a parameter dict."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.execution import closing, notebook, resume
from pipelines.tracking import staged, tracking
from pipelines.tracking.tags import Tag

if TYPE_CHECKING:
    from pipelines.execution.closing import RunCloser
    from pipelines.kernels.kernel_pool import KernelPool
    from pipelines.specs.spec import Spec


@dataclass(frozen=True)
class RunResult:
    run_id: str
    status: str
    metrics: dict[str, float]
    error: str | None
    notebook: Path
    pruned: bool = False


def run_training(
    spec: Spec,
    spec_path: Path | None = None,
    parent_run_id: str | None = None,
    run_name: str | None = None,
    extra_parameters: dict[str, Any] | None = None,
    extra_tags: dict[str, str] | None = None,
    progress_bar: bool = True,
    on_run: Callable[[str], None] | None = None,
    kernels: KernelPool | None = None,
    resume_key: str | None = None,
    closer: RunCloser | None = None,
) -> RunResult:
    """The spec's notebook with the spec's parameters, as one run of the spec's experiment.

    With `trainer.ckpt_path: last`, checkpoints go to the folder of `resume_key` (by default,
    the experiment, spec and settings), where a crashed attempt's last checkpoint is resumed from.
    """
    tags = {Tag.SPEC: spec.name, **(extra_tags or {})}
    if spec_path is not None:
        tags[Tag.SPEC_PATH] = str(spec_path)
    settings = spec.parameters()
    params = {**settings, **(extra_parameters or {})}
    resumable = None
    if spec.trainer.ckpt_path == "last":
        key = resume_key or resume.run_key(spec.experiment_name, spec.name, settings)
        resumable = resume.claim(tracking.tracking_uri(), key)  # held until this training ends
        if resumable.extra:
            print(
                f"checkpoints: another live training of {key} holds its folder; this one uses {resumable.path}",
                file=sys.stderr,
            )
        params["checkpoint_dir"] = str(resumable.path)
    ended = False
    try:
        result = run_notebook(
            spec.notebook_path(spec_path.parent if spec_path else None),
            params,
            spec.experiment_name,
            run_name=run_name or spec.name,
            parent_run_id=parent_run_id,
            tags=tags,
            progress_bar=progress_bar,
            on_run=on_run,
            kernels=kernels,
            closer=closer,
        )
        ended = result.error is None or result.pruned
    finally:
        if resumable is not None:  # ended (completed or pruned): removed; else kept for the next attempt
            resumable.release(finished=ended)
    return result


def run_notebook(
    nb_path: Path,
    params: dict[str, Any],
    experiment: str,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    progress_bar: bool = True,
    on_run: Callable[[str], None] | None = None,
    kernels: KernelPool | None = None,
    closer: RunCloser | None = None,
) -> RunResult:
    """Create the run, execute the notebook into it, attach the executed copy, close it.

    The run exists before the notebook starts, so a notebook that dies early still leaves a
    FAILED run with whatever it had logged and its partly executed notebook. `on_run` hears
    the run id before the notebook starts (a study records it on the trial). With `closer`
    (a study's driver), the run is closed in its background thread once the kernel is
    released (`closing.close`): the result then holds the notebook's own outcome, and
    `status` is RUNNING. An interrupted notebook is always closed here, before Ctrl-C goes on.
    """
    uri = tracking.tracking_uri()
    mlflow = tracking.client(uri)
    provenance = {**tracking.provenance_tags(params.get("seed"), _display(nb_path)), **_content(nb_path)}
    all_tags = {**provenance, **(tags or {})}
    run_id = tracking.start_run(mlflow, experiment, run_name=run_name, parent_run_id=parent_run_id, tags=all_tags)
    if on_run is not None:
        on_run(run_id)
    output_dir = tracking.output_dir(uri, run_id)
    staging = staged.folder(output_dir)
    executed = notebook.execute(
        nb_path,
        output_dir,
        {
            **params,
            "tracking_uri": uri,
            "experiment_name": experiment,
            "run_id": run_id,
            "parent_run_id": parent_run_id or "",
            "output_dir": str(output_dir),
            "artifacts_dir": str(staging),
            # A study's closer logs the model after the kernel is released; `labbook run` closes
            # in this thread, where the kernel logging it costs less than importing torch here.
            "defer_model": closer is not None,
        },
        progress_bar=progress_bar,
        kernels=kernels,
        render=False,  # in `closing.close`: off the critical path where a closer runs it
    )
    if closer is not None and not executed.interrupted:
        closer.submit(lambda: closing.close(tracking.client(uri), run_id, executed, staging), run_id)
        error, pruned = executed.error, executed.pruned
    else:
        error, pruned = closing.close(mlflow, run_id, executed, staging)
    if executed.interrupted:
        raise executed.interrupted
    run = mlflow.get_run(run_id)
    return RunResult(
        run_id=run_id,
        status=run.info.status,
        metrics=dict(run.data.metrics),
        error=error,
        notebook=executed.ipynb,
        pruned=pruned,
    )


def _display(path: Path) -> str:
    """The notebook path relative to the project when it lies inside it."""
    try:
        return str(path.resolve().relative_to(tracking.PROJECT_ROOT))
    except ValueError:
        return str(path)


def _content(path: Path) -> dict[str, str]:
    """The notebook's content hash as a tag (what `labbook rerun` checks); none if it cannot be read
    (the run then fails on it, saying why)."""
    try:
        return {Tag.NOTEBOOK_SHA256: tracking.notebook_sha256(path.read_bytes())}
    except OSError:
        return {}
