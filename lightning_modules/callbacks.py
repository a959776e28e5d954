"""Plain Lightning callbacks: no MLflow, Optuna or papermill here."""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch.callbacks import Callback


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
