"""LayerNorm that keeps a half-precision token stream in half precision under autocast."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_HALF = (torch.float16, torch.bfloat16)


class LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` (same parameters and keys) that returns bf16/fp16 for bf16/fp16 input under autocast.

    Autocast runs every LayerNorm in float32 and returns float32, which makes a half-precision residual stream
    float32 again after each block. Here it runs as under FSDP mixed precision (DINOv2's, and our multi-GPU
    runs'): weight and bias in the input's dtype (CUDA's kernel takes no mixed dtypes), statistics accumulated
    in float32, output in the input's dtype. Outside autocast, or for float32 input, it is `nn.LayerNorm`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise the last dimension of `x`."""
        if x.dtype in _HALF and torch.is_autocast_enabled(x.device.type):
            weight = None if self.weight is None else self.weight.to(x.dtype)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            with torch.autocast(device_type=x.device.type, enabled=False):
                return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)
        return super().forward(x)
