"""LayerScale: a learnable per-channel scale on a residual branch (CaiT / DINOv2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerScale(nn.Module):
    """Multiply the input by a learnable vector `gamma` of length `dim`, initialised to `init_values`."""

    def __init__(self, dim: int, init_values: float = 1e-5, inplace: bool = False) -> None:
        super().__init__()
        self.init_values = init_values
        self.inplace = inplace
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def reset_parameters(self) -> None:
        """Set every entry of `gamma` back to `init_values`."""
        with torch.no_grad():
            self.gamma.fill_(self.init_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scale the last dimension of `x` by `gamma`."""
        return x.mul_(self.gamma) if self.inplace else x * self.gamma


def scaled_linear(x: torch.Tensor, linear: nn.Linear, out_scale: torch.Tensor | None = None) -> torch.Tensor:
    """`linear(x) * out_scale` (per output channel) as one matmul, the scale folded into the weight and bias.

    The product is formed on the (out, in) weight instead of on every token's output, so a LayerScale after
    a projection costs no activation-sized multiply forward or backward, and nothing extra is saved for backward.
    Always folded, whatever the number of tokens: one code path, so the rounding does not switch with the batch
    size (the matmul itself may still round differently for different batch sizes).
    """
    if out_scale is None:
        return linear(x)
    bias = None if linear.bias is None else linear.bias * out_scale
    return F.linear(x, linear.weight * out_scale.unsqueeze(1), bias)
