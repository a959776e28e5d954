"""Names → classes, used by specs and notebooks, and builders that take a flat parameter dict.

A flat dict (`{"model": "cnn", "lr": 0.01, "batch_size": 64, ...}`) is what a spec, a
notebook's parameters cell and an MLflow run all share; each builder picks the names its
class accepts, so a hyperparameter has one name everywhere.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as L

from lightning_modules.base import TrainableModule
from lightning_modules.data import ArrayDataModule, DigitsDataModule, RegressionDataModule
from lightning_modules.models import CNN, MLPClassifier, MLPRegressor

MODELS: dict[str, type[TrainableModule]] = {
    "mlp_classifier": MLPClassifier,
    "cnn": CNN,
    "mlp_regressor": MLPRegressor,
}
DATA: dict[str, type[ArrayDataModule]] = {
    "digits": DigitsDataModule,
    "regression": RegressionDataModule,
}
# Model arguments that come from the data module, and data arguments that come from the model:
# never set by a spec, so `-p model cnn` alone gives the CNN its images.
DERIVED_FROM_DATA = ("input_shape", "num_classes")
DERIVED_FROM_MODEL = ("flatten",)


def _lookup(kind: str, name: str, table: Mapping[str, type]) -> type:
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {kind} {name!r}; known: {', '.join(sorted(table))}") from None


def model_class(name: str) -> type[TrainableModule]:
    return _lookup("model", name, MODELS)


def data_class(name: str) -> type[ArrayDataModule]:
    return _lookup("data", name, DATA)


def init_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """Every named `__init__` argument, following `**kwargs` into the base classes."""
    found: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass in (L.LightningModule, L.LightningDataModule):
            continue
        params = inspect.signature(klass.__init__).parameters
        for name, param in params.items():
            if name != "self" and param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
                found.setdefault(name, param)
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            break
    return found


def pick(cls: type, params: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of `params` that `cls.__init__` accepts."""
    return {name: params[name] for name in init_parameters(cls) if name in params}


def build_data(params: Mapping[str, Any]) -> ArrayDataModule:
    """Build `params["data"]`, shaped for `params["model"]` (images for a CNN, vectors otherwise)."""
    cls = data_class(params["data"])
    kwargs = {k: v for k, v in pick(cls, params).items() if k not in DERIVED_FROM_MODEL}
    if "flatten" in init_parameters(cls):
        kwargs["flatten"] = model_class(params["model"]).input_rank != 3
    return cls(**kwargs)


def build_model(params: Mapping[str, Any], datamodule: ArrayDataModule) -> TrainableModule:
    """Build `params["model"]` for `datamodule`, checking the task and the input they share."""
    cls = model_class(params["model"])
    if cls.task != datamodule.task:
        raise ValueError(
            f"model {params['model']!r} is for {cls.task} but data {params['data']!r} is {datamodule.task}"
        )
    kwargs = {k: v for k, v in pick(cls, params).items() if k not in DERIVED_FROM_DATA}
    kwargs["input_shape"] = tuple(datamodule.input_shape)
    if "num_classes" in init_parameters(cls):
        kwargs["num_classes"] = datamodule.num_classes  # type: ignore[attr-defined]
    return cls(**kwargs)
