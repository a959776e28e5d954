"""The models we ship: a component net wrapped in its task's training logic.

`input_shape` and `num_classes` come from the data module (see `registry.build_model`);
everything else is a hyperparameter with the same name in specs, notebooks and MLflow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from lightning_modules.components import MLP, ConvNet
from lightning_modules.tasks import ClassifierModule, RegressorModule


class MLPClassifier(ClassifierModule):
    """Multi-layer perceptron classifier (digits: 64 → 50 → 10 by default)."""

    def __init__(
        self,
        input_shape: Sequence[int] = (64,),
        num_classes: int = 10,
        hidden_sizes: Sequence[int] = (50,),
        **optim: Any,
    ) -> None:
        super().__init__(**optim)
        self.save_hyperparameters()
        self.net = MLP(math.prod(input_shape), list(hidden_sizes), num_classes, self.dropout)
        self._init_classification_metrics(num_classes)


class CNN(ClassifierModule):
    """Two conv + pool blocks and two fully connected layers; adapts to the image size."""

    input_rank = 3

    def __init__(
        self,
        input_shape: Sequence[int] = (1, 8, 8),
        num_classes: int = 10,
        channels: Sequence[int] = (16, 32),
        fc_hidden: int = 64,
        **optim: Any,
    ) -> None:
        super().__init__(**optim)
        self.save_hyperparameters()
        self.net = ConvNet(list(input_shape), num_classes, list(channels), fc_hidden, self.dropout)
        self._init_classification_metrics(num_classes)


class MLPRegressor(RegressorModule):
    """Multi-layer perceptron regressor (10 → 20 → 1 by default), trained with MSE."""

    def __init__(
        self,
        input_shape: Sequence[int] = (10,),
        hidden_sizes: Sequence[int] = (20,),
        **optim: Any,
    ) -> None:
        super().__init__(**optim)
        self.save_hyperparameters()
        self.net = MLP(math.prod(input_shape), list(hidden_sizes), 1, self.dropout)
        self._init_regression_metrics()
