"""Training logic per task: loss and one torchmetrics collection per split.

One metric object per split keeps epoch reduction right (as lightning-hydra-template does).
Metric names are `<split>_<metric>` (`train_loss`, `val_acc`, `test_r2`): plain identifiers
that need no quoting in `mlflow.search_runs` filters or in a spec's `metric:` field.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

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
    # Batches whose metric inputs are kept per split before one torchmetrics update (1: every
    # step). A torchmetrics update costs ~130 µs of Python per step for loss + MSE + R² (measured,
    # torchmetrics 1.9, 1 thread): ~10% of a 64-row MLP step. The metrics are sums over rows, so
    # one update with 16 batches' rows concatenated gives the same epoch value.
    metric_batches: ClassVar[int] = 16
    METRIC_ELEMENTS: ClassVar[int] = 1 << 22  # and never more than this many kept values (16 MB float32)

    def _init_metrics(self, collection: Callable[[str], MetricCollection]) -> None:
        # Attributes (`train_metrics`), not a dict keyed by split: `self.train` is nn.Module.train.
        for split in SPLITS:
            setattr(self, f"{split}_metrics", collection(split))
            setattr(self, f"{split}_mean_loss", MeanMetric())

    def _kept_steps(self) -> dict[str, list[tuple[torch.Tensor, int, tuple[torch.Tensor, ...]]]]:
        """Per split, the steps whose loss and metric inputs wait for one update (made on first use:
        a subclass may take its metric objects from another module, as `Distill` does)."""
        if "_kept" not in self.__dict__:
            self._kept: dict[str, list[tuple[torch.Tensor, int, tuple[torch.Tensor, ...]]]] = {}
        return self._kept

    def _update_metrics(self, split: str, loss: torch.Tensor, rows: int, inputs: tuple[torch.Tensor, ...]) -> None:
        """Keep one step's detached loss (weighted by its `rows`) and metric inputs for `split`;
        update the metric objects once `metric_batches` steps are kept (`_flush_metrics`)."""
        kept = self._kept_steps().setdefault(split, [])
        kept.append((loss, rows, inputs))
        elements = self.__dict__.setdefault("_kept_elements", {})
        elements[split] = elements.get(split, 0) + sum(t.numel() for t in inputs)  # a running count
        if len(kept) >= self.metric_batches or elements[split] >= self.METRIC_ELEMENTS:
            self._flush_metrics(split)

    def _drop_kept(self, split: str) -> list[tuple[torch.Tensor, int, tuple[torch.Tensor, ...]]] | None:
        """Forget `split`'s kept steps (and their element count); returns them."""
        self.__dict__.get("_kept_elements", {}).pop(split, None)
        return self._kept_steps().pop(split, None)

    def _flush_metrics(self, split: str) -> None:
        """Update `split`'s mean loss and metrics with every kept step (one call each)."""
        kept = self._drop_kept(split)
        if not kept:
            return
        losses = torch.stack([loss for loss, _, _ in kept])
        getattr(self, f"{split}_mean_loss").update(losses, weight=losses.new_tensor([rows for _, rows, _ in kept]))
        getattr(self, f"{split}_metrics").update(
            *(torch.cat(parts) for parts in zip(*(i for _, _, i in kept), strict=True))
        )

    def _epoch_ends_after(self, split: str, batch_idx: int) -> bool:
        """Whether Lightning computes `split`'s epoch metrics before the next step of that split:
        the loop's last batch (`limit_*_batches` and the sanity check included) or a stop."""
        trainer = self._trainer
        if trainer is None:  # stepped by hand: nothing batches the updates
            return True
        if split == "train":
            total, loop = trainer.num_training_batches, trainer.fit_loop.epoch_loop
            return trainer.should_stop or batch_idx + 1 >= total or loop.batch_progress.is_last_batch
        if split == "test":
            total, loop = trainer.num_test_batches, trainer.test_loop
        elif trainer.sanity_checking:
            total, loop = trainer.num_sanity_val_batches, trainer.fit_loop.epoch_loop.val_loop
        elif trainer.validating:
            total, loop = trainer.num_val_batches, trainer.validate_loop
        else:
            total, loop = trainer.num_val_batches, trainer.fit_loop.epoch_loop.val_loop
        return len(total) != 1 or batch_idx + 1 >= total[0] or loop.batch_progress.is_last_batch

    # After the callbacks' batch-end hooks (a stop they asked for is seen) and before any
    # epoch-end hook: whatever is kept reaches the metric objects before Lightning computes them.
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._epoch_ends_after("train", batch_idx):
            self._flush_metrics("train")

    def on_validation_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._epoch_ends_after("val", batch_idx):
            self._flush_metrics("val")

    def on_test_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._epoch_ends_after("test", batch_idx):
            self._flush_metrics("test")

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
        if batch_idx == 0:
            self._drop_kept(split)  # a loop that ended without its last batch (an exception) left these
        self._update_metrics(split, loss.detach(), y.shape[0], self.metric_inputs(output, y))
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
