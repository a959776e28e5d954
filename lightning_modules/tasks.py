"""Training logic per task: loss and one torchmetrics collection per split.

One metric object per split keeps epoch reduction right (as lightning-hydra-template does).
Metric names are `<split>_<metric>` (`train_loss`, `val_acc`, `test_r2`): plain identifiers
that need no quoting in `mlflow.search_runs` filters or in a spec's `metric:` field.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, MeanSquaredError, MetricCollection, R2Score
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassRecall

from lightning_modules.base import TrainableModule
from lightning_modules.catalog import SPLITS


def _log_split(module: TrainableModule, split: str) -> None:
    """Hand the split's metric objects to Lightning, on an epoch's first step only.

    Lightning keeps a reference to a logged torchmetrics object and computes it once, at the
    epoch's end, over every `update()` of the epoch: logging it again each step only costs
    ~0.8 ms a call (the value travels through Lightning's result collection even with
    `on_step=False`), which made a batch-64 MLP epoch twice as slow as a raw loop. Logging from
    the first step (not from the module's epoch-end hook, which runs *after* the callbacks') keeps
    `trainer.callback_metrics` complete for any callback's `on_validation_epoch_end`.
    """
    module.log(
        f"{split}_loss",
        getattr(module, f"{split}_mean_loss"),
        on_step=False,
        on_epoch=True,
        prog_bar=split != "train",
    )
    module.log_dict(getattr(module, f"{split}_metrics"), on_step=False, on_epoch=True, prog_bar=split == "val")


class SupervisedModule(TrainableModule):
    """One step for every split: loss, a weighted mean loss and metrics per split, logged per epoch.

    Subclasses say what the task's loss, metrics and predictions are.
    """

    task: str
    monitor: tuple[str, str]
    metric_names: tuple[str, ...]

    def _init_metrics(self, collection: Callable[[str], MetricCollection]) -> None:
        # Attributes (`train_metrics`), not a dict keyed by split: `self.train` is nn.Module.train.
        for split in SPLITS:
            setattr(self, f"{split}_metrics", collection(split))
            setattr(self, f"{split}_mean_loss", MeanMetric())

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def metric_inputs(self, output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return output.detach(), target

    def prediction(self, output: torch.Tensor) -> torch.Tensor:
        return output

    def _step(self, batch: Any, split: str, batch_idx: int) -> torch.Tensor:
        x, y = batch
        output = self(x)
        loss = self.loss(output, y)
        getattr(self, f"{split}_mean_loss").update(loss.detach(), weight=y.shape[0])  # update: no per-batch value
        getattr(self, f"{split}_metrics").update(*self.metric_inputs(output, y))
        if batch_idx == 0:
            _log_split(self, split)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.regularized(self._step(batch, "train", batch_idx))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val", batch_idx)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test", batch_idx)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self.prediction(self(x))


class ClassifierModule(SupervisedModule):
    """Cross-entropy classification; logs loss, accuracy, macro F1 and macro recall per epoch."""

    task = "classification"
    monitor = ("val_acc", "max")
    metric_names = ("loss", "acc", "f1", "recall")

    def _init_classification_metrics(self, num_classes: int) -> None:
        self._init_metrics(
            lambda split: MetricCollection(
                {
                    "acc": MulticlassAccuracy(num_classes, average="micro"),
                    "f1": MulticlassF1Score(num_classes, average="macro"),
                    "recall": MulticlassRecall(num_classes, average="macro"),
                },
                prefix=f"{split}_",
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target)

    def prediction(self, output: torch.Tensor) -> torch.Tensor:
        return output.argmax(dim=-1)


class RegressorModule(SupervisedModule):
    """Mean squared error regression; logs loss, MSE and R² per epoch."""

    task = "regression"
    monitor = ("val_loss", "min")
    metric_names = ("loss", "mse", "r2")

    def _init_regression_metrics(self) -> None:
        self._init_metrics(
            lambda split: MetricCollection({"mse": MeanSquaredError(), "r2": R2Score()}, prefix=f"{split}_")
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(output, target)

    def metric_inputs(self, output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return output.detach().float(), target.float()
