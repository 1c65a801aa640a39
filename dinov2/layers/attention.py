"""Multi-head self-attention through `scaled_dot_product_attention` (xFormers optional, on CUDA only)."""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .layer_scale import scaled_linear

logger = logging.getLogger(__name__)

XFORMERS_DISABLED_ENV = "XFORMERS_DISABLED"


@functools.lru_cache(maxsize=1)
def xformers_attention() -> Callable[..., torch.Tensor] | None:
    """xFormers' `memory_efficient_attention` if installed and not disabled via $XFORMERS_DISABLED, else None.

    xFormers is imported lazily on first use, never when this module is imported.
    """
    if os.environ.get(XFORMERS_DISABLED_ENV):
        return None
    if importlib.util.find_spec("xformers") is None:
        return None
    try:
        from xformers.ops import memory_efficient_attention
    except Exception as err:  # a broken install (e.g. built for another torch) falls back to SDPA
        logger.warning("xformers is installed but cannot be imported (%s); using SDPA attention", err)
        return None
    return memory_efficient_attention


def xformers_for_device(device_type: str) -> Callable[..., torch.Tensor] | None:
    """xFormers' kernel for eager CUDA runs; None (SDPA) on other devices and inside ``torch.compile``.

    Dynamo cannot trace xFormers' lookup (``importlib.util.find_spec``): on CUDA it broke every compiled block's
    graph in two (seen with PyTorch 2.11 on an H200), and Inductor fuses around SDPA in any case.
    """
    if device_type != "cuda" or torch.compiler.is_compiling():
        return None
    return xformers_attention()


class Attention(nn.Module):
    """Self-attention with a fused `qkv` projection (q, k, v order) and an output projection `proj`."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop else nn.Identity()

    def forward(self, x: torch.Tensor, out_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Attend over the tokens of `x` (B, N, D); `out_scale` (D,) multiplies the output (a folded LayerScale)."""
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        dropout = self.attn_drop if self.training else 0.0
        xformers_fn = xformers_for_device(x.device.type)
        if xformers_fn is not None:
            q, k, v = qkv.unbind(2)  # xFormers wants (B, N, heads, head_dim)
            out = xformers_fn(q, k, v, p=dropout, scale=self.scale)
        else:
            # (B, heads, N, head_dim) views; unbinding dim 2 first makes the backward stack dq, dk, dv straight
            # into the (B, N, 3, heads, head_dim) layout of the qkv gradient: one copy fewer than permute-unbind(0)
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=self.scale)
            out = out.transpose(1, 2)
        return self.proj_drop(scaled_linear(out.reshape(batch, tokens, dim), self.proj, out_scale))
