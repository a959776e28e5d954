"""Plain PyTorch Lightning models and data modules: no MLflow, Optuna or papermill here."""

from lightning_modules.base import OPTIMIZERS, SCHEDULERS, TrainableModule
from lightning_modules.data import DigitsDataModule, RegressionDataModule, fingerprint
from lightning_modules.models import CNN, MLPClassifier, MLPRegressor
from lightning_modules.registry import (
    DATA,
    MODELS,
    build_data,
    build_model,
    data_class,
    init_parameters,
    model_class,
)

__all__ = [
    "CNN",
    "DATA",
    "MODELS",
    "OPTIMIZERS",
    "SCHEDULERS",
    "DigitsDataModule",
    "MLPClassifier",
    "MLPRegressor",
    "RegressionDataModule",
    "TrainableModule",
    "build_data",
    "build_model",
    "data_class",
    "fingerprint",
    "init_parameters",
    "model_class",
]
