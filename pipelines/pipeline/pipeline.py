"""`labbook run PIPELINE`: the steps of a pipeline spec in order, as one MLflow parent run.

Every step is a run nested under the pipeline's parent run, with its executed notebook
attached. What a step produced (run id, best parameters, model URI, ...) is recorded on the
parent run as the tag `labbook.outputs.<step>` (JSON) the moment the step succeeds, so
`--from STEP` can reopen that pipeline run and go on from STEP with the earlier steps'
recorded outputs, without running them again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow import MlflowClient
from rich.console import Console

from pipelines.execution.run import RunResult, run_notebook
from pipelines.specs.pipeline_spec import (
    CompressStep,
    ExplainStep,
    NotebookStep,
    PipelineSpec,
    RegisterStep,
    ReportStep,
    Step,
    TrainStep,
    TuneStep,
    merged_overrides,
    notebook_path,
    resolve,
    step_launcher,
    step_spec_path,
)
from pipelines.specs.spec_io import PROJECT_ROOT, SpecError
from pipelines.tracking import tracking
from pipelines.tracking.tags import Tag

if TYPE_CHECKING:
    from pipelines.kernels.kernel_pool import KernelPool
    from pipelines.specs.launcher_spec import LauncherSpec
    from pipelines.specs.spec import Spec
    from pipelines.study.tune import Study

NOTEBOOKS = PROJECT_ROOT / "notebooks"


class StepFailed(Exception):
    """A step's notebook failed (its run is FAILED, partial notebook attached)."""


@dataclass
class PipelineResult:
    run_id: str
    status: str  # FINISHED | FAILED
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    failed_step: str | None = None
    error: str | None = None


def find_pipeline_run(mlflow: MlflowClient, pipeline: PipelineSpec, run_id: str | None = None) -> str:
    """The given pipeline run, or the latest run of this pipeline."""
    if run_id:
        run = mlflow.get_run(run_id)
        if run.data.tags.get(Tag.PIPELINE) != pipeline.name:
            raise SpecError(f"--pipeline-run {run_id}: not a run of pipeline {pipeline.name!r}")
        return run_id
    experiment = mlflow.get_experiment_by_name(pipeline.experiment_name)
    runs = (
        mlflow.search_runs(
            [experiment.experiment_id],
            filter_string=(
                f"tags.`{Tag.PIPELINE}` = {tracking.literal(pipeline.name)} and tags.`{Tag.KIND}` = 'pipeline'"
            ),
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if experiment
        else []
    )
    if not runs:
        raise SpecError(f"--from: pipeline {pipeline.name!r} has no earlier run to continue")
    return runs[0].info.run_id


def recorded_outputs(mlflow: MlflowClient, run_id: str, prefix: str = Tag.OUTPUTS_PREFIX) -> dict[str, Any]:
    """The JSON tags `<prefix><name>` of a run, by name: a pipeline's step outputs, or a notebook's."""
    tags = mlflow.get_run(run_id).data.tags
    return {k.removeprefix(prefix): json.loads(v) for k, v in tags.items() if k.startswith(prefix)}


class _Runner:
    """Executes one pipeline run's steps; one method per step kind."""

    def __init__(
        self, pipeline: PipelineSpec, path: Path, parent: str, console: Console | None, notebooks: int = 0
    ) -> None:
        self.pipeline, self.path, self.parent, self.console = pipeline, path, parent, console
        self.mlflow = tracking.client()
        self.notebooks = notebooks  # how many steps run a notebook here (tune steps run their own)
        self._pool: KernelPool | None = None
        self.tags = {
            Tag.PIPELINE: pipeline.name,
            Tag.PIPELINE_RUN: parent,
        }

    def say(self, text: str) -> None:
        if self.console:
            self.console.print(text)

    def _spec(self, step: TrainStep | TuneStep, outputs: dict[str, dict[str, Any]]) -> tuple[Spec, Path]:
        from pipelines.specs.spec import load_spec

        path = step_spec_path(step, self.path)
        spec = load_spec(path, merged_overrides(step.set, outputs))
        # Steps log into the pipeline's experiment, so the UI nests them under the pipeline run.
        return spec.model_copy(update={"experiment": self.pipeline.experiment_name}), path

    def kernels(self) -> KernelPool | None:
        """One warm pool for the steps' notebooks, opened at the first: each later step's kernel is
        forked and ready while the step before it runs. None for a single notebook: the pool's
        one-time imports (torch, Lightning, ...) pay back only from the second kernel on."""
        if self._pool is None and self.notebooks >= 2:
            from pipelines.execution import notebook

            self._pool = notebook.warm_kernels(tracking_uri=tracking.tracking_uri(), expected=self.notebooks)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()

    def _notebook(self, notebook: Path, step: Step, params: dict[str, Any]) -> RunResult:
        result = run_notebook(
            notebook,
            params,
            self.pipeline.experiment_name,
            run_name=step.name,
            parent_run_id=self.parent,
            tags={**self.tags, Tag.STEP: step.name},
            progress_bar=False,
            kernels=self.kernels(),
        )
        if result.error:
            raise StepFailed(f"{result.error} (run {result.run_id})")
        return result

    def train(self, step: TrainStep, outputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        from pipelines.execution.run import run_training
        from pipelines.specs.spec import hyperparameters

        spec, path = self._spec(step, outputs)
        launcher = step_launcher(step, spec)
        if launcher is not None:
            return self._train_on_slurm(step, spec, path, launcher)
        result = run_training(
            spec,
            path,
            parent_run_id=self.parent,
            run_name=step.name,
            extra_tags={**self.tags, Tag.STEP: step.name},
            kernels=self.kernels(),
        )
        if result.error:
            raise StepFailed(f"{result.error} (run {result.run_id})")
        return {
            "run_id": result.run_id,
            "model_uri": tracking.model_uri(self.mlflow, result.run_id),
            "metrics": result.metrics,
            "params": hyperparameters(spec.parameters()),
        }

    def tune(self, step: TuneStep, outputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        from pipelines.study import tune

        spec, path = self._spec(step, outputs)
        # One study per pipeline run (resumed, not restarted, by `--from` on the same run).
        name = f"{self.pipeline.name}-{step.name}-{self.parent[:8]}"
        handle = tune.open_study(spec, path, step.n_trials, step.timeout, study_name=name, parent_run_id=self.parent)
        launcher = step_launcher(step, spec)
        result = tune.tune(
            handle, workers=step.workers, register=False, console=self.console, report=step.report,
            launcher=None if launcher is None else _study_on_slurm(launcher, step.workers),
        )  # fmt: skip
        for key, value in {**self.tags, Tag.STEP: step.name}.items():
            self.mlflow.set_tag(result.parent_run_id, key, value)
        if result.counts["COMPLETE"] == 0:
            raise StepFailed(f"no trial of study {name!r} completed (run {result.parent_run_id})")
        return {
            "run_id": result.parent_run_id,
            "study_name": name,
            "best_params": tune.decoded_params(handle.tune, result.best_params),
            "best_value": result.best_value,
            "best_run_id": result.best_run_id,
            "model_uri": tracking.model_uri(self.mlflow, result.best_run_id) if result.best_run_id else None,
        }

    def _train_on_slurm(self, step: TrainStep, spec: Spec, path: Path, launcher: LauncherSpec) -> dict[str, Any]:
        """The train step as one SLURM job (`labbook run --launcher slurm`), its run nested under the pipeline's."""
        from pipelines.launchers import slurm
        from pipelines.specs.spec import hyperparameters

        nodes, devices = slurm.ranks(spec)
        try:
            job = slurm.submit_training(
                spec, path, slurm.SlurmOptions(**launcher.slurm_options()), nodes, devices, run_name=step.name,
                console=self.console, parent_run_id=self.parent, tags={**self.tags, Tag.STEP: step.name},
            )  # fmt: skip
        except slurm.LaunchFailed as exc:
            raise StepFailed(str(exc)) from None
        if job.state != "COMPLETED":
            raise StepFailed(f"SLURM job {job.job_id} ended {job.state}; its log: {job.folder} (run {job.run_id})")
        return {
            "run_id": job.run_id,
            "model_uri": tracking.model_uri(self.mlflow, job.run_id),
            "metrics": dict(self.mlflow.get_run(job.run_id).data.metrics),
            "params": hyperparameters(spec.parameters()),
        }

    def notebook(self, step: NotebookStep, outputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        result = self._notebook(notebook_path(step.notebook, self.path), step, resolve(step.parameters, outputs))
        recorded = recorded_outputs(self.mlflow, result.run_id, Tag.OUTPUT_PREFIX)
        return {"run_id": result.run_id, "metrics": result.metrics, "outputs": recorded}

    def register(self, step: RegisterStep, outputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        params = {
            "candidate_run_id": resolve(step.run, outputs),
            "model_name": step.model_name or self.pipeline.name,
            "metric": step.metric,
            "direction": step.direction,
        }
        result = self._notebook(NOTEBOOKS / "register.ipynb", step, params)
        return {"run_id": result.run_id, **recorded_outputs(self.mlflow, result.run_id, Tag.OUTPUT_PREFIX)}

    def report(self, step: ReportStep, outputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        from pipelines.study import study as studies

        study = resolve(step.study, outputs) if step.study else None
        if study is None:  # the last tune step's study, if the pipeline has one
            tuned = [outputs[s.name] for s in self.pipeline.steps if s.kind == "tune" and s.name in outputs]
            study = tuned[-1]["study_name"] if tuned else ""
        params = {
            "study_name": study,
            "storage": studies.storage_url() if study else "",
            "pipeline_run_id": self.parent,
            "top_k": step.top_k,
        }
        result = self._notebook(NOTEBOOKS / "report.ipynb", step, params)
        # The pipeline's own run carries the report too: what a person opens first.
        for executed in (result.notebook, result.notebook.with_suffix(".html")):
            if executed.exists():
                self.mlflow.log_artifact(self.parent, str(executed), "report")
        return {"run_id": result.run_id}

    def compress(self, step: CompressStep, outputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        params = step.model_dump(exclude={"name", "kind", "retries", "run"})
        result = self._notebook(NOTEBOOKS / "compress.ipynb", step, {**params, **_source(resolve(step.run, outputs))})
        recorded = recorded_outputs(self.mlflow, result.run_id, Tag.OUTPUT_PREFIX)
        return {"run_id": result.run_id, "metrics": result.metrics, "variants": recorded.get("variants", {})}

    def explain(self, step: ExplainStep, outputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        params = step.model_dump(exclude={"name", "kind", "retries", "run"})
        result = self._notebook(NOTEBOOKS / "explain.ipynb", step, {**params, **_source(resolve(step.run, outputs))})
        recorded = recorded_outputs(self.mlflow, result.run_id, Tag.OUTPUT_PREFIX)
        return {"run_id": result.run_id, "artifacts": recorded.get("artifacts", [])}

    def run_step(self, step: Step, outputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The step, tried `1 + retries` times; every attempt stays recorded as its own run."""
        attempts = step.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return getattr(self, step.kind)(step, outputs)
            except StepFailed as exc:
                if attempt == attempts:
                    raise
                self.say(f"[yellow]step {step.name} failed ({exc}); retry {attempt} of {step.retries}[/yellow]")
        raise AssertionError("unreachable")


def _study_on_slurm(launcher: LauncherSpec, workers: int) -> Callable[[Study, str, Console | None], None]:
    """A `tune.tune` launcher: the study's workers as one SLURM job array, driven from this process."""
    from pipelines.launchers import slurm

    options = slurm.SlurmOptions(**launcher.slurm_options())

    def run(handle: Study, parent: str, console: Console | None) -> None:
        try:
            slurm.run_study(handle, parent, console, count=workers, options=options)
        except slurm.LaunchFailed as exc:  # every worker ended with budget left: the step failed
            raise StepFailed(str(exc)) from None

    return run


def _source(ref: str) -> dict[str, str]:
    """A step's `run:` as notebook parameters: a registered model or a run id."""
    return {"model_ref": ref} if ref.startswith(("models:/", "runs:/")) else {"train_run_id": ref}


def _open_parent(
    mlflow: MlflowClient, pipeline: PipelineSpec, path: Path, trigger: str, schedule_id: str | None
) -> str:
    tags = {
        Tag.KIND: "pipeline",
        Tag.PIPELINE: pipeline.name,
        Tag.TRIGGER: trigger,
        Tag.SPEC_PATH: str(path),
        **tracking.provenance_tags(None, path),
    }
    if schedule_id:
        tags[Tag.SCHEDULE_ID] = schedule_id
    parent = tracking.start_run(mlflow, pipeline.experiment_name, run_name=f"pipeline:{pipeline.name}", tags=tags)
    tracking.log_params(mlflow, parent, {"steps": " → ".join(f"{s.name}({s.kind})" for s in pipeline.steps)})
    return parent


def run_pipeline(
    pipeline: PipelineSpec,
    path: Path,
    from_step: str | None = None,
    pipeline_run: str | None = None,
    trigger: str = "manual",
    schedule_id: str | None = None,
    console: Console | None = None,
) -> PipelineResult:
    """Run the pipeline (or, with `from_step`, reopen its last run and go on from that step)."""
    mlflow = tracking.client()
    steps = list(pipeline.steps)
    if not any(s.kind == "report" for s in steps) and pipeline.report:
        steps.append(ReportStep(name="report", kind="report"))
    if from_step:
        start = pipeline.index(from_step)
        parent = find_pipeline_run(mlflow, pipeline, pipeline_run)
        outputs = recorded_outputs(mlflow, parent)
        missing = [s.name for s in steps[:start] if s.name not in outputs]
        if missing:
            raise SpecError(
                f"--from {from_step}: pipeline run {parent} has no recorded outputs of step {missing[0]!r}; "
                f"start from {missing[0]!r}"
            )
        tracking.reopen_run(mlflow, parent)  # this process drives it now (its heartbeat, its pid)
        mlflow.set_tag(parent, Tag.RESUMED_FROM_STEP, from_step)
        if Tag.ERROR in mlflow.get_run(parent).data.tags:
            mlflow.delete_tag(parent, Tag.ERROR)
    else:
        start, outputs = 0, {}
        parent = _open_parent(mlflow, pipeline, path, trigger, schedule_id)
    runner = _Runner(pipeline, path, parent, console, notebooks=sum(s.kind != "tune" for s in steps[start:]))
    runner.say(f"pipeline {pipeline.name!r}: MLflow run {parent} ({trigger})")
    try:
        return _run_steps(runner, steps, start, outputs)
    finally:
        runner.close()


def _run_steps(runner: _Runner, steps: list[Step], start: int, outputs: dict[str, dict[str, Any]]) -> PipelineResult:
    mlflow, parent = runner.mlflow, runner.parent
    result = PipelineResult(parent, "RUNNING", outputs)
    for i, step in enumerate(steps[start:], start=start + 1):
        runner.say(f"[bold]step {i}/{len(steps)}: {step.name} ({step.kind})[/bold]")
        try:
            outputs[step.name] = runner.run_step(step, outputs)
        except (StepFailed, SpecError) as exc:
            mlflow.set_tag(parent, Tag.STEP_STATE_PREFIX + step.name, "FAILED")
            mlflow.set_tag(parent, Tag.FAILED_STEP, step.name)
            result.status, result.failed_step, result.error = "FAILED", step.name, f"step {step.name} failed: {exc}"
            tracking.finish_run(mlflow, parent, result.error)
            return result
        except BaseException as exc:  # Ctrl-C, SIGTERM or a bug: close the run, keep what is recorded
            reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
            mlflow.set_tag(parent, Tag.STEP_STATE_PREFIX + step.name, "FAILED")
            tracking.finish_run(mlflow, parent, f"step {step.name}: {reason}")
            raise
        mlflow.set_tag(parent, Tag.OUTPUTS_PREFIX + step.name, json.dumps(outputs[step.name], default=str))
        mlflow.set_tag(parent, Tag.STEP_STATE_PREFIX + step.name, "FINISHED")
        runner.say(f"step {step.name} done: " + ", ".join(f"{k}={_short(v)}" for k, v in outputs[step.name].items()))
    tracking.finish_run(mlflow, parent)
    result.status = "FINISHED"
    return result


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if isinstance(value, dict | list) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."
