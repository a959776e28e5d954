"""The `tune:` section of a spec: what to optimize, over which space, with which sampler and pruner.

Plain pydantic data. The names in `space` are the same settings `--set` takes; `Spec` checks
each range's endpoints and choices against the rest of the spec, so every trial is valid.
"""

from __future__ import annotations

import importlib.util
import json
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lightning_modules import settings
from lightning_modules.settings import checked_type
from pipelines.specs.spec_io import MAX_NAME


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Every number here is checked as every setting is (lightning_modules.settings): never a boolean
# (`n_trials: true` is refused, not taken as 1), floats finite; a boolean is only `true`/`false`.
Float = checked_type(float)
Int = checked_type(int)
Bool = checked_type(bool)


class FloatRange(_Strict):
    type: Literal["float"]
    low: Float
    high: Float
    log: Bool = False
    step: Float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> FloatRange:
        _check_range(self.low, self.high, self.log)
        if self.log and self.step is not None:
            raise ValueError("step cannot be combined with log scale")
        return self

    def endpoints(self) -> list[Any]:
        return [self.low, self.high]

    def describe(self) -> str:
        return f"float [{self.low:g}, {self.high:g}]{' log' if self.log else ''}"


class IntRange(_Strict):
    type: Literal["int"]
    low: Int
    high: Int
    log: Bool = False
    step: Int = Field(1, ge=1)

    @model_validator(mode="after")
    def _check(self) -> IntRange:
        _check_range(self.low, self.high, self.log)
        return self

    def endpoints(self) -> list[Any]:
        return [self.low, self.high]

    def describe(self) -> str:
        return f"int [{self.low}, {self.high}]{' log' if self.log else ''}"


class Categorical(_Strict):
    type: Literal["categorical"]
    choices: list[Any] = Field(min_length=1)

    def endpoints(self) -> list[Any]:
        return list(self.choices)

    def encoded(self) -> list[Any]:
        """Optuna stores only scalars: a list choice (`hidden_sizes: [64, 64]`) goes as its JSON text."""
        return [c if c is None or isinstance(c, bool | int | float | str) else json.dumps(c) for c in self.choices]

    def decode(self, value: Any) -> Any:
        return self.choices[self.encoded().index(value)]

    def describe(self) -> str:
        return f"categorical {json.dumps(self.choices)}"


def _check_range(low: float, high: float, log: bool) -> None:
    if low >= high:
        raise ValueError(f"empty range: low ({low}) must be below high ({high})")
    if not math.isfinite(high - low):  # a sampler draws uniformly between them: numpy overflows
        raise ValueError(f"range too wide: high - low must be a finite float, got {high} - {low}")
    if log and low <= 0:
        raise ValueError(f"log scale needs low > 0, got {low}")


Distribution = Annotated[FloatRange | IntRange | Categorical, Field(discriminator="type")]

SAMPLERS = ("tpe", "random", "gp", "cmaes")
PRUNERS = ("median", "successive_halving", "hyperband", "none")
_SAMPLER_NEEDS = {"gp": ("torch", "scipy"), "cmaes": ("cmaes",)}


class SamplerSpec(_Strict):
    name: Literal["tpe", "random", "gp", "cmaes"] = "tpe"
    seed: checked_type(settings.Seed) | None = 42  # numpy's SeedSequence, as the trainer's seed
    n_startup_trials: Int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _installed(self) -> SamplerSpec:
        missing = [m for m in _SAMPLER_NEEDS.get(self.name, ()) if importlib.util.find_spec(m) is None]
        if missing:
            raise ValueError(f"sampler {self.name!r} needs the {', '.join(missing)} package; pip install {missing[0]}")
        return self


class PrunerSpec(_Strict):
    name: Literal["median", "successive_halving", "hyperband", "none"] = "median"
    # A study's steps are epochs trained (`study.EPOCHS_TRAINED`): step 1 is the first epoch's value.
    n_startup_trials: Int = Field(2, ge=0)  # median: trials finished before pruning starts
    n_warmup_steps: Int = Field(2, ge=0)  # median: a trial can be pruned once it has trained this many epochs
    # successive_halving, hyperband: epochs trained before the first cut (Optuna refuses 0)
    min_resource: checked_type(settings.PositiveInt) | Literal["auto"] = "auto"
    reduction_factor: Int = Field(3, ge=2)  # successive_halving, hyperband: 1 in this many goes on at each rung


class TuneSpec(_Strict):
    metric: str = Field(min_length=1)
    direction: Literal["maximize", "minimize"]
    space: dict[str, Distribution] = Field(min_length=1)
    n_trials: Int | None = Field(None, ge=1)
    timeout: Float | None = Field(None, gt=0)
    sampler: SamplerSpec = SamplerSpec()
    pruner: PrunerSpec = PrunerSpec()
    storage: str | None = None
    study_name: str | None = Field(None, min_length=1, max_length=MAX_NAME)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, raw: Any) -> Any:
        """`sampler: random` and `pruner: none` stand for `{name: ...}`."""
        if isinstance(raw, dict):
            raw = dict(raw)
            for key in ("sampler", "pruner"):
                if isinstance(raw.get(key), str):
                    raw[key] = {"name": raw[key]}
        return raw

    @model_validator(mode="after")
    def _budget(self) -> TuneSpec:
        if self.n_trials is None and self.timeout is None:
            raise ValueError("set n_trials and/or timeout: a study needs a budget")
        return self

    def describe_space(self) -> dict[str, str]:
        return {name: dist.describe() for name, dist in self.space.items()}
