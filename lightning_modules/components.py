"""Plain `nn.Module` networks: no training logic, so they can be reused and tested alone."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MLP(nn.Module):
    """Fully connected net: Linear → ReLU → Dropout per hidden layer, then a Linear head."""

    def __init__(self, in_features: int, hidden_sizes: Sequence[int], out_features: int, dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, out_features))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ConvNet(nn.Module):
    """Two conv + max-pool blocks and two fully connected layers.

    The size of the first fully connected layer is found by running a dummy input through the
    conv blocks, so the same net works for 8×8 digits and for larger images.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (16, 32),
        fc_hidden: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(
                f"cnn needs image input (channels, height, width), got shape {tuple(input_shape)}; "
                "set data flatten: false"
            )
        if len(channels) != 2:
            raise ValueError(f"cnn channels must hold two sizes, got {list(channels)}")
        in_channels = input_shape[0]
        blocks: list[nn.Module] = []
        for out_channels in channels:
            blocks += [
                nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            in_channels = out_channels
        self.features = nn.Sequential(*blocks)
        with torch.no_grad():
            flat = self.features(torch.zeros(1, *input_shape)).numel()
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, fc_hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(fc_hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
