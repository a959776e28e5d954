"""Pipeline specs with `steps:`: validated once, references included, before anything runs.

A pipeline is an ordered list of steps, each executed as a notebook run. A step uses an
earlier step's outputs through one syntax, `${step.output}` or `${step.output.key}`:

    set:
      - ${search.best_params}      # a whole mapping, merged
      - {max_epochs: 30}
    parameters: {train_run_id: "${retrain.run_id}"}

A value that is exactly one reference takes the referenced value as it is (a number stays a
number, a mapping a mapping); a reference inside a longer string is replaced by its text.
Unknown steps, later steps and outputs a step kind does not produce are `SpecError`s here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lightning_modules.settings import checked_type

if TYPE_CHECKING:
    from pipelines.specs.spec import Spec

from pipelines.specs.launcher_spec import LauncherSpec
from pipelines.specs.spec_io import (
    MAX_EXPERIMENT,
    MAX_NAME,
    PROJECT_ROOT,
    SpecError,
    check_notebook,
    one_line,
    read_yaml,
    shown,
)

REFERENCE = re.compile(r"\$\{([A-Za-z_][\w-]*)\.([A-Za-z_]\w*)(?:\.([A-Za-z_]\w*))?\}")
STEP_NAME = r"^[A-Za-z_][\w-]*$"

# What each step kind records for later steps; the mappings among them can be indexed by key.
OUTPUTS: dict[str, set[str]] = {
    "train": {"run_id", "model_uri", "metrics", "params"},
    "tune": {"run_id", "study_name", "best_params", "best_value", "best_run_id", "model_uri"},
    "notebook": {"run_id", "metrics", "outputs"},
    "register": {"run_id", "model_name", "version", "promoted", "champion_version", "model_uri"},
    "report": {"run_id"},
    "compress": {"run_id", "metrics", "variants"},
    "explain": {"run_id", "artifacts"},
}
MAPPINGS = {"metrics", "params", "best_params", "outputs", "variants"}

# The outputs that name a trained model, which a step's `run:` takes: a register step needs the
# training run itself (it reads the run's metrics); compress and explain also take a model URI.
# A study's own run (`tune.run_id`) holds no model, its best trial's run does. A notebook step's
# outputs are whatever that notebook recorded: not judged here.
MODEL_RUNS: dict[str, set[str]] = {"train": {"run_id"}, "tune": {"best_run_id"}}
MODEL_REFS: dict[str, set[str]] = {
    "train": {"run_id", "model_uri"},
    "tune": {"best_run_id", "model_uri"},
    "register": {"model_uri"},
}
# A notebook parameter whose comment is only its choices (`split = "test"  # test | val`) takes one of them.
CHOICES = re.compile(r"[\w.-]+(?: \| [\w.-]+)+")

# Numbers as every setting is checked (lightning_modules.settings): a boolean is never a number
# (`n_trials: true` is refused, not taken as 1), floats are finite; a boolean is `true`/`false` only.
Int = checked_type(int)
Float = checked_type(float)
Bool = checked_type(bool)


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=STEP_NAME)
    retries: Int = Field(0, ge=0, le=10)


Overrides = dict[str, Any] | str | list[dict[str, Any] | str]


class TrainStep(_Step):
    """The train notebook on a training spec, with overrides (which may be references)."""

    kind: Literal["train"]
    spec: str
    set: Overrides = Field(default_factory=dict)
    launcher: LauncherSpec | None = None  # where it trains (replaces the spec's `launcher:`); one SLURM job


class TuneStep(_Step):
    """An Optuna study of the spec's `tune:` section; the budget may be set smaller here."""

    kind: Literal["tune"]
    spec: str
    set: Overrides = Field(default_factory=dict)
    n_trials: Int | None = Field(None, ge=1)
    timeout: Float | None = Field(None, gt=0)
    workers: Int = Field(1, ge=1)  # with a SLURM launcher: the job array's tasks
    report: Bool = True  # the study's own report notebook on the study's run
    launcher: LauncherSpec | None = None  # where its workers run (replaces the spec's `launcher:`)


class NotebookStep(_Step):
    """Any notebook, with parameters by name (checked against its `parameters` cell)."""

    kind: Literal["notebook"]
    notebook: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class RegisterStep(_Step):
    """Register a run's model; move the `champion` alias only if it beats the current one."""

    kind: Literal["register"]
    run: str  # a run id, usually `${retrain.run_id}`
    metric: str
    direction: Literal["maximize", "minimize"] = "maximize"
    model_name: str | None = Field(None, min_length=1, max_length=MAX_NAME)  # default: the pipeline's name


class ReportStep(_Step):
    """The report notebook: the pipeline's steps side by side, and the study's plots if any."""

    kind: Literal["report"]
    study: str | None = None  # default: the last tune step's study
    top_k: Int = Field(5, ge=1)


class CompressStep(_Step):
    """Quantize, prune and/or distill a trained model; each variant measured, as nested runs."""

    kind: Literal["compress"]
    run: str  # a run id (`${train.run_id}`) or a registered model (`models:/name@alias`)
    methods: list[Literal["quantize", "prune", "distill"]] = Field(min_length=1)
    sparsity: Float = Field(0.5, gt=0, lt=1)
    finetune_epochs: Int = Field(1, ge=0)
    student: dict[str, Any] = Field(default_factory=lambda: {"hidden_sizes": [16]})
    alpha: Float = Field(0.5, ge=0, le=1)
    temperature: Float = Field(1.0, gt=0)
    distill_epochs: Int = Field(10, ge=1)
    latency_repeats: Int = Field(30, ge=3)


class ExplainStep(_Step):
    """Attributions for a trained model's predictions, and its attention maps where it has attention."""

    kind: Literal["explain"]
    run: str
    method: Literal["integrated_gradients", "saliency"] = "integrated_gradients"
    samples: Int = Field(8, ge=1, le=64)
    n_steps: Int = Field(32, ge=2)  # integrated gradients: points on the path from the baseline
    window: Int = Field(48, ge=1)  # gpt: tokens of the test window whose attention is drawn


Step = Annotated[
    TrainStep | TuneStep | NotebookStep | RegisterStep | ReportStep | CompressStep | ExplainStep,
    Field(discriminator="kind"),
]
STEP_KINDS = tuple(OUTPUTS)


class PipelineSpec(BaseModel):
    """A named, ordered list of steps, tracked as one MLflow parent run per pipeline run."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=MAX_NAME)
    description: str = ""
    experiment: str | None = Field(None, min_length=1, max_length=MAX_EXPERIMENT)
    steps: list[Step] = Field(min_length=1)
    report: Bool = True  # a report on the parent run at the end, when no step is a report

    @model_validator(mode="before")
    @classmethod
    def _known_kind(cls, raw: Any) -> Any:
        """An unknown kind gets one line listing the known ones, not pydantic's union noise."""
        for i, step in enumerate(raw.get("steps") or [] if isinstance(raw, dict) else []):
            if isinstance(step, dict) and step.get("kind") not in STEP_KINDS:
                raise ValueError(f"steps.{i}.kind: got {step.get('kind')!r}; expected one of {', '.join(STEP_KINDS)}")
        return raw

    @model_validator(mode="after")
    def _unique_names(self) -> PipelineSpec:
        seen: set[str] = set()
        for step in self.steps:
            if step.name in seen:
                raise ValueError(f"steps: two steps are named {step.name!r}; step names must be unique")
            seen.add(step.name)
        return self

    @property
    def experiment_name(self) -> str:
        return self.experiment or self.name

    def step(self, name: str) -> Step:
        for step in self.steps:
            if step.name == name:
                return step
        raise SpecError(f"--from {name}: no such step; steps: {', '.join(s.name for s in self.steps)}")

    def index(self, name: str) -> int:
        return self.steps.index(self.step(name))


def references(value: Any) -> list[tuple[str, str, str | None]]:
    """Every `(step, output, key)` referenced anywhere inside `value`."""
    if isinstance(value, str):
        if "${" in value and not REFERENCE.search(value):
            raise SpecError(f"malformed reference {value!r}; expected ${{step.output}} or ${{step.output.key}}")
        return [m.groups() for m in REFERENCE.finditer(value)]
    if isinstance(value, dict):
        return [r for v in value.values() for r in references(v)]
    if isinstance(value, list):
        return [r for v in value for r in references(v)]
    return []


def resolve(value: Any, outputs: dict[str, dict[str, Any]]) -> Any:
    """`value` with every reference replaced by the recorded output it names."""
    if isinstance(value, str):
        whole = REFERENCE.fullmatch(value)
        if whole:
            return _lookup(outputs, *whole.groups())
        return REFERENCE.sub(lambda m: str(_lookup(outputs, *m.groups())), value)
    if isinstance(value, dict):
        return {k: resolve(v, outputs) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, outputs) for v in value]
    return value


def _lookup(outputs: dict[str, dict[str, Any]], step: str, output: str, key: str | None) -> Any:
    try:
        found = outputs[step][output]
        return found[key] if key is not None else found
    except (KeyError, TypeError):
        where = f"{step}.{output}" + (f".{key}" if key else "")
        raise SpecError(f"${{{where}}}: step {step!r} recorded no such output") from None


def merged_overrides(overrides: Overrides, outputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A step's `set:` (a mapping, a reference to one, or a list of both) as one flat dict."""
    resolved = resolve(overrides, outputs)
    parts = resolved if isinstance(resolved, list) else [resolved]
    merged: dict[str, Any] = {}
    for part in parts:
        if not isinstance(part, dict):
            raise SpecError(f"set: expected a mapping of settings, got {part!r}")
        merged |= part
    return merged


def _check_references(pipeline: PipelineSpec, path: Path) -> None:
    """Each reference names an earlier step and an output that step's kind records."""
    kinds = {s.name: s.kind for s in pipeline.steps}
    for i, step in enumerate(pipeline.steps):
        earlier = {s.name for s in pipeline.steps[:i]}
        try:
            found = references(step.model_dump())
        except SpecError as exc:
            raise SpecError(f"{path}: steps.{step.name}: {exc}") from None
        for name, output, key in found:
            where = f"{path}: steps.{step.name}: ${{{name}.{output}{'.' + key if key else ''}}}"
            if name not in kinds:
                raise SpecError(f"{where}: unknown step {name!r}; steps: {', '.join(kinds)}")
            if name not in earlier:
                raise SpecError(f"{where}: step {name!r} does not run before {step.name!r}")
            allowed = OUTPUTS[kinds[name]]
            if output not in allowed:
                known = ", ".join(sorted(allowed))
                raise SpecError(f"{where}: a {kinds[name]} step has no output {output!r}; outputs: {known}")
            if key is not None and output not in MAPPINGS:
                raise SpecError(f"{where}: {output!r} is a single value, not a mapping with keys")


def _check_step(pipeline: PipelineSpec, step: Step, path: Path, specs: dict[str, Spec]) -> None:
    """Load the step's own spec or notebook now, so a typo there also stops the pipeline up front."""
    where = f"{path}: steps.{step.name}"
    if isinstance(step, TrainStep | TuneStep):
        from pipelines.specs.spec import load_spec  # torch and Lightning: only for steps that train

        spec_path = step_spec_path(step, path)
        try:
            spec = load_spec(spec_path)
        except SpecError as exc:
            raise SpecError(f"{where}.spec: {exc}") from None
        if isinstance(step, TuneStep) and spec.tune is None:
            raise SpecError(f"{where}.spec: {spec_path} has no tune: section to search with")
        static = [part for part in (step.set if isinstance(step.set, list) else [step.set]) if isinstance(part, dict)]
        known = set(spec.parameters()) - {"model", "data"}
        for part in static:
            for key in part:
                if key not in known:
                    raise SpecError(f"{where}.set.{key}: unknown setting; known: {', '.join(sorted(known))}")
        try:
            values = {k: v for part in static for k, v in part.items() if not references(v)}
            spec.with_overrides(values)
        except (SpecError, ValidationError) as exc:
            message = one_line(exc, where + ".set") if isinstance(exc, ValidationError) else f"{where}.set: {exc}"
            raise SpecError(message) from None
        specs[step.name] = spec
        for name, output, key in references(step.set):
            source = specs.get(name)
            if output == "best_params" and key is None and source is not None and source.tune is not None:
                unknown = sorted(set(source.tune.space) - known)
                if unknown:
                    raise SpecError(f"{where}.set: ${{{name}.best_params}} holds {unknown[0]!r}, not a setting here")
    elif isinstance(step, CompressStep) and step.student:
        from lightning_modules import catalog

        models = catalog.names("model")
        model = step.student.get("model")
        if model is not None and model not in models:
            raise SpecError(f"{where}.student.model: got {model!r}; expected one of {', '.join(models)}")
        known = {"model"} | {n for m in models for n in catalog.entry("model", m).settings}
        for key in step.student:
            if key not in known:
                raise SpecError(f"{where}.student.{key}: not a model setting; known: {', '.join(sorted(known))}")
        from lightning_modules.settings import check_value

        declared = catalog.entry("model", model).types() if model else {}
        for m in models:  # without a model named, each setting as the first model that takes it declares it
            declared = {**catalog.entry("model", m).types(), **declared}
        for key, value in step.student.items():
            if key != "model" and not references(value):
                try:
                    check_value(key, declared[key], value)
                except ValueError as exc:
                    raise SpecError(f"{where}.student.{exc}") from None
    elif isinstance(step, NotebookStep):
        notebook = notebook_path(step.notebook, path)
        check_notebook(notebook, step.notebook, f"{where}.")
        import papermill

        declared = papermill.inspect_notebook(str(notebook))
        for key, value in step.parameters.items():
            if key not in declared:
                known = ", ".join(sorted(declared))
                raise SpecError(f"{where}.parameters.{key}: not a parameter of {step.notebook}; known: {known}")
            choices = _choices(declared[key])
            if choices and not references(value) and value not in choices:
                raise SpecError(f"{where}.parameters.{key}: got {shown(value)}; expected one of {', '.join(choices)}")
    if isinstance(step, RegisterStep | CompressStep | ExplainStep):
        model = _trained_model(pipeline, step, where, specs)
        whole = REFERENCE.fullmatch(step.run)
        from_notebook = whole is not None and pipeline.step(whole.group(1)).kind == "notebook"
        if isinstance(step, RegisterStep) and not from_notebook:  # a notebook's run logs what it likes
            _check_metric(step.metric, model, f"{where}.metric")


def _choices(parameter: dict[str, Any]) -> list[str]:
    """The values a notebook's string parameter lists in its comment (`split = "test"  # test | val`), or []."""
    help_text = (parameter.get("help") or "").strip()
    if not str(parameter.get("default", "")).startswith(("'", '"')) or not CHOICES.fullmatch(help_text):
        return []
    return help_text.split(" | ")


def _trained_model(
    pipeline: PipelineSpec, step: RegisterStep | CompressStep | ExplainStep, where: str, specs: dict[str, Spec]
) -> str | None:
    """The model a step's `run:` reference trains (None: a run id, a registered model, a notebook's output).

    A reference to an output that names no trained model (a study's own run, a report's) is refused.
    """
    whole = REFERENCE.fullmatch(step.run)
    if whole is None:
        return None
    name, output, _ = whole.groups()
    kind = pipeline.step(name).kind
    table = MODEL_RUNS if isinstance(step, RegisterStep) else MODEL_REFS
    if kind != "notebook" and output not in table.get(kind, ()):
        takes = "; ".join(f"{k} {', '.join(sorted(v))}" for k, v in table.items())
        raise SpecError(f"{where}.run: ${{{name}.{output}}} names no trained model; a {step.kind} step takes ({takes})")
    spec = specs.get(name)
    return spec.model.name if spec is not None and kind in MODEL_RUNS else None


def _check_metric(metric: str, model: str | None, where: str) -> None:
    """`metric` is one the model logs (`<split>_<metric>`, test ones after fitting); any model's when unknown."""
    from lightning_modules import catalog

    if model is not None:
        known = catalog.metric_names(model)
        if metric not in known:
            raise SpecError(f"{where}: got {shown(metric)}; {model} logs {', '.join(known)}")
        return
    known = sorted({m for name in catalog.names("model") for m in catalog.metric_names(name)})
    if metric not in known:
        raise SpecError(f"{where}: got {shown(metric)}; the models log {', '.join(known)}")


def step_launcher(step: TrainStep | TuneStep, spec: Spec) -> LauncherSpec | None:
    """Where a train or tune step runs: its own `launcher:`, else its spec's; None for this machine."""
    launcher = step.launcher or spec.launcher
    return launcher if launcher is not None and launcher.name != "local" else None


def step_spec_path(step: TrainStep | TuneStep, pipeline_path: Path) -> Path:
    """A step's training spec: beside the pipeline file, else relative to the project."""
    for base in (pipeline_path.parent, PROJECT_ROOT, Path.cwd()):
        candidate = base / step.spec
        if candidate.is_file():
            return candidate
    return pipeline_path.parent / step.spec


def notebook_path(name: str, pipeline_path: Path) -> Path:
    """A notebook: relative to the project (`notebooks/x.ipynb`), else beside the pipeline file."""
    for base in (PROJECT_ROOT, pipeline_path.parent, Path.cwd()):
        if (base / name).is_file():
            return base / name
    return PROJECT_ROOT / name


def is_pipeline(raw: Any) -> bool:
    return isinstance(raw, dict) and "steps" in raw


def load_pipeline(path: str | Path) -> PipelineSpec:
    """Read and validate a pipeline spec, its steps' specs and notebooks, and every reference."""
    path = Path(path)
    raw = read_yaml(path)
    if not is_pipeline(raw):
        raise SpecError(f"{path}: steps: a pipeline spec needs a steps: list")
    try:
        pipeline = PipelineSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(one_line(exc, str(path))) from None
    _check_references(pipeline, path)
    specs: dict[str, Spec] = {}
    for step in pipeline.steps:
        _check_step(pipeline, step, path, specs)
    return pipeline
