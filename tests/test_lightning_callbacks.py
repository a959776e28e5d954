"""The plain Lightning pieces the notebooks use (lightning_modules/callbacks.py, strategies.py), alone."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_modules.callbacks import EpochCheckpoint, StopOnNonFiniteLoss

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


def _fit(module: L.LightningModule, epochs: int = 2, check: StopOnNonFiniteLoss | None = None) -> L.Trainer:
    torch.manual_seed(0)
    x = torch.randn(32, 2)
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=[check or StopOnNonFiniteLoss()],
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


@pytest.mark.parametrize(("nan_at", "every"), [(5, 3), (5, 100), (1, 2), (7, 2)])
def test_read_later_as_on_a_gpu_the_first_nan_is_still_named_by_its_epoch_and_step(nan_at: int, every: int) -> None:
    """On an accelerator the losses are read every `every_n_steps` steps and at the epoch's end
    (no host wait per step); forced here on the CPU: the first non-finite step is named all the same."""
    module = _Regression(nan_at=nan_at)
    epoch, step = divmod(nan_at, 4)  # 4 batches an epoch; the message counts optimizer steps taken
    with pytest.raises(FloatingPointError, match=rf"non-finite loss \(nan\) at epoch {epoch}, step {nan_at + 1}:"):
        _fit(module, epochs=3, check=StopOnNonFiniteLoss(every_n_steps=every, defer=True))


def test_read_later_finite_losses_train_to_the_end() -> None:
    trainer = _fit(_Regression(), epochs=2, check=StopOnNonFiniteLoss(every_n_steps=3, defer=True))
    assert trainer.global_step == 8


def test_a_nan_in_the_last_steps_of_a_fit_cut_short_is_still_caught() -> None:
    """max_steps ends the fit mid-epoch, before any epoch end: the kept losses are read at the train end."""
    torch.manual_seed(0)
    x = torch.randn(32, 2)
    trainer = L.Trainer(max_steps=3, callbacks=[StopOnNonFiniteLoss(every_n_steps=100, defer=True)], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu")  # fmt: skip
    with pytest.raises(FloatingPointError, match=r"at epoch 0, step 3:"):
        trainer.fit(_Regression(nan_at=2), DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8))


def test_read_later_no_checkpoint_is_written_past_an_unread_nan(tmp_path: Path) -> None:
    """A checkpoint every step, losses read every 100: the save after the first NaN step reads them and fails."""
    torch.manual_seed(0)
    x = torch.randn(32, 2)
    from lightning.pytorch.callbacks import ModelCheckpoint

    saving = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)
    check = StopOnNonFiniteLoss(every_n_steps=100, defer=True)
    trainer = L.Trainer(max_epochs=3, callbacks=[check, saving], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")  # fmt: skip
    with pytest.raises(FloatingPointError, match=r"at epoch 1, step 6:"):
        trainer.fit(_Regression(nan_at=5), DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8))
    steps = sorted(int(p.stem.split("step=")[1]) for p in tmp_path.glob("*.ckpt"))
    assert steps == [1, 2, 3, 4, 5]


def test_finite_losses_train_to_the_end() -> None:
    trainer = _fit(_Regression(), epochs=2)
    assert trainer.global_step == 8 and trainer.current_epoch == 2


class _Validated(_Regression):
    def validation_step(self, batch, batch_idx):  # noqa: ANN001, ANN201 - Lightning's signature
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x), y))


def _checkpointed_fit(tmp_path: Path, checkpoint: L.Callback, epochs: int, ckpt_path: str | None = None) -> L.Trainer:
    torch.manual_seed(0)
    x = torch.randn(32, 2)
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=[checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(_Validated(), data, data, ckpt_path=ckpt_path)
    return trainer


def test_the_epoch_checkpoint_keeps_the_stock_callbacks_key_both_ways(tmp_path: Path) -> None:
    """A checkpoint the stock ModelCheckpoint saved restores the best path and score into
    EpochCheckpoint and back: the callback's state is filed under the same key."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    settings = {"monitor": "val_loss", "mode": "min", "save_last": True, "filename": "best-{epoch}"}
    assert EpochCheckpoint(**settings).state_key == ModelCheckpoint(**settings).state_key
    for first, then in ((ModelCheckpoint, EpochCheckpoint), (EpochCheckpoint, ModelCheckpoint)):
        folder = tmp_path / first.__name__
        saved = first(dirpath=folder, **settings)
        _checkpointed_fit(tmp_path, saved, epochs=2)
        resumed = then(dirpath=folder, **settings)  # restored, and nothing left to train: its state is the file's
        _checkpointed_fit(tmp_path, resumed, epochs=2, ckpt_path=str(folder / "last.ckpt"))
        assert resumed.best_model_path == saved.best_model_path and Path(resumed.best_model_path).exists()
        assert resumed.best_model_score == saved.best_model_score


def test_the_epoch_checkpoint_still_saves_every_n_train_steps_when_asked(tmp_path: Path) -> None:
    checkpoint = EpochCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    _checkpointed_fit(tmp_path, checkpoint, epochs=2)  # 8 steps: saved at 3 and 6, and at each epoch's end
    names = sorted(p.name for p in tmp_path.glob("*.ckpt"))
    assert "step=3.ckpt" in names and "step=6.ckpt" in names


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


# A fit in its own process (the callback ends it with os._exit): rank 0 sends itself a real SIGUSR1
# in the middle of training step SIGNAL_AT (before its backward, so under DDP before the gradient
# all-reduce), and checks that the handler did not save there and then.
REQUEUE_FIT = """
import os, signal, sys
from pathlib import Path
import lightning.pytorch as L, torch
from torch.utils.data import DataLoader, TensorDataset
from lightning_modules.requeue import RequeueOnSignal

SIGNAL_AT, root, command, devices = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:], int(os.environ["DEVICES"])

class Fit(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)
    def on_before_backward(self, loss):
        if self.global_step == SIGNAL_AT and self.global_rank == 0:
            os.kill(os.getpid(), signal.SIGUSR1)  # delivered now, mid-step
            print(f"signalled at step {self.global_step}; saved in the handler: {list(root.glob('hpc_ckpt_*'))}")
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

torch.manual_seed(0)
x = torch.randn(64, 2)
trainer = L.Trainer(
    max_epochs=3, accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
    default_root_dir=root, logger=False, enable_checkpointing=False, enable_progress_bar=False,
    enable_model_summary=False, callbacks=[RequeueOnSignal(command=command)],
)
trainer.fit(Fit(), DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8))
print(f"rank {trainer.global_rank}: fit ran to the end at step {trainer.global_step}")
"""


def _requeue_fit(tmp_path: Path, command: list[str], devices: int = 1, signal_at: int = 5):
    import subprocess

    script = tmp_path / "fit.py"
    script.write_text(REQUEUE_FIT)
    env = {**os.environ, "DEVICES": str(devices), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for name in [k for k in env if k.startswith("SLURM_")]:
        del env[name]  # the test may itself run inside a SLURM job
    return subprocess.run([sys.executable, str(script), str(signal_at), str(tmp_path), *command], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)  # fmt: skip


def _requeue_marker() -> list[str]:
    """A requeue command the test can observe: it writes its arguments to `requeued`."""
    return [sys.executable, "-c", "import sys; open('requeued', 'w').write(' '.join(sys.argv[1:]))", "job", "42"]


def test_a_requeue_signal_mid_step_saves_at_that_batch_end_requeues_and_ends_the_process(tmp_path: Path) -> None:
    done = _requeue_fit(tmp_path, _requeue_marker(), signal_at=5)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "signalled at step 5; saved in the handler: []" in done.stdout  # the handler only set a flag
    assert "fit ran to the end" not in done.stdout  # the process ended after the requeue
    assert (tmp_path / "requeued").read_text() == "job 42"
    [saved] = tmp_path.glob("hpc_ckpt_*.ckpt")
    assert saved.name == "hpc_ckpt_1.ckpt"  # where Lightning's SLURM resume looks
    state = torch.load(saved, weights_only=False)
    # Written at the end of the signalled batch (the 6th: steps count from 0), its optimizer step
    # counted, the epoch mid-way: as ModelCheckpoint(every_n_train_steps) saves from the same hook.
    assert state["global_step"] == 6 and state["epoch"] == 0
    assert state["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["ready"] == 6
    assert "requeue signal: saved" in done.stdout and "Requeued SLURM job" in done.stdout


def test_a_failed_requeue_command_keeps_training_to_the_end(tmp_path: Path) -> None:
    done = _requeue_fit(tmp_path, [sys.executable, "-c", "raise SystemExit(3)"], signal_at=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "exited 3; training goes on" in done.stdout
    assert "rank 0: fit ran to the end at step 24" in done.stdout
    assert [p.name for p in tmp_path.glob("hpc_ckpt_*.ckpt")] == ["hpc_ckpt_1.ckpt"]


def test_under_ddp_a_signal_to_one_rank_saves_and_requeues_on_every_rank_at_the_same_batch(tmp_path: Path) -> None:
    """Two gloo ranks; only rank 0 is signalled, before its backward (its gradient all-reduce):
    both ranks agree at that batch's end, one checkpoint is written, one requeue, both end."""
    done = _requeue_fit(tmp_path, _requeue_marker(), devices=2, signal_at=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "signalled at step 2; saved in the handler: []" in done.stdout
    assert "fit ran to the end" not in done.stdout + done.stderr  # neither rank went on
    assert (tmp_path / "requeued").read_text() == "job 42"
    [saved] = tmp_path.glob("hpc_ckpt_*.ckpt")
    assert torch.load(saved, weights_only=False)["global_step"] == 3
