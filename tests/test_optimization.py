"""The shared optimization logic: optimizers, weight decay groups, L1, schedules with warmup."""

from __future__ import annotations

import os
from typing import Any

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


FSDP_PARAMS = {"model": "mlp_regressor", "data": "regression", "batch_size": 8, "weight_decay": 0.1, "l1": 0.01}


def _fsdp_rank(rank: int, port: int, found: Any) -> None:
    """One of 2 gloo ranks: the module wrapped as Lightning's FSDPStrategy wraps it (after the
    Trainer's `setup` call, `use_orig_params=True`), then what labbook's optimization sees."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        module = build_model(FSDP_PARAMS, build_data(FSDP_PARAMS))
        module.setup("fit")
        wrapped = FullyShardedDataParallel(module, use_orig_params=True, device_id=torch.device("cpu"))
        decay, no_decay = module.decay_groups()
        whole, shards = module.l1_parts()
        torch.manual_seed(1)
        x, y = torch.randn(4, 10), torch.randn(4, 1)
        (torch.nn.functional.mse_loss(wrapped(x), y) + 0.01 * module.l1_penalty()).backward()
        with FullyShardedDataParallel.summon_full_params(wrapped, with_grads=True):
            grads = {name: p.grad.tolist() for name, p in module.named_parameters()}
        found.put(
            {
                "rank": rank,
                "shapes": [tuple(p.shape) for p in module.parameters()],
                "decayed": sum(p.numel() for p in decay["params"]),
                "not_decayed": sum(p.numel() for p in no_decay["params"]),
                "l1": float(whole.detach()) + (float(shards.detach()) if shards is not None else 0.0),
                "grads": grads,
            }
        )
    finally:
        dist.destroy_process_group()


def test_under_fsdp_weight_decay_and_l1_see_the_matrices_as_built() -> None:
    """FSDP (use_orig_params) turns every parameter into a 1-D view of a rank's shard before
    `configure_optimizers`: judged by shape there, no weight got weight decay. Two real gloo
    ranks (torch FSDP runs on CPU; Lightning's strategy refuses it, so the wrap is done by hand)."""
    import multiprocessing

    torch.manual_seed(0)
    reference = build_model(FSDP_PARAMS, build_data(FSDP_PARAMS))
    matrices = sum(p.numel() for p in reference.parameters() if p.dim() >= 2)
    others = sum(p.numel() for p in reference.parameters() if p.dim() < 2)
    torch.manual_seed(1)
    x, y = torch.randn(4, 10), torch.randn(4, 1)
    (torch.nn.functional.mse_loss(reference(x), y) + 0.01 * reference.l1_penalty()).backward()
    context = multiprocessing.get_context("spawn")  # this process has run torch: fork could hang its threads
    found = context.Queue()
    port = _free_port()
    ranks = [context.Process(target=_fsdp_rank, args=(rank, port, found)) for rank in range(2)]
    for process in ranks:
        process.start()
    results = _results(found, ranks)
    assert all(len(shape) == 1 for r in results for shape in r["shapes"])  # the case: every parameter is 1-D
    assert sum(r["decayed"] for r in results) == matrices
    assert sum(r["not_decayed"] for r in results) == others
    assert sum(r["l1"] for r in results) == pytest.approx(float(reference.l1_penalty()), rel=1e-5)
    for r in results:  # the L1 term on shards reaches each gradient once: as on one process
        for name, param in reference.named_parameters():
            assert torch.tensor(r["grads"][name]) == pytest.approx(param.grad, abs=1e-6), name


def _results(found: Any, processes: list[Any], timeout: float = 120.0) -> list[dict[str, Any]]:
    """One result per process, failing at once when one of them dies without giving its own."""
    import queue
    import time

    results: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(results) < len(processes):
        try:
            results.append(found.get(timeout=0.5))
        except queue.Empty:
            dead = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
            assert not dead and time.monotonic() < deadline, f"a rank failed (exit codes {dead}) or timed out"
    for process in processes:
        process.join(timeout=30)
    return results


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
