"""Plain PyTorch Lightning models and data modules: no MLflow, Optuna or papermill here.

Names are imported on first use (PEP 562), so `lightning_modules.catalog`, which describes the
registry without torch, can be read by `labbook` before anything imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "OPTIMIZERS": "base",
    "SCHEDULERS": "base",
    "TrainableModule": "base",
    "DigitsDataModule": "data",
    "RegressionDataModule": "data",
    "fingerprint": "data",
    "FineTune": "finetune",
    "GPT": "gpt",
    "CNN": "models",
    "MLPClassifier": "models",
    "MLPRegressor": "models",
    "DATA": "registry",
    "MODELS": "registry",
    "build_data": "registry",
    "build_model": "registry",
    "check_fit": "registry",
    "data_class": "registry",
    "init_parameters": "registry",
    "model_class": "registry",
    "DocstringsDataModule": "text_data",
    "TextDataModule": "text_data",
}

__all__ = [
    "CNN",
    "DATA",
    "DigitsDataModule",
    "DocstringsDataModule",
    "FineTune",
    "GPT",
    "MLPClassifier",
    "MLPRegressor",
    "MODELS",
    "OPTIMIZERS",
    "RegressionDataModule",
    "SCHEDULERS",
    "TextDataModule",
    "TrainableModule",
    "build_data",
    "build_model",
    "check_fit",
    "data_class",
    "fingerprint",
    "init_parameters",
    "model_class",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'lightning_modules' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"lightning_modules.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from lightning_modules.base import OPTIMIZERS, SCHEDULERS, TrainableModule
    from lightning_modules.data import DigitsDataModule, RegressionDataModule, fingerprint
    from lightning_modules.finetune import FineTune
    from lightning_modules.gpt import GPT
    from lightning_modules.models import CNN, MLPClassifier, MLPRegressor
    from lightning_modules.registry import (
        DATA,
        MODELS,
        build_data,
        build_model,
        check_fit,
        data_class,
        init_parameters,
        model_class,
    )
    from lightning_modules.text_data import DocstringsDataModule, TextDataModule
