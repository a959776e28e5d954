"""Fine-tuning a pretrained Transformer encoder (all-MiniLM-L6-v2) with a classification head.

Three modes, the classic ladder of transfer learning:
- `frozen`: a linear probe; the encoder is fixed (and in eval mode: no dropout), only the head learns;
- `top_k`: the top `unfreeze_layers` encoder layers learn with the head, the rest stay fixed;
- `full`: every weight learns.
`layer_decay` < 1 gives layer-wise learning-rate decay (LLRD): the head learns at `lr`, the top
layer at `lr·d`, the next at `lr·d²`, … the embeddings at `lr·d^(L+1)`, so general low-level
features move least.
"""

from __future__ import annotations

import typing
from typing import Annotated, Any, Literal

import torch
from annotated_types import Ge, Gt, Le
from torch import nn

from lightning_modules.minilm import encoder as pretrained_encoder
from lightning_modules.settings import Sizes, checked
from lightning_modules.tasks import ClassifierModule

Mode = Literal["frozen", "top_k", "full"]
MODES: tuple[str, ...] = typing.get_args(Mode)


class EncoderClassifier(nn.Module):
    """Encoder → mean of the token vectors (padding left out) → dropout → linear head."""

    def __init__(self, encoder: nn.Module, num_classes: int, dropout: float = 0.0, pad_id: int = 0) -> None:
        super().__init__()
        self.encoder = encoder
        self.pad_id = pad_id
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # The mask is derived from the ids, so the model takes one tensor (and exports as one).
        mask = (input_ids != self.pad_id).long()
        hidden = self.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.head(self.dropout(pooled))


class FineTune(ClassifierModule):
    """all-MiniLM-L6-v2 + a head, trained as a linear probe, partly or fully (see the module doc)."""

    task = "text_classification"
    input_kind = "tokens"

    @checked
    def __init__(
        self,
        input_shape: Sizes = (48,),
        num_classes: Annotated[int, Ge(2)] = 6,
        mode: Mode = "full",
        unfreeze_layers: Annotated[int, Ge(0), Le(6)] = 2,  # all-MiniLM-L6-v2 has 6 layers
        layer_decay: Annotated[float, Gt(0), Le(1)] = 1.0,
        **optim: Any,
    ) -> None:
        super().__init__(**optim)
        self.save_hyperparameters()
        self.net = EncoderClassifier(pretrained_encoder(), num_classes, self.dropout)
        layers = self.net.encoder.encoder.layer
        if not 0 <= unfreeze_layers <= len(layers):
            raise ValueError(f"unfreeze_layers must be in [0, {len(layers)}]; got {unfreeze_layers}")
        trainable = {"frozen": 0, "top_k": unfreeze_layers, "full": len(layers)}[mode]
        self.frozen: list[nn.Module] = []
        if trainable < len(layers):
            self.frozen = [self.net.encoder.embeddings, *layers[: len(layers) - trainable]]
            if trainable == 0:
                self.frozen.append(self.net.encoder)
        for module in self.frozen:
            module.requires_grad_(False)
        self._init_classification_metrics(num_classes)

    def train(self, mode: bool = True) -> FineTune:
        """Frozen parts stay in eval mode (no dropout): a probe reads fixed features."""
        super().train(mode)
        for module in self.frozen:
            module.eval()
        return self

    def _depth(self, name: str) -> int:
        """0 for the embeddings, i + 1 for encoder layer i, L + 1 for the head (and the pooler)."""
        layers = len(self.net.encoder.encoder.layer)
        if ".embeddings." in f".{name}":
            return 0
        marker = "encoder.layer."
        if marker in name:
            return int(name.split(marker)[1].split(".")[0]) + 1
        return layers + 1

    def decay_groups(self) -> list[dict[str, Any]]:
        """Weight decay on matrices only, and with `layer_decay` < 1 a learning rate per depth."""
        s, decay = self.optim_settings, self.hparams.layer_decay
        top = len(self.net.encoder.encoder.layer) + 1
        groups: dict[tuple[int, bool], list[nn.Parameter]] = {}
        for name, param in self.named_parameters():
            if param.requires_grad:
                groups.setdefault((self._depth(name), self.is_matrix(param)), []).append(param)
        return [
            {
                "params": params,
                "weight_decay": s["weight_decay"] if is_matrix else 0.0,
                "lr": s["lr"] * decay ** (top - depth),
            }
            for (depth, is_matrix), params in sorted(groups.items())
        ]
