"""The plain Lightning pieces the notebooks use (lightning_modules/callbacks.py, strategies.py), alone."""

from __future__ import annotations

import sys

import lightning.pytorch as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_modules.callbacks import StopOnNonFiniteLoss

pytestmark = pytest.mark.fast


class _Regression(L.LightningModule):
    """A linear fit whose loss turns NaN at global step `nan_at` (never if None)."""

    def __init__(self, nan_at: int | None = None) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.nan_at = nan_at

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201 - Lightning's signature
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        if self.nan_at is not None and self.global_step >= self.nan_at:
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(module: L.LightningModule, epochs: int = 2) -> L.Trainer:
    torch.manual_seed(0)
    x = torch.randn(32, 2)
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=[StopOnNonFiniteLoss()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, data)
    return trainer


def test_a_nan_loss_stops_training_at_that_step_naming_epoch_and_step() -> None:
    module = _Regression(nan_at=5)  # 4 batches an epoch: step 5 is epoch 1's second batch
    with pytest.raises(FloatingPointError, match=r"non-finite loss \(nan\) at epoch 1, step 6: lower the learning"):
        _fit(module)


def test_finite_losses_train_to_the_end() -> None:
    trainer = _fit(_Regression(), epochs=2)
    assert trainer.global_step == 8 and trainer.current_epoch == 2


def test_notebook_fsdp_forks_its_processes_as_ddp_notebook_does() -> None:
    from lightning.pytorch.strategies import FSDPStrategy
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    from lightning_modules.strategies import NotebookFSDP

    strategy = NotebookFSDP()
    strategy._configure_launcher()
    assert isinstance(strategy, FSDPStrategy)
    assert isinstance(strategy._launcher, _MultiProcessingLauncher) and strategy._launcher._start_method == "fork"


def test_in_a_kernel_the_notebook_helper_picks_the_forking_strategies(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_modules.strategies import NotebookFSDP
    from pipelines.nb import in_notebook

    assert in_notebook.strategy("fsdp") == "fsdp"  # a script (torchrun, SLURM): names reach Lightning unchanged
    monkeypatch.setattr(sys, "ps1", ">>> ", raising=False)  # what IPython sets in a kernel
    assert in_notebook.strategy("ddp") == "ddp_notebook"
    assert isinstance(in_notebook.strategy("fsdp"), NotebookFSDP)
    assert in_notebook.strategy("auto") == "auto"
