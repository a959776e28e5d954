"""A whole decoder-only Transformer (GPT) in one file, read top-down, after nanoGPT.

`GPTConfig` → `CausalSelfAttention` → `FeedForward` → `Block` → `Transformer` (the plain
`nn.Module`: embeddings, pre-LayerNorm blocks, tied head, `generate`, FLOP count) → `GPT`, the
LightningModule that trains it with next-token cross-entropy and reports perplexity.

Regularization follows the same names as every other model: `dropout` (embeddings, attention
weights, residual branches), `weight_decay` on matrices only (never biases or LayerNorms; see
`TrainableModule.decay_groups`), `l1`, gradient clipping and accumulation in the Trainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.text import Perplexity

from lightning_modules.settings import PositiveInt, checked
from lightning_modules.tasks import SupervisedModule


@dataclass
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 64  # the longest context the model sees
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.0


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees only itself and earlier ones."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd ({config.n_embd}) must be a multiple of n_head ({config.n_head})")
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) → (B, heads, T, head size)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # Fused attention (flash / memory-efficient kernels where the device has them).
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The softmax attention matrix per head, (B, heads, T, T): for looking, not for training."""
        B, T, C = x.shape
        q, k, _ = self.qkv(x).split(C, dim=2)
        q, k = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k))
        scores = q @ k.transpose(-2, -1) / math.sqrt(C // self.n_head)
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)


class FeedForward(nn.Module):
    """The position-wise MLP: widen 4×, GELU, project back."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = FeedForward(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """Token + position embeddings, `n_layer` blocks, a final LayerNorm and a head tied to the embedding."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying: one matrix reads and writes tokens
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections into the residual stream, so depth keeps it stable.
        for name, param in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) → next-token logits (B, T, vocab)."""
        T = idx.shape[1]
        if self.config.block_size < T:
            raise ValueError(f"sequence of length {T} is longer than block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters (the tied head counted once); position embeddings left out by default."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6N for the weights plus 12·L·T·C for attention (PaLM, appendix B)."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.block_size * c.n_embd

    @torch.no_grad()
    def attention_maps(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """Each layer's attention weights (B, heads, T, T) for `idx`."""
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        maps = []
        for block in self.blocks:
            maps.append(block.attn.attention_weights(block.ln_1(x)))
            x = block(x)
        return maps


class GPT(SupervisedModule):
    """A small GPT trained on next-token prediction; logs loss (nats per token) and perplexity."""

    task = "language_modeling"
    monitor = ("val_loss", "min")
    metric_names = ("loss", "ppl")
    input_kind = "tokens"
    metric_batches = 1  # its metric inputs are (B, T, vocabulary) logits: not worth keeping
    rules = ("heads_divide_width",)

    @checked
    def __init__(
        self,
        vocab_size: PositiveInt = 256,
        block_size: PositiveInt = 64,
        n_layer: PositiveInt = 2,
        n_head: PositiveInt = 4,
        n_embd: PositiveInt = 64,
        **optim: Any,
    ) -> None:
        super().__init__(**optim)
        self.save_hyperparameters()
        self.config = GPTConfig(vocab_size, block_size, n_layer, n_head, n_embd, self.dropout)
        self.net = Transformer(self.config)
        self._init_metrics(lambda split: MetricCollection({"ppl": Perplexity()}, prefix=f"{split}_"))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.net(idx)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output.reshape(-1, output.size(-1)), target.reshape(-1))

    def metric_inputs(self, output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return output.detach().float(), target

    def prediction(self, output: torch.Tensor) -> torch.Tensor:
        return output.argmax(dim=-1)

    @torch.no_grad()
    def generate(
        self, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None
    ) -> torch.Tensor:
        """Sample `max_new_tokens` tokens after `prompt` (B, T) or (T,); returns only the new ones.

        The context is cropped to the last `block_size` tokens; `top_k` keeps the k likeliest
        tokens at each step, `temperature` < 1 sharpens the distribution.
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0; got {temperature}")
        was_training = self.training
        self.eval()
        idx = prompt.to(self.device).long()
        squeeze = idx.dim() == 1
        idx = idx.unsqueeze(0) if squeeze else idx
        start = idx.shape[1]
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.block_size :])[:, -1, :].float() / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            idx = torch.cat([idx, torch.multinomial(logits.softmax(dim=-1), num_samples=1)], dim=1)
        self.train(was_training)
        new = idx[:, start:]
        return new[0] if squeeze else new

    def estimate_mfu(self, tokens_per_second: float, peak_flops: float) -> float:
        """Model FLOPs utilization: achieved training FLOP/s ÷ the device's peak FLOP/s."""
        return tokens_per_second * self.net.flops_per_token() / peak_flops
