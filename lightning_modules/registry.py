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

from lightning_modules import catalog
from lightning_modules.base import TrainableModule
from lightning_modules.catalog import DERIVED_FROM_DATA, DERIVED_FROM_MODEL, check_fit
from lightning_modules.data import DigitsDataModule, RegressionDataModule, SplitDataModule
from lightning_modules.finetune import FineTune
from lightning_modules.gpt import GPT
from lightning_modules.models import CNN, MLPClassifier, MLPRegressor
from lightning_modules.text_data import DocstringsDataModule, TextDataModule

MODELS: dict[str, type[TrainableModule]] = {
    "mlp_classifier": MLPClassifier,
    "cnn": CNN,
    "mlp_regressor": MLPRegressor,
    "gpt": GPT,
    "finetune": FineTune,  # needs the `nlp` extra when built
}
DATA: dict[str, type[SplitDataModule]] = {
    "digits": DigitsDataModule,
    "regression": RegressionDataModule,
    "text": TextDataModule,
    "docstrings": DocstringsDataModule,  # needs the `nlp` extra when built
}
# Specs are checked against catalog.json, which describes these classes without importing torch:
# after adding or changing one, `python -m lightning_modules.registry` rewrites it.


def _lookup(kind: str, name: str, table: Mapping[str, type]) -> type:
    catalog.entry(kind, name)  # an unknown name: the catalog's one-line error, the one a spec gets
    return table[name]


def model_class(name: str) -> type[TrainableModule]:
    return _lookup("model", name, MODELS)


def data_class(name: str) -> type[SplitDataModule]:
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
    """The entries of `params` that `cls.__init__` accepts; a None where the class has a default of its
    own means "that default" (the notebook's `hidden_sizes = None`: (50,) for one model, (20,) for another)."""
    return {
        name: params[name]
        for name, param in init_parameters(cls).items()
        if name in params and not (params[name] is None and param.default not in (None, inspect.Parameter.empty))
    }


def build_data(params: Mapping[str, Any]) -> SplitDataModule:
    """Build `params["data"]`, shaped for `params["model"]` (images for a CNN, vectors otherwise)."""
    cls = data_class(params["data"])
    model_cls = model_class(params["model"])
    kwargs = {k: v for k, v in pick(cls, params).items() if k not in DERIVED_FROM_MODEL}
    wanted = init_parameters(cls)
    if "flatten" in wanted:
        kwargs["flatten"] = model_cls.input_rank != 3
    if "block_size" in wanted:
        model_default = init_parameters(model_cls).get("block_size")
        kwargs["block_size"] = params.get("block_size", getattr(model_default, "default", 64))
    return cls(**kwargs)


def build_model(params: Mapping[str, Any], datamodule: SplitDataModule) -> TrainableModule:
    """Build `params["model"]` for `datamodule`, checking the task and the input they share."""
    check_fit(params["model"], params["data"])
    cls = model_class(params["model"])
    kwargs = {k: v for k, v in pick(cls, params).items() if k not in DERIVED_FROM_DATA}
    wanted = init_parameters(cls)
    for name in DERIVED_FROM_DATA:
        if name in wanted:
            value = getattr(datamodule, name)
            kwargs[name] = tuple(value) if name == "input_shape" else value
    return cls(**kwargs)


if __name__ == "__main__":  # python -m lightning_modules.registry: rewrite catalog.json from the classes
    print(f"wrote {catalog.write(catalog.build(MODELS, DATA, init_parameters))}")
