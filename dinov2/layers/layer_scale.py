"""LayerScale: a learnable per-channel scale on a residual branch (CaiT / DINOv2)."""

from __future__ import annotations

import torch
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
