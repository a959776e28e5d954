"""Plain PyTorch Lightning models and data modules: no MLflow, Optuna or papermill here."""

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

__all__ = [
    "CNN",
    "DATA",
    "MODELS",
    "OPTIMIZERS",
    "SCHEDULERS",
    "DigitsDataModule",
    "DocstringsDataModule",
    "FineTune",
    "GPT",
    "MLPClassifier",
    "MLPRegressor",
    "RegressionDataModule",
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
