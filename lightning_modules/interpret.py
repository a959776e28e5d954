"""Why a model predicts what it does: input attributions (captum) and attention maps.

- `feature_attributions`: integrated gradients (or plain saliency) of the predicted class with
  respect to each input feature: for digits, one 8×8 heatmap per example.
- `token_attributions`: integrated gradients through a Transformer encoder's embedding layer,
  summed over the embedding dimension: one score per token (the text classifier).
- `attention_maps`: each layer's attention weights, (layers, heads, T, T), for the gpt and for
  the fine-tuned encoder.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

Method = Literal["integrated_gradients", "saliency"]
METHODS: tuple[str, ...] = ("integrated_gradients", "saliency")


def feature_attributions(
    net: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    method: Method = "integrated_gradients",
    n_steps: int = 32,
) -> torch.Tensor:
    """Attribution of `targets` (class indices) to every input feature; same shape as `inputs`.

    Integrated gradients integrates the gradient along the straight path from an all-zero
    input (a blank image) and its attributions sum to output(x) − output(0); saliency is
    |∂ output / ∂ x| at the input, cheaper and noisier.
    """
    from captum.attr import IntegratedGradients, Saliency

    net = net.eval()
    inputs = inputs.clone().requires_grad_(True)
    if method == "integrated_gradients":
        return (
            IntegratedGradients(net).attribute(inputs, baselines=inputs * 0, target=targets, n_steps=n_steps).detach()
        )
    if method == "saliency":
        return Saliency(net).attribute(inputs, target=targets).detach()
    raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")


def token_attributions(
    net: nn.Module,
    embeddings: nn.Module,
    input_ids: torch.Tensor,
    targets: torch.Tensor,
    pad_id: int,
    n_steps: int = 32,
) -> torch.Tensor:
    """(batch, tokens): integrated gradients at `embeddings`' output, from an all-padding baseline."""
    from captum.attr import LayerIntegratedGradients

    net = net.eval()
    baseline = torch.full_like(input_ids, pad_id)
    attributions = LayerIntegratedGradients(net, embeddings).attribute(
        input_ids, baselines=baseline, target=targets, n_steps=n_steps
    )
    return attributions.sum(-1).detach()


@torch.no_grad()
def attention_maps(net: nn.Module, input_ids: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """(layers, heads, T, T) attention weights for one sequence `input_ids` of shape (1, T)."""
    if hasattr(net, "attention_maps"):  # our gpt's Transformer
        maps = net.attention_maps(input_ids)
    else:  # a Hugging Face encoder inside EncoderClassifier: ask it for eager attention weights
        encoder = net.encoder
        previous = encoder.config._attn_implementation
        encoder.set_attn_implementation("eager")  # sdpa kernels return no weights
        try:
            mask = (input_ids != pad_id).long()
            maps = encoder(input_ids=input_ids, attention_mask=mask, output_attentions=True).attentions
        finally:
            encoder.set_attn_implementation(previous)
    return torch.stack([m[0] for m in maps])


def tokens_html(tokens: Sequence[str], scores: torch.Tensor, title: str = "") -> str:
    """Tokens coloured by attribution: green supports the prediction, red speaks against it."""
    scale = float(scores.abs().max()) or 1.0
    spans = []
    for token, score in zip(tokens, scores.tolist(), strict=True):
        alpha = min(1.0, abs(score) / scale)
        colour = f"rgba(0,160,0,{alpha:.2f})" if score >= 0 else f"rgba(220,0,0,{alpha:.2f})"
        spans.append(f'<span title="{score:+.4f}" style="background:{colour};padding:1px">{html.escape(token)}</span>')
    heading = f"<p><b>{html.escape(title)}</b></p>" if title else ""
    return f"{heading}<p style='font-family:monospace;line-height:1.8'>{' '.join(spans)}</p>"
