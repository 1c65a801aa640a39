"""Projection head of DINO / iBOT: MLP, L2 normalisation, weight-normalised prototypes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DINOHead", "WeightNormLinear"]


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight = weight_g * weight_v / ||weight_v|| (norm per output row).

    It stores the two parameters under the names that ``torch.nn.utils.weight_norm`` used, so DINOv2 and
    DinoBloom checkpoints load unchanged, but it is a plain module: no forward-pre hooks and no
    parametrizations, which keeps the key names stable and works with FSDP2 sharding.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_g = nn.Parameter(torch.empty(out_features, 1))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw the direction like a default ``nn.Linear`` and set every row norm to 1, as DINOv2 does."""
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight_v, -bound, bound)
        nn.init.ones_(self.weight_g)

    @property
    def weight(self) -> torch.Tensor:
        """The effective (out_features, in_features) weight."""
        row_norm = torch.linalg.vector_norm(self.weight_v, dim=1, keepdim=True)
        return self.weight_v * (self.weight_g / row_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply ``x @ weight.T``."""
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        """Shown by ``repr``."""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=False"


def _build_mlp(
    nlayers: int, in_dim: int, bottleneck_dim: int, hidden_dim: int, use_bn: bool, bias: bool
) -> nn.Module:
    """Linear layers with GELU (and BatchNorm) between them; nothing after the last one."""
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim, bias=bias)
    layers: list[nn.Module] = []
    dims = [in_dim] + [hidden_dim] * (nlayers - 1)
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        layers.append(nn.Linear(d_in, d_out, bias=bias))
        if use_bn:
            layers.append(nn.BatchNorm1d(d_out))
        layers.append(nn.GELU())
    layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=bias))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """DINO head: MLP to a bottleneck, L2 normalisation, then a weight-normalised layer to the prototypes.

    State-dict keys follow DINOv2: ``mlp.{0,2,4}.{weight,bias}`` (GELUs at 1 and 3) for ``nlayers=3``
    without BatchNorm, and ``last_layer.weight_g`` (out_dim, 1), ``last_layer.weight_v`` (out_dim,
    bottleneck_dim). Early in training the trainer freezes the prototypes by giving ``last_layer`` a zero
    learning rate (``optim.freeze_last_layer_epochs``), as DINOv2 does.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        mlp_bias: bool = True,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"DINOHead needs nlayers >= 1, got {nlayers}")
        self.mlp = _build_mlp(nlayers, in_dim, bottleneck_dim, hidden_dim, use_bn, mlp_bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.init_weights()

    def init_weights(self) -> None:
        """DINOv2 initialisation: truncated normal (std 0.02) MLP weights, zero biases, unit prototype norms."""
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm1d):
                module.reset_parameters()
        self.last_layer.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (..., in_dim) features to (..., out_dim) prototype scores."""
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, p=2, dim=-1, eps=eps)
        return self.last_layer(x)
