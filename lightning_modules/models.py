"""The models we ship: a component net wrapped in its task's training logic.

`input_shape` and `num_classes` come from the data module (see `registry.build_model`);
everything else is a hyperparameter with the same name in specs, notebooks and MLflow.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from annotated_types import Ge, Len

from lightning_modules.components import MLP, ConvNet
from lightning_modules.settings import PositiveInt, Sizes, checked
from lightning_modules.tasks import ClassifierModule, RegressorModule


class MLPClassifier(ClassifierModule):
    """Multi-layer perceptron classifier (digits: 64 → 50 → 10 by default)."""

    @checked
    def __init__(
        self,
        input_shape: Sizes = (64,),
        num_classes: Annotated[int, Ge(2)] = 10,
        hidden_sizes: Sizes = (50,),
        **optim: Any,
    ) -> None:
        super().__init__(**optim)
        self.save_hyperparameters()
        self.net = MLP(math.prod(input_shape), list(hidden_sizes), num_classes, self.dropout)
        self._init_classification_metrics(num_classes)


class CNN(ClassifierModule):
    """Two conv + pool blocks and two fully connected layers; adapts to the image size."""

    input_rank = 3

    @checked
    def __init__(
        self,
        input_shape: Sizes = (1, 8, 8),
        num_classes: Annotated[int, Ge(2)] = 10,
        channels: Annotated[Sizes, Len(2, 2)] = (16, 32),  # two conv blocks
        fc_hidden: PositiveInt = 64,
        **optim: Any,
    ) -> None:
        super().__init__(**optim)
        self.save_hyperparameters()
        self.net = ConvNet(list(input_shape), num_classes, list(channels), fc_hidden, self.dropout)
        self._init_classification_metrics(num_classes)


class MLPRegressor(RegressorModule):
    """Multi-layer perceptron regressor (10 → 20 → 1 by default), trained with MSE."""

    @checked
    def __init__(
        self,
        input_shape: Sizes = (10,),
        hidden_sizes: Sizes = (20,),
        **optim: Any,
    ) -> None:
        super().__init__(**optim)
        self.save_hyperparameters()
        self.net = MLP(math.prod(input_shape), list(hidden_sizes), 1, self.dropout)
        self._init_regression_metrics()
