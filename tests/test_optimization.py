"""The shared optimization logic: optimizers, weight decay groups, L1, schedules with warmup."""

from __future__ import annotations

import lightning.pytorch as L
import pytest
import torch

from lightning_modules import build_data, build_model

pytestmark = pytest.mark.fast  # no notebook: `make test-fast`


class LrRecorder(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def fit(epochs: int = 4, batches: int = 5, **hparams):
    params = {"model": "mlp_classifier", "data": "digits", "batch_size": 32, **hparams}
    datamodule = build_data(params)
    model = build_model(params, datamodule)
    recorder = LrRecorder()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        limit_train_batches=batches,
        limit_val_batches=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[recorder],
    )
    trainer.fit(model, datamodule=datamodule)
    return model, trainer, recorder.lrs


@pytest.mark.parametrize(
    ("name", "cls"), [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)]
)
def test_optimizer_is_chosen_by_name(name: str, cls: type) -> None:
    _, trainer, _ = fit(epochs=1, batches=1, optimizer=name, lr=0.05)
    assert type(trainer.optimizers[0]) is cls
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_the_optimizer_is_fused_on_cpu_and_steps_as_torchs_default(name: str) -> None:
    """The fused kernel (one per parameter group) is the same update as torch's per-tensor path:
    the same start, 5 steps each way, the same weights to float tolerance."""
    _, trainer, _ = fit(epochs=1, batches=1, optimizer=name, lr=0.05, weight_decay=0.01)
    assert trainer.optimizers[0].defaults["fused"] is True
    params = {"model": "mlp_classifier", "data": "digits", "batch_size": 32, "optimizer": name, "lr": 0.05}
    datamodule = build_data({**params, "weight_decay": 0.01})
    datamodule.setup()
    x, y = next(iter(datamodule.train_dataloader()))
    weights = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = build_model({**params, "weight_decay": 0.01}, datamodule)
        groups = model.decay_groups()
        opt = type(trainer.optimizers[0])(groups, lr=0.05, **({"momentum": 0.9} if name == "sgd" else {}), fused=fused)
        for _ in range(5):
            opt.zero_grad()
            model.loss(model(x), y).backward()
            opt.step()
        weights.append([p.detach().clone() for p in model.parameters()])
    for fused_w, default_w in zip(*weights, strict=True):
        torch.testing.assert_close(fused_w, default_w, rtol=1e-5, atol=1e-6)


def test_mixed_precision_with_gradient_clipping_trains_on_torchs_default_step() -> None:
    """A fused optimizer unscales its own gradients, which Lightning's mixed precision refuses
    together with clipping ("does not allow for gradient clipping"): under `*-mixed` the step is
    torch's default, and the fit runs."""
    params = {"model": "mlp_classifier", "data": "digits", "batch_size": 32}
    datamodule = build_data(params)
    model = build_model(params, datamodule)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=1,
        precision="bf16-mixed",
        gradient_clip_val=1.0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, datamodule=datamodule)
    assert trainer.global_step == 3 and trainer.optimizers[0].defaults["fused"] is None


def test_a_checkpoint_from_the_unfused_step_resumes_fused() -> None:
    """torch restores each saved group's options; the run's own choice is put back after loading."""
    model, trainer, _ = fit(epochs=1, batches=1)
    optimizer = trainer.optimizers[0]
    saved = optimizer.state_dict()
    for group in saved["param_groups"]:
        group["fused"] = None  # as a checkpoint from before the fused step holds it
    optimizer.load_state_dict(saved)
    assert [group["fused"] for group in optimizer.param_groups] == [True, True]


def test_a_parameter_torch_cannot_fuse_keeps_torchs_default_path() -> None:
    from lightning_modules.base import fused_supported

    assert fused_supported([{"params": [torch.nn.Parameter(torch.zeros(2))]}]) is True
    assert fused_supported([{"params": [torch.nn.Parameter(torch.zeros(2, device="meta"))]}]) is None
    assert fused_supported([{"params": []}]) is None


def test_weight_decay_applies_to_matrices_only() -> None:
    model, trainer, _ = fit(epochs=1, batches=1, weight_decay=0.1)
    decay, no_decay = trainer.optimizers[0].param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_l1_penalty_is_added_and_logged_on_its_own() -> None:
    _, trainer, _ = fit(epochs=1, batches=2, l1=1e-3)
    assert trainer.callback_metrics["train_l1"] > 0
    _, trainer, _ = fit(epochs=1, batches=2, l1=0.0)
    assert "train_l1" not in trainer.callback_metrics


def test_l1_drives_weights_toward_zero() -> None:
    plain, _, _ = fit(epochs=3, l1=0.0, lr=0.01)
    sparse, _, _ = fit(epochs=3, l1=1e-3, lr=0.01)
    assert sparse.l1_penalty() < 0.8 * plain.l1_penalty()


def test_cosine_with_warmup_rises_then_decays() -> None:
    _, _, lrs = fit(epochs=4, batches=5, lr=0.1, scheduler="cosine", warmup_epochs=1)
    assert lrs[0] == pytest.approx(0.1 / 5)
    assert max(lrs) == pytest.approx(0.1) and lrs.index(max(lrs)) == 4  # peak at the end of warmup
    assert lrs[-1] < 0.05 and lrs == lrs[:5] + sorted(lrs[5:], reverse=True)


def test_step_schedule_multiplies_by_gamma_every_step_size_epochs() -> None:
    _, _, lrs = fit(epochs=4, batches=5, lr=0.1, scheduler="step", step_size=2, gamma=0.5)
    assert lrs[:10] == pytest.approx([0.1] * 10) and lrs[10:] == pytest.approx([0.05] * 10)


def test_onecycle_goes_up_then_down() -> None:
    _, _, lrs = fit(epochs=4, batches=5, lr=0.1, scheduler="onecycle")
    peak = lrs.index(max(lrs))
    assert 0 < peak < len(lrs) - 1 and lrs[0] < 0.1 / 5 and lrs[-1] < lrs[0]


def test_no_scheduler_keeps_lr_constant() -> None:
    _, _, lrs = fit(epochs=2, batches=3, lr=0.02)
    assert lrs == pytest.approx([0.02] * 6)


def test_unknown_optimizer_is_rejected() -> None:
    with pytest.raises(ValueError, match="optimizer: Input should be 'sgd', 'adam' or 'adamw'"):
        fit(epochs=1, batches=1, optimizer="lamb")
