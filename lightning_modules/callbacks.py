"""Small Lightning callbacks the notebooks use."""

from __future__ import annotations

import lightning.pytorch as L


class MetricsHistory(L.Callback):
    """Keeps each epoch's logged metrics in memory, for learning curves drawn in the notebook."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        row = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        row["epoch"] = trainer.current_epoch
        self.rows.append(row)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Training metrics are reduced after validation ran; fold them into this epoch's row.
        if self.rows and self.rows[-1]["epoch"] == trainer.current_epoch:
            self.rows[-1].update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train_")})
