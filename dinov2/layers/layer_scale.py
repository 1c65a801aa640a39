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
    """`linear(x) * out_scale` (per output channel), the scale folded into the weight and bias where that is exact
    enough.

    Folded, the product is formed on the (out, in) weight instead of on every token's output, so a LayerScale after
    a projection costs no activation-sized multiply forward or backward, and nothing extra is saved for backward.
    It is folded whatever the number of tokens: one code path, so the rounding does not switch with the batch size
    (the matmul itself may still round differently for different batch sizes). It is not folded when the matmul
    runs in fp16 (fp16 autocast, fp16 parameters): a LayerScale of 1e-5, DINOv2's initial value, times a weight of
    about 1e-2 falls into fp16's subnormal range, where a tenth of the folded weights round to zero and the
    branch's output is off by some 10 %. Under fp16 autocast, scaling the fp16 output by the float32 scale instead
    keeps it to fp16's 0.05 % (the caller casts the result to its token stream's dtype); with fp16 parameters the
    scale itself is an fp16 subnormal, and the branch stays a few % off, as in DINOv2's fp16 FSDP training.
    """
    if out_scale is None:
        return linear(x)
    if _matmul_in_fp16(x, linear.weight):
        return linear(x) * out_scale  # in the scale's dtype: a float32 scale keeps a 1e-5 branch out of subnormals
    bias = None if linear.bias is None else linear.bias * out_scale
    return F.linear(x, linear.weight * out_scale.unsqueeze(1), bias)


def _matmul_in_fp16(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a matmul of ``x`` with ``weight`` runs in fp16: fp16 parameters, or fp16 autocast on ``x``'s device."""
    if weight.dtype == torch.float16:
        return True
    device = x.device.type
    if not torch.amp.is_autocast_available(device):  # the meta device, say: no autocast to ask about
        return False
    return torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16
