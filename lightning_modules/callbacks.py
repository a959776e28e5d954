"""Plain Lightning callbacks: no MLflow, Optuna or papermill here."""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint


class StopOnNonFiniteLoss(Callback):
    """Stop at the first NaN/inf training loss, naming the epoch and step, instead of training on.

    Lightning has no built-in for this (`EarlyStopping(check_finite=True)` looks at a validation
    metric once per epoch; `detect_anomaly` is slow): one `isfinite` per step is. On the CPU the
    loss is read at every step (reading it waits for nothing). On an accelerator reading it would
    make the host wait for the device at every step (PyTorch's performance tuning guide: "avoid
    unnecessary CPU-GPU synchronization"), so the step's loss is kept (a reference, no copy) and
    the kept losses are read together every `every_n_steps` steps, at the epoch's and the fit's
    end and before any checkpoint is written (so none holds weights trained past an unread
    non-finite loss): the error still names the first non-finite step, found up to
    `every_n_steps - 1` steps later. `defer` forces either way (None: by the loss's device).
    """

    def __init__(self, every_n_steps: int = 32, defer: bool | None = None) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.defer = defer
        self._kept: list[tuple[int, int, Any]] = []  # (epoch, step, the loss tensor)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._kept = []  # an earlier fit that ended in an exception may have left some

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        defer = self.defer
        if defer is None:
            defer = isinstance(loss, torch.Tensor) and loss.device.type != "cpu"
        if not defer:
            self._raise_if_non_finite([(trainer.current_epoch, trainer.global_step, float(loss))])
            return
        self._kept.append((trainer.current_epoch, trainer.global_step, loss.detach()))
        if len(self._kept) >= self.every_n_steps:
            self._check_kept()

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._check_kept()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._check_kept()  # a fit stopped mid-epoch (a pruned trial, max_steps) skips the epoch's end

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        self._check_kept()  # no checkpoint holds weights trained past an unread non-finite loss

    def _check_kept(self) -> None:
        kept, self._kept = self._kept, []
        if kept:  # one device-to-host copy for all of them
            values = torch.stack([loss.float().reshape(()) for _, _, loss in kept]).tolist()
            self._raise_if_non_finite([(epoch, step, v) for (epoch, step, _), v in zip(kept, values, strict=True)])

    @staticmethod
    def _raise_if_non_finite(losses: list[tuple[int, int, float]]) -> None:
        for epoch, step, value in losses:
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"non-finite loss ({value}) at epoch {epoch}, step {step}: "
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
