"""Post-training compression and what it costs: dynamic int8 quantization, magnitude pruning,
and the measurements every variant is compared on (size on disk, parameters, latency).

Plain torch (`torch.ao.quantization`, `torch.nn.utils.prune`), so the same functions work in a
notebook, a test or a script. Distillation, which trains, is a LightningModule: `distill.py`.
"""

from __future__ import annotations

import copy
import gzip
import io
import statistics
import time
import warnings
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

PRUNABLE = (nn.Linear, nn.Conv2d)


def quantize_dynamic(model: nn.Module) -> nn.Module:
    """A copy with every `nn.Linear` in int8 (weights stored int8, activations quantized on the fly).

    Dynamic quantization needs no calibration data and runs on CPU (fbgemm/qnnpack); conv layers
    stay float, which is why a CNN shrinks less than an MLP.
    """
    from torch.ao.quantization import quantize_dynamic as _quantize

    with warnings.catch_warnings():  # torch 2.13 deprecates quantized tensors in favour of torchao
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*", category=UserWarning)
        return _quantize(copy.deepcopy(model).cpu().eval(), {nn.Linear}, dtype=torch.qint8)


def prunable_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """The weight matrices and kernels magnitude pruning acts on (never biases or norms)."""
    return [(m, "weight") for m in model.modules() if isinstance(m, PRUNABLE)]


def prune_global(model: nn.Module, sparsity: float) -> nn.Module:
    """Zero the `sparsity` fraction of smallest-magnitude weights across all layers at once.

    Global L1-unstructured pruning (`prune.global_unstructured`): the masks stay attached, so
    fine-tuning afterwards keeps the pruned weights at zero; `make_pruning_permanent` bakes them in.
    """
    if not 0 < sparsity < 1:
        raise ValueError(f"sparsity must be in (0, 1); got {sparsity}")
    prune.global_unstructured(prunable_weights(model), pruning_method=prune.L1Unstructured, amount=sparsity)
    return model


def make_pruning_permanent(model: nn.Module) -> nn.Module:
    for module, name in prunable_weights(model):
        if prune.is_pruned(module):
            prune.remove(module, name)
    return model


def sparsity_of(model: nn.Module) -> float:
    """The fraction of zeros among the prunable weights."""
    weights = [getattr(m, n).detach() for m, n in prunable_weights(model)]
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / max(1, total)


def _state_bytes(model: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


def size_mb(model: nn.Module) -> float:
    """Size of the saved state dict, in MB (10^6 bytes): what a deployment ships."""
    return len(_state_bytes(model)) / 1e6


def gzip_size_mb(model: nn.Module) -> float:
    """The same, gzipped: where pruning's zeros show up (a dense tensor of zeros compresses)."""
    return len(gzip.compress(_state_bytes(model), compresslevel=6)) / 1e6


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters), counting quantized weights too.

    A dynamically quantized Linear keeps its weight in a packed param, not in `parameters()`,
    so the state dict is the one place that holds every weight of every variant.
    """
    total = nonzero = 0
    for value in model.state_dict().values():
        if isinstance(value, tuple):  # quantized Linear: (packed weight, bias)
            value = [v for v in value if isinstance(v, torch.Tensor)]
        tensors = value if isinstance(value, list) else [value]
        for tensor in tensors:
            if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0:  # quantization scales
                continue
            if not (tensor.is_floating_point() or tensor.is_quantized):
                continue
            values = tensor.dequantize() if tensor.is_quantized else tensor
            total += values.numel()
            nonzero += int((values != 0).sum())
    return total, nonzero


@torch.no_grad()
def latency_ms(model: nn.Module, batch: torch.Tensor, repeats: int = 30, warmup: int = 3) -> float:
    """Median wall time of one forward pass on `batch`, on CPU, in milliseconds."""
    model = model.cpu().eval()
    for _ in range(warmup):
        model(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(batch)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def measure(model: nn.Module, batch: torch.Tensor, repeats: int = 30) -> dict[str, Any]:
    """Everything a variant is compared on, except its task metric (the notebook adds that)."""
    params, nonzero = count_parameters(model)
    return {
        "size_mb": size_mb(model),
        "size_mb_gzip": gzip_size_mb(model),
        "params": params,
        "nonzero_params": nonzero,
        "latency_ms": latency_ms(model, batch, repeats),
    }


def metric_of(task: str) -> tuple[str, str]:
    """The test metric `score` returns for a task, and whether higher is better ("max"/"min")."""
    if task.endswith("classification"):
        return "test_acc", "max"
    return ("test_r2", "max") if task == "regression" else ("test_loss", "min")


@torch.no_grad()
def score(model: nn.Module, loader: Any, task: str) -> float:
    """The task's test metric for a plain net (any variant, quantized too), without a Trainer:
    accuracy, R², or mean cross-entropy per token."""
    model = model.cpu().eval()
    outputs, targets = [], []
    for x, y in loader:
        outputs.append(model(x))
        targets.append(y)
    out, y = torch.cat(outputs), torch.cat(targets)
    if task.endswith("classification"):
        return float((out.argmax(-1) == y).float().mean())
    if task == "regression":
        out = out.reshape(y.shape)
        return float(1 - ((y - out) ** 2).sum() / ((y - y.mean()) ** 2).sum())
    return float(torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)))
