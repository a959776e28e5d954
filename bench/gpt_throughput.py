"""GPT training throughput (tokens/s) and model FLOPs utilization, per precision and strategy.

MFU = achieved training FLOP/s (tokens/s × `Transformer.flops_per_token()`, PaLM's 6N + 12·L·T·C)
÷ the matmul ceiling *measured on the same device in the same run* (a large square matmul in
that precision), so the ratio means the same on a laptop CPU and on an H100.

Run on CPU:  .venv/bin/python bench/gpt_throughput.py
On a GPU:    .venv/bin/python bench/gpt_throughput.py --accelerator gpu --devices 1 \
                 --precision 32-true bf16-mixed --size medium   (and --strategy ddp --devices 2, fsdp)
Writes bench/gpt_throughput.json. Variants are interleaved and repeated; min and median reported.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import lightning.pytorch as L
import torch

from lightning_modules import build_data, build_model

SIZES = {  # laptop-size defaults; `medium` is for a GPU
    "small": dict(n_layer=2, n_head=4, n_embd=128, block_size=128, batch_size=32),
    "medium": dict(n_layer=8, n_head=8, n_embd=512, block_size=256, batch_size=64),
}


def matmul_ceiling(device: str, dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of an n×n matmul in `dtype`: the best this device does on the op a GPT is made of."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


class Timer(L.Callback):
    """Wall time of the training batches after `warmup` steps (compile, caches, allocator settle)."""

    def __init__(self, warmup: int = 3) -> None:
        self.warmup, self.start, self.steps = warmup, 0.0, 0

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.warmup:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step > self.warmup:
            self.steps += 1

    def seconds(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - self.start


def throughput(args: argparse.Namespace, precision: str, strategy: str) -> tuple[float, float]:
    """Tokens per second (all processes together) and the model's training FLOPs per token."""
    params = {"model": "gpt", "data": "text", "corpus_bytes": args.corpus_bytes, **SIZES[args.size]}
    datamodule = build_data(params)
    datamodule.setup()
    model = build_model(params, datamodule)
    timer = Timer()
    trainer = L.Trainer(
        max_steps=args.steps + timer.warmup,
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=strategy,
        precision=precision,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(model, datamodule=datamodule)
    tokens = timer.steps * params["batch_size"] * params["block_size"] * trainer.world_size
    return tokens / timer.seconds(), model.net.flops_per_token()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", default=1, type=int)
    parser.add_argument("--precision", nargs="+", default=["32-true", "bf16-mixed"])
    parser.add_argument("--strategy", nargs="+", default=["auto"])
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--corpus-bytes", type=int, default=400_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=str(Path(__file__).with_name("gpt_throughput.json")))
    args = parser.parse_args()

    device = "cuda" if args.accelerator in ("gpu", "cuda") else "cpu"
    dtypes = {"32-true": torch.float32, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
    variants = [(p, s) for s in args.strategy for p in args.precision]
    timings: dict[str, list[float]] = {f"{p}, {s}": [] for p, s in variants}
    ceilings: dict[str, list[float]] = {p: [] for p in args.precision}
    flops = 0.0
    for _ in range(args.repeats):  # interleaved: each repeat runs every variant once
        for precision in args.precision:
            ceilings[precision].append(matmul_ceiling(device, dtypes.get(precision, torch.float32)))
        for precision, strategy in variants:
            tokens_per_s, flops = throughput(args, precision, strategy)
            timings[f"{precision}, {strategy}"].append(tokens_per_s)

    results = {}
    for (precision, strategy), (name, values) in zip(variants, timings.items(), strict=True):
        peak = max(ceilings[precision]) * (args.devices if strategy != "auto" else 1)
        results[name] = {
            "tokens_per_s_max": max(values),
            "tokens_per_s_median": statistics.median(values),
            "matmul_ceiling_tflops": peak / 1e12,
            "mfu_max": max(values) * flops / peak,
        }
    machine = (
        torch.cuda.get_device_name() if device == "cuda" else f"{platform.machine()}, {torch.get_num_threads()} threads"
    )
    report = {"machine": machine, "size": SIZES[args.size], "steps": args.steps, "repeats": args.repeats}
    report |= {"flops_per_token": flops, "results": results}
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{machine}; gpt {args.size}: {flops / 1e6:.1f} MFLOP per token")
    print("| precision, strategy | tokens/s (max) | tokens/s (median) | matmul ceiling | MFU |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in results.items():
        print(
            f"| {name} | {r['tokens_per_s_max']:,.0f} | {r['tokens_per_s_median']:,.0f} "
            f"| {r['matmul_ceiling_tflops']:.3f} TFLOP/s | {r['mfu_max']:.1%} |"
        )


if __name__ == "__main__":
    main()
