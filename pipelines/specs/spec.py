"""Pipeline specs: YAML → validated pydantic objects → the flat parameter dict a notebook takes.

Validated once, at the edge: unknown keys, wrong types, out-of-range values and unknown
model/data names are one-line `SpecError`s naming the field, before anything runs.
The sections (`model`, `data`, `optim`, `trainer`) only group names for people; every name
is unique across them, and `Spec.parameters()` flattens them into the dict the train notebook's
`parameters` cell, the LightningModule's hparams and the MLflow params all share.
"""

from __future__ import annotations

import importlib.util
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from lightning_modules import catalog, settings
from lightning_modules.catalog import DERIVED_FROM_DATA, DERIVED_FROM_MODEL, check_fit
from lightning_modules.settings import checked_type
from pipelines.errors import listing
from pipelines.specs import spec_yaml
from pipelines.specs.launcher_spec import LauncherSpec
from pipelines.specs.spec_io import (
    MAX_EXPERIMENT,
    MAX_NAME,
    PROJECT_ROOT,
    SpecError,
    bounded,
    check_notebook,
    one_line,
    read_yaml,
    shown,
)
from pipelines.specs.tune_spec import TuneSpec

DEFAULT_NOTEBOOK = "notebooks/train.ipynb"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


# Every number below is checked as `lightning_modules.settings` checks a constructor's: no boolean
# passes as a number (`max_epochs: true` is refused, not taken as 1) and floats are finite.
Int = checked_type(int)
Float = checked_type(float)
Bool = checked_type(bool)


class OptimSpec(_Strict):
    """The optimizer settings every model takes: declared once, on `TrainableModule.__init__`.

    These fields use the same declarations (`lightning_modules.settings`); `tests/test_spec.py`
    fails when their types or defaults drift from the catalog's.
    """

    optimizer: checked_type(settings.Optimizer) = "adamw"
    lr: checked_type(settings.PositiveFloat) = 1e-3
    momentum: checked_type(settings.Momentum) = 0.9
    weight_decay: checked_type(settings.NonNegativeFloat) = 0.0
    l1: checked_type(settings.NonNegativeFloat) = 0.0
    scheduler: checked_type(settings.Scheduler) = "none"
    warmup_epochs: checked_type(settings.NonNegativeInt) = 0
    step_size: checked_type(settings.PositiveInt) = 10
    gamma: checked_type(settings.Gamma) = 0.1


# Lightning's strategies by name, known without importing Lightning; any other name is looked up
# in Lightning's own registry (seconds) before it is accepted or refused with the full list.
_COMMON_STRATEGIES = frozenset({"auto", "ddp", "ddp_spawn", "ddp_notebook", "ddp_fork", "fsdp", "deepspeed"})


def _strategies() -> list[str]:
    from lightning.pytorch.strategies import StrategyRegistry

    return ["auto", *StrategyRegistry.available_strategies()]


_ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")


def _package_needed(name: str) -> str | None:
    """The package an accelerator or strategy needs beyond torch and Lightning (`tpu`, `xla*`: torch_xla;
    `deepspeed*`: deepspeed), when it is not installed here: Lightning fails without it once the run has
    started. Looked up with `find_spec`, never imported. A GPU is never asked for: specs for a cluster are
    checked on its login node."""
    package = "deepspeed" if name.startswith("deepspeed") else "torch_xla" if "xla" in name or "tpu" in name else None
    return package if package is not None and importlib.util.find_spec(package) is None else None


class TrainerSpec(_Strict):
    max_epochs: Int = Field(10, ge=1)
    accelerator: Literal[_ACCELERATORS] = "auto"
    devices: checked_type(int | str | list[int]) = "auto"
    num_nodes: Int = Field(1, ge=1)
    # Lightning's own names: auto, ddp, ddp_spawn, ddp_notebook, fsdp, deepspeed, ... (checked below).
    # In a notebook, ddp/ddp_spawn/fsdp run through fork (see pipelines.nb.in_notebook.strategy).
    strategy: str = "auto"
    precision: Literal["32-true", "32", "64-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true"] = "32-true"
    seed: checked_type(settings.Seed) = 42  # the data module's seed too: one declaration
    accumulate_grad_batches: Int = Field(1, ge=1)
    gradient_clip_val: Float | None = Field(None, gt=0)  # null: no clipping
    compile: Bool = False  # torch.compile the model before fitting
    early_stopping_patience: Int | None = Field(None, ge=1)  # epochs without improvement of the monitor
    enable_progress_bar: Bool = True
    # "last": resume this training from the last checkpoint a crashed attempt left (a re-run of the
    # same settings, or a retried trial), the epoch count continuing; or a .ckpt file to start from.
    ckpt_path: str | None = None

    @field_validator("ckpt_path")
    @classmethod
    def _resumable(cls, value: str | None) -> str | None:
        if value is None or value == "last":
            return value
        if not value.endswith(".ckpt"):
            raise ValueError(f"expected 'last' or a path to a .ckpt file, got {shown(value)}")
        # The kernel runs in this folder, so Lightning reads a relative path from here too. A URL
        # (s3://...) is Lightning's fsspec to read; a folder is a sharded (DeepSpeed, FSDP) checkpoint.
        if "://" not in value and not Path(value).exists():
            raise ValueError(
                f"no such file {shown(value)} (read from {shown(str(Path.cwd()))}, as the run reads it); "
                "expected 'last' or an existing .ckpt file"
            )
        return value

    @field_validator("accelerator")
    @classmethod
    def _accelerator_installed(cls, value: str) -> str:
        package = _package_needed(value)
        if package:
            usable = [a for a in _ACCELERATORS if _package_needed(a) is None]
            raise ValueError(
                f"accelerator {value!r} needs the {package} package, not installed here; allowed: {', '.join(usable)}"
            )
        return value

    @field_validator("devices")
    @classmethod
    def _lightning_devices(cls, value: int | str | list[int]) -> int | str | list[int]:
        # Lightning's `devices` (Trainer docs): a count > 0, -1 (all), "auto", or which devices: a
        # non-empty list of distinct indices >= 0, or the same as text ("2", "-1", "0,1").
        allowed = 'expected a positive int, -1 (all), "auto", or a non-empty list of distinct device indices >= 0'
        if isinstance(value, str):
            text = value.strip()
            if text == "auto" or re.fullmatch(r"-1|0*[1-9][0-9]*", text):
                return value
            parts = text.rstrip(",").split(",") if "," in text else []
            if parts and all(part.strip().isdigit() for part in parts):
                indices = [int(part) for part in parts]
                if len(set(indices)) == len(indices):
                    return value
            raise ValueError(f"{value[:40]!r} is not a devices setting; {allowed}")
        if isinstance(value, list):
            if value and all(i >= 0 for i in value) and len(set(value)) == len(value):
                return value
            raise ValueError(f"{str(value)[:40]} is not a devices setting; {allowed}")
        if value == -1 or value >= 1:
            return value
        raise ValueError(f"{value} is not a devices setting; {allowed}")

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        if value in _COMMON_STRATEGIES and not _package_needed(value):
            return value
        known = _strategies()
        if value not in known:
            raise ValueError(f"unknown strategy {shown(value)}; allowed: {listing(known, value)}")
        package = _package_needed(value)
        if package:
            usable = [s for s in known if not _package_needed(s) and "_find_unused_parameters_" not in s]
            raise ValueError(
                f"strategy {value!r} needs the {package} package, not installed here; allowed: {', '.join(usable)} "
                "(and their _find_unused_parameters_ variants)"
            )
        return value

    @model_validator(mode="after")
    def _cpu_devices_are_a_count(self) -> TrainerSpec:
        # Lightning's CPUAccelerator takes only a number of processes: -1 or a list of indices fail.
        devices = str(self.devices).strip()
        if self.accelerator == "cpu" and devices != "auto" and not re.fullmatch(r"0*[1-9][0-9]*", devices):
            raise ValueError(
                f'accelerator cpu takes devices as a positive int or "auto" (a process count), got {devices[:40]}'
            )
        return self

    @model_validator(mode="after")
    def _fsdp_needs_a_gpu(self) -> TrainerSpec:
        if self.strategy.startswith("fsdp") and self.accelerator not in ("auto", "gpu", "cuda"):
            # Lightning's FSDPStrategy takes only a CUDA accelerator (torch's FSDP itself runs on gloo): DDP there.
            raise ValueError(
                f"strategy fsdp needs a GPU (Lightning's FSDP strategy refuses accelerator {self.accelerator}); "
                "use accelerator gpu, or ddp on CPU"
            )
        return self


class _Named(BaseModel):
    """A section with a registry `name` plus that class's own constructor arguments."""

    model_config = ConfigDict(extra="allow")
    name: str

    _kind: typing.ClassVar[str]
    _common: typing.ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="after")
    def _check_arguments(self) -> _Named:
        # The catalog's lookup says "unknown model 'x'; known: ..." for an unknown name.
        entry = catalog.entry(self._kind, self.name)
        derived = DERIVED_FROM_DATA if self._kind == "model" else DERIVED_FROM_MODEL
        own = [n for n in entry.settings if n not in derived and n not in self._common and n not in _OTHER_SECTIONS]
        extra = dict(self.__pydantic_extra__ or {})
        unknown = sorted(set(extra) - set(own))
        if unknown:
            allowed = ", ".join(["name", *sorted(self._common), *sorted(own)])
            raise ValueError(f"{unknown[0]!r} is not a setting of {self._kind} {self.name!r}; allowed: {allowed}")
        hints = entry.types() if extra else {}
        fields: dict[str, Any] = {n: (checked_type(hints.get(n, Any)), ...) for n in extra}
        checked = create_model(f"{self.name}_settings", __config__=ConfigDict(extra="forbid"), **fields)
        values = checked.model_validate(extra).model_dump()
        # Plain lists for sequences, so YAML, notebooks and MLflow params all show the same value.
        self.__pydantic_extra__ = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
        return self


class ModelSpec(_Named):
    _kind = "model"
    _common = frozenset({"dropout"})
    dropout: checked_type(settings.Dropout) = 0.0


class DataSpec(_Named):
    _kind = "data"
    _common = frozenset({"batch_size"})
    batch_size: checked_type(settings.PositiveInt) = 64


# Names owned by another section: `seed` lives in `trainer` and reaches the data module from there.
_OTHER_SECTIONS = frozenset(OptimSpec.model_fields) | frozenset(TrainerSpec.model_fields)


class Spec(_Strict):
    """One pipeline: what to train, on what, how, and where it is tracked."""

    name: str = Field(min_length=1, max_length=MAX_NAME)
    description: str = ""
    experiment: str | None = Field(None, min_length=1, max_length=MAX_EXPERIMENT)
    notebook: str = DEFAULT_NOTEBOOK
    model: ModelSpec
    data: DataSpec
    optim: OptimSpec = OptimSpec()
    trainer: TrainerSpec = TrainerSpec()
    tune: TuneSpec | None = None
    launcher: LauncherSpec | None = None

    @model_validator(mode="after")
    def _model_fits_data(self) -> Spec:
        check_fit(self.model.name, self.data.name)
        return self

    @model_validator(mode="after")
    def _rules_between_settings(self) -> Spec:
        """The model's and the data's rules (`val_fraction + test_fraction < 1`, ...), as their classes run them."""
        params = self.parameters()
        for kind in ("model", "data"):
            entry = catalog.entry(kind, params[kind])
            entry.check_rules({k: params[k] for k in entry.settings if k in params})
        return self

    @model_validator(mode="after")
    def _tune_fits_spec(self) -> Spec:
        """Every searched name is a setting, every endpoint and choice a valid value for it."""
        if self.tune is None:
            return self
        metrics = catalog.fit_metric_names(self.model.name)
        if self.tune.metric not in metrics:
            raise ValueError(
                f"tune.metric {self.tune.metric!r}: the pruner and checkpoints need a metric {self.model.name} logs "
                f"each epoch while it trains; known: {', '.join(metrics)}"
            )
        base = self.model_copy(update={"tune": None})
        for name, dist in self.tune.space.items():
            if name in ("model", "data"):
                raise ValueError(f"tune.space.{name}: search one model on one data set; {name} cannot be searched")
            for value in dist.endpoints():
                try:
                    base.with_overrides({name: value})
                except SpecError as exc:
                    raise ValueError(f"tune.space.{name}: {exc}") from None
                except ValidationError as exc:
                    problem = exc.errors()[0]["msg"].removeprefix("Value error, ")
                    raise ValueError(f"tune.space.{name}: value {value!r} is invalid: {problem}") from None
        return self

    @property
    def experiment_name(self) -> str:
        return self.experiment or self.name

    def notebook_path(self, base: Path | None = None) -> Path:
        """The notebook, relative to the project root unless absolute (or found beside the spec)."""
        path = Path(self.notebook)
        if path.is_absolute():
            return path
        for root in (PROJECT_ROOT, base or Path.cwd()):
            if (root / path).exists():
                return root / path
        return PROJECT_ROOT / path

    def parameters(self) -> dict[str, Any]:
        """The flat dict of notebook parameters: one name per setting, as in the notebook."""
        model = self.model.model_dump()
        data = self.data.model_dump()
        return {
            "model": model.pop("name"),
            "data": data.pop("name"),
            **model,
            **data,
            **self.optim.model_dump(),
            **self.trainer.model_dump(),
        }

    def with_overrides(self, overrides: dict[str, Any]) -> Spec:
        """A new, re-validated spec with flat `name=value` overrides placed in their sections."""
        raw = self.model_dump()
        for key, value in overrides.items():
            if key in ("model", "data"):
                raw[key]["name"] = value
            elif key in Spec.model_fields:
                raw[key] = value
            else:
                raw[self._section_of(key)][key] = value
        return Spec.model_validate(raw)

    def _section_of(self, key: str) -> str:
        if key in OptimSpec.model_fields:
            return "optim"
        if key in TrainerSpec.model_fields:
            return "trainer"
        if key in ModelSpec.model_fields or key in catalog.entry("model", self.model.name).settings:
            return "model"
        if key in DataSpec.model_fields or key in catalog.entry("data", self.data.name).settings:
            return "data"
        known = sorted(set(self.parameters()) - {"model", "data"})
        raise SpecError(f"--set {shown(key)}: unknown setting; known: {listing(known, key)}")


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> Spec:
    """Read and validate a spec file; every problem is a one-line `SpecError`."""
    path = Path(path)
    raw = read_yaml(path)
    if isinstance(raw, dict) and "steps" in raw:
        raise SpecError(f"{path}: steps: this is a pipeline spec; it has no single model to train here")
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping of settings at the top level")
    try:
        spec = Spec.model_validate(raw)
        if overrides:
            spec = spec.with_overrides(overrides)
    except ValidationError as exc:
        raise SpecError(one_line(exc, str(path))) from None
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from None
    check_notebook(spec.notebook_path(path.parent), spec.notebook, f"{path}: ")
    return spec


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["lr=0.01", "hidden_sizes=[32, 32]"]` → `{"lr": 0.01, "hidden_sizes": [32, 32]}` (YAML values)."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"--set {pair!r}: expected key=value")
        try:
            overrides[key.strip()] = spec_yaml.load(value)
        except (yaml.YAMLError, RecursionError) as exc:
            problem = exc.message if isinstance(exc, spec_yaml.SpecYAMLError) else "value is not valid YAML"
            raise SpecError(bounded(f"--set {shown(pair)}: {problem}")) from None
    return overrides


# Parameters of the train notebook that say where a run is tracked and which study trial it is,
# not what is trained: never logged as hyperparameters.
TRACKING_PARAMETERS = (
    "tracking_uri",
    "experiment_name",
    "run_name",
    "run_id",
    "parent_run_id",
    "output_dir",
    "optuna_storage",
    "study_name",
    "trial_number",
    "monitor",
    "monitor_mode",
    "checkpoint_dir",
    "artifacts_dir",
    "defer_model",
)


def _setting_names(models: list[str], datas: list[str]) -> set[str]:
    """Every setting those models and data sets take, plus the sections' own; never derived ones.

    A model setting the data also reads (`block_size`) stays a setting: it is derived only for the data.
    """
    model_names = {n for m in models for n in catalog.entry("model", m).settings} - set(DERIVED_FROM_DATA)
    data_names = {n for d in datas for n in catalog.entry("data", d).settings} - set(DERIVED_FROM_MODEL)
    return (
        {"model", "data", "dropout", "batch_size"}
        | model_names
        | data_names
        | set(OptimSpec.model_fields)
        | set(TrainerSpec.model_fields)
    )


def hyperparameters(params: dict[str, Any]) -> dict[str, Any]:
    """The settings that shape the chosen model and data: what a run logs as MLflow params.

    A CNN run does not log `hidden_sizes`, a digits run does not log `noise`.
    """
    names = _setting_names([params["model"]], [params["data"]])
    return {k: v for k, v in params.items() if k in names}


def notebook_parameters(namespace: dict[str, Any]) -> dict[str, Any]:
    """The notebook's settings, picked by name from its namespace (`globals()`), as one dict.

    Every name a spec can set, any registered model or data class accepts, or that says where
    the run is tracked; so the parameters cell stays plain assignments.
    """
    names = _setting_names(catalog.names("model"), catalog.names("data")) | set(TRACKING_PARAMETERS)
    return {k: namespace[k] for k in sorted(names) if k in namespace}
