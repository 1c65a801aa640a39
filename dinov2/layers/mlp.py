"""The two-layer feed-forward network of a ViT block (`fc1` -> activation -> `fc2`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .layer_scale import scaled_linear


class Mlp(nn.Module):
    """`fc2(drop(act(fc1(x))))` followed by dropout; hidden width defaults to the input width."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        drop: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop = nn.Dropout(drop) if drop else nn.Identity()

    def forward(self, x: torch.Tensor, out_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the feed-forward network to the last dimension of `x`; `out_scale` multiplies the output."""
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(scaled_linear(x, self.fc2, out_scale))
