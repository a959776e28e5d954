"""Plain Lightning callbacks: no MLflow, Optuna or papermill here."""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch.callbacks import Callback, ModelCheckpoint


class StopOnNonFiniteLoss(Callback):
    """Stop at the first NaN/inf training loss, naming the epoch and step, instead of training on.

    Lightning has no built-in for this (`EarlyStopping(check_finite=True)` looks at a validation
    metric once per epoch; `detect_anomaly` is slow): one `isfinite` per step is.
    """

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None and not math.isfinite(float(loss)):
            raise FloatingPointError(
                f"non-finite loss ({float(loss)}) at epoch {trainer.current_epoch}, step {trainer.global_step}: "
                "lower the learning rate or clip gradients"
            )


class EpochCheckpoint(ModelCheckpoint):
    """Lightning's `ModelCheckpoint`, with two per-step costs of its own removed; nothing else.

    Lightning calls every callback's hooks at every training step, naming each by its
    `state_key`, which `ModelCheckpoint` rebuilds as a `repr` of its settings at every call; and
    its `on_train_batch_end` checks the trainer's state before it finds that nothing is saved per
    step. Measured on `bench/trial.yaml` at batch 64 (1 thread, ~0.8 ms steps): ~20 µs a step,
    2-3% of the fit. Here the key is built once, and equal to the stock callback's (so a
    checkpoint it saved restores into this one and back), and the batch hook returns at once when
    saving is per epoch only (no `every_n_train_steps`, no `train_time_interval`), where
    Lightning's own method returns too. Pure Lightning; the notebook's callback list uses it.
    """

    @property
    def state_key(self) -> str:
        key = self.__dict__.get("_state_key")
        if key is None:  # the stock key names the class: ModelCheckpoint{...}, not EpochCheckpoint{...}
            key = super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)
            self.__dict__["_state_key"] = key
        return key

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if pl_module.automatic_optimization and self._every_n_train_steps < 1 and self._train_time_interval is None:
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
