"""Optimization logic shared by every model, read from hyperparameters.

Subclasses build `self.net` and define the loss; this base owns the optimizer, the
learning-rate schedule (with warmup) and the L1 penalty, so every model is tuned with the
same names: `optimizer`, `lr`, `momentum`, `weight_decay`, `l1`, `scheduler`,
`warmup_epochs`, `step_size`, `gamma`, `dropout`.
"""

from __future__ import annotations

import functools
import math
import typing
from typing import Any, ClassVar

import lightning.pytorch as L
import torch
from torch import nn

from lightning_modules.settings import (
    Dropout,
    Gamma,
    Momentum,
    NonNegativeFloat,
    NonNegativeInt,
    Optimizer,
    PositiveFloat,
    PositiveInt,
    Scheduler,
    checked,
)

OPTIMIZERS: tuple[str, ...] = typing.get_args(Optimizer)
SCHEDULERS: tuple[str, ...] = typing.get_args(Scheduler)


# Where torch has fused optimizer kernels (one kernel per parameter group instead of a Python loop
# over tensors): `torch.optim.Adam`'s `fused` documentation; CPU since torch 2.4.
_FUSED_DEVICES = frozenset({"cpu", "cuda", "mps", "xpu"})


def fused_supported(groups: list[dict[str, Any]], precision: str | None = None) -> bool | None:
    """True when torch's fused SGD/Adam/AdamW kernel can step every parameter in `groups`.

    The fused step is the same update in one kernel per group: on this repository's MLP
    (64 -> 256 -> 256 -> 1, batch 64, CPU, 1 thread) an AdamW step went from ~1.05 ms to
    ~0.75 ms (`bench/overhead.py`, R1 decomposed). Parameters of another device (a `meta`
    tensor, a sharded placeholder) or a non-float dtype keep torch's default (None), which
    picks the foreach or per-tensor path itself. Results may differ from the default path in
    the last bits of a float (a different order of operations), never in the method.

    `precision`: the Trainer's (`"32-true"`, `"bf16-mixed"`, ...). Under a `*-mixed` precision
    the default path is kept: a fused optimizer unscales its own gradients
    (`_step_supports_amp_scaling`), which Lightning's mixed precision refuses together with
    gradient clipping (`MixedPrecision.clip_gradients`: "does not allow for gradient clipping"),
    and under FSDP with a scaler it would skip `ShardedGradScaler.unscale_`, the one place the
    ranks agree on an overflow.
    """
    if precision is not None and "mixed" in str(precision):
        return None
    params = [p for group in groups for p in group["params"]]
    ok = bool(params) and all(p.device.type in _FUSED_DEVICES and p.is_floating_point() for p in params)
    return True if ok else None


def _keep_fused(fused: bool | None, optimizer: torch.optim.Optimizer) -> None:
    """After `load_state_dict`: the groups keep the `fused` this run chose, not the checkpoint's
    (torch restores each saved group's options, so a checkpoint from before the fused step, or
    from a run under another precision, would switch it silently)."""
    for group in optimizer.param_groups:
        group["fused"] = fused


class TrainableModule(L.LightningModule):
    """A LightningModule whose optimizer, schedule and regularization come from hparams."""

    net: nn.Module
    task: ClassVar[str]
    # The rank of one input example the net needs: 3 for (channels, height, width), None for any.
    input_rank: ClassVar[int | None] = None
    # What one input is: "features" (floats) or "tokens" (integer ids); must match the data's.
    input_kind: ClassVar[str] = "features"

    # Names of the rules in `lightning_modules.settings.RULES` this class's settings obey.
    rules: ClassVar[tuple[str, ...]] = ()

    @checked  # each value against its declared type and range (lightning_modules.settings)
    def __init__(
        self,
        *,
        optimizer: Optimizer = "adamw",
        lr: PositiveFloat = 1e-3,
        momentum: Momentum = 0.9,
        weight_decay: NonNegativeFloat = 0.0,
        l1: NonNegativeFloat = 0.0,
        scheduler: Scheduler = "none",
        warmup_epochs: NonNegativeInt = 0,
        step_size: PositiveInt = 10,
        gamma: Gamma = 0.1,
        dropout: Dropout = 0.0,
    ) -> None:
        super().__init__()
        self.optim_settings: dict[str, Any] = dict(
            optimizer=optimizer,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            l1=l1,
            scheduler=scheduler,
            warmup_epochs=warmup_epochs,
            step_size=step_size,
            gamma=gamma,
        )
        self.dropout = dropout

    # -- regularization -------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Record every parameter's shape before a strategy shards it (the Trainer calls `setup`
        before `strategy.setup` wraps the module and calls `configure_optimizers`).

        Under FSDP with `use_orig_params=True` (Lightning's default) the parameter objects stay,
        but each becomes a 1-D view of this rank's shard (torch FSDP docs, "use_orig_params"):
        judged by its shape there, every weight matrix looked like a bias: weight decay became 0
        silently, and `l1 > 0` found no weights to sum and failed. Reproduced with torch FSDP on
        2 gloo ranks (`tests/test_optimization.py`).
        """
        super().setup(stage)
        self.__dict__["_shapes"] = {id(p): (p, tuple(p.shape)) for p in self.parameters()}

    def _shape(self, param: torch.Tensor) -> tuple[int, ...]:
        """`param`'s shape as built (before any sharding); its current shape if `setup` never ran."""
        known = self.__dict__.get("_shapes", {}).get(id(param))
        return known[1] if known is not None and known[0] is param else tuple(param.shape)

    def is_matrix(self, param: torch.Tensor) -> bool:
        """Whether `param` gets weight decay and L1: a matrix or conv kernel (rank >= 2) as built."""
        return len(self._shape(param)) >= 2

    def decay_groups(self) -> list[dict[str, Any]]:
        """Weight decay on matrices and conv kernels only, never on biases or norms (as nanoGPT).

        Two groups: `[{"params": matrices, "weight_decay": wd}, {"params": the rest, "weight_decay": 0}]`;
        a parameter's kind is its shape as built (`is_matrix`), so FSDP's 1-D shards keep theirs.
        """
        decay, no_decay = [], []
        for param in self.parameters():
            if param.requires_grad:
                (decay if self.is_matrix(param) else no_decay).append(param)
        wd = self.optim_settings["weight_decay"]
        return [
            {"params": decay, "weight_decay": wd},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def l1_parts(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sum of |w| over the weights that get weight decay (matrices and kernels), in two 0-d
        tensors: over the weights this rank holds whole, and over those it holds a shard of
        (None when there are none; under FSDP, a module outside its forward holds 1-D shards).
        Each shard's term reaches its own gradient once, so the gradient is right as it is; only
        the shards' value is partial (`regularized` sums it over the ranks to log it)."""
        whole, shards = [], []
        for p in self.parameters():
            if p.requires_grad and self.is_matrix(p):
                (whole if tuple(p.shape) == self._shape(p) else shards).append(p.abs().sum())
        zero = torch.zeros((), device=self.device)
        return (torch.stack(whole).sum() if whole else zero), (torch.stack(shards).sum() if shards else None)

    def l1_penalty(self) -> torch.Tensor:
        """Sum of |w| over the matrices and kernels this rank holds (a 0-d tensor; see `l1_parts`)."""
        whole, shards = self.l1_parts()
        return whole if shards is None else whole + shards

    def regularized(self, loss: torch.Tensor) -> torch.Tensor:
        """Add the L1 penalty (if any) to a training loss and log it on its own (`train_l1`: the
        whole model's, its shards' part summed over the ranks under FSDP)."""
        l1 = self.optim_settings["l1"]
        if l1 <= 0:
            return loss
        whole, shards = self.l1_parts()
        penalty = l1 * (whole if shards is None else whole + shards)
        shown = penalty.detach()
        if shards is not None and self._trainer is not None:  # every rank holds shards: all call reduce
            shown = l1 * (whole.detach() + self.trainer.strategy.reduce(shards.detach().clone(), reduce_op="sum"))
        self.log("train_l1", shown, on_step=False, on_epoch=True)
        return loss + penalty

    # -- optimizer and schedule -------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        s = self.optim_settings
        groups = self.decay_groups()
        trainer = self._trainer  # None when built by hand (a raw loop): full precision
        fused = fused_supported(groups, trainer.precision if trainer is not None else None)
        if s["optimizer"] == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=s["lr"], momentum=s["momentum"], fused=fused)
        elif s["optimizer"] == "adam":
            # Adam's own weight_decay is coupled L2 (added to the gradient), as the name promises.
            opt = torch.optim.Adam(groups, lr=s["lr"], fused=fused)
        else:
            opt = torch.optim.AdamW(groups, lr=s["lr"], fused=fused)
        opt.register_load_state_dict_post_hook(functools.partial(_keep_fused, fused))
        if s["scheduler"] == "none" and s["warmup_epochs"] == 0:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self._scheduler(opt), "interval": "step"}}

    def _scheduler(self, opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        s = self.optim_settings
        total = max(1, int(self.trainer.estimated_stepping_batches))
        per_epoch = max(1, total // max(1, self.trainer.max_epochs or 1))
        warmup = min(total - 1, s["warmup_epochs"] * per_epoch)
        if s["scheduler"] == "onecycle":
            pct = warmup / total if warmup > 0 else 0.3
            # Per-group peaks, so a layer-wise learning-rate decay survives the schedule.
            peaks = [group["lr"] for group in opt.param_groups]
            return torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=peaks, total_steps=total, pct_start=max(pct, 1.0 / total)
            )

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if s["scheduler"] == "cosine":
                progress = (step - warmup) / max(1, total - warmup)
                return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
            if s["scheduler"] == "step":
                return s["gamma"] ** ((step // per_epoch) // s["step_size"])
            return 1.0

        return torch.optim.lr_scheduler.LambdaLR(opt, factor)
