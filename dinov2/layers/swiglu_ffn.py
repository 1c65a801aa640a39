"""SwiGLU feed-forward networks with DINOv2's packed `w12` / `w3` parameter layout."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .layer_scale import scaled_linear


def swiglu_hidden_features(hidden_features: int) -> int:
    """DINOv2's SwiGLU width rule: two thirds of the MLP width, rounded up to a multiple of 8."""
    return (int(hidden_features * 2 / 3) + 7) // 8 * 8


class SwiGLUFFN(nn.Module):
    """`w3(silu(a) * b)` where `a, b` are the two halves of `w12(x)`; `hidden_features` is used as given."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[..., nn.Module] | None = None,
        drop: float = 0.0,
        bias: bool = True,
    ) -> None:
        # act_layer and drop are accepted so that Mlp and SwiGLU are interchangeable as `ffn_layer`;
        # SwiGLU always uses SiLU gating and no dropout, as in DINOv2.
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.w12 = nn.Linear(in_features, 2 * hidden_features, bias=bias)
        self.w3 = nn.Linear(hidden_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor, out_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the gated feed-forward network to the last dimension of `x`; `out_scale` multiplies the output."""
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return scaled_linear(F.silu(x1) * x2, self.w3, out_scale)


class SwiGLUFFNFused(SwiGLUFFN):
    """The SwiGLU FFN DINOv2 builds for `ffn_layer="swiglu"/"swiglufused"`: hidden width re-scaled by 2/3."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[..., nn.Module] | None = None,
        drop: float = 0.0,
        bias: bool = True,
    ) -> None:
        hidden_features = swiglu_hidden_features(hidden_features or in_features)
        super().__init__(in_features, hidden_features, out_features, act_layer, drop, bias)
