"""The pre-norm transformer block of DINOv2 (attention and FFN residuals, each with LayerScale)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .attention import Attention
from .layer_scale import LayerScale
from .mlp import Mlp
from .swiglu_ffn import SwiGLUFFN


def drop_add_residual_batch_subset(
    x: torch.Tensor,
    residual_func: Callable[[torch.Tensor], torch.Tensor],
    sample_drop_ratio: float,
) -> torch.Tensor:
    """Stochastic depth that only computes the residual on the kept samples (cheaper for large drop rates).

    The residual of a random subset of `(1 - sample_drop_ratio)` of the batch is added, scaled by
    batch/subset so the expectation matches the full residual.
    """
    batch = x.shape[0]
    keep = max(int(batch * (1.0 - sample_drop_ratio)), 1)
    index = torch.randperm(batch, device=x.device)[:keep]
    residual = residual_func(x[index]).to(x.dtype)
    out = torch.index_add(x.flatten(1), 0, index, residual.flatten(1), alpha=batch / keep)
    return out.view_as(x)


class Block(nn.Module):
    """`x + ls1(attn(norm1(x)))`, then `x + ls2(mlp(norm2(x)))`, with stochastic depth when training."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: float | None = None,
        drop_path: float = 0.0,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        attn_class: Callable[..., nn.Module] = Attention,
        ffn_layer: Callable[..., nn.Module] = Mlp,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn_class(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, attn_drop=attn_drop, proj_drop=drop
        )
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = ffn_layer(
            in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop, bias=ffn_bias
        )
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.sample_drop_ratio = drop_path

    # A LayerScale after our own attention / FFN is folded into their output projection (`scaled_linear`):
    # same result, without a separate multiply over every token and its saved input.
    def _attn_residual(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.ls1, LayerScale) and isinstance(self.attn, Attention):
            return self.attn(self.norm1(x), out_scale=self.ls1.gamma)
        return self.ls1(self.attn(self.norm1(x)))

    def _ffn_residual(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.ls2, LayerScale) and isinstance(self.mlp, (Mlp, SwiGLUFFN)):
            return self.mlp(self.norm2(x), out_scale=self.ls2.gamma)
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to tokens `x` (B, N, D)."""
        if self.training and self.sample_drop_ratio > 0.0:
            # As DINOv2's student, whose blocks take its list of crops (`forward_nested`): each residual is
            # computed for a random subset of the samples at any drop rate, not masked per sample.
            x = drop_add_residual_batch_subset(x, self._attn_residual, self.sample_drop_ratio)
            return drop_add_residual_batch_subset(x, self._ffn_residual, self.sample_drop_ratio)
        x = x + self._attn_residual(x).to(x.dtype)  # (a branch scaled in float32 under fp16 autocast)
        return x + self._ffn_residual(x).to(x.dtype)


class BlockChunk(nn.ModuleList):
    """A run of consecutive blocks applied in order (DINOv2's `block_chunks` layout for FSDP wrapping)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply every block of the chunk in turn."""
        for block in self:
            x = block(x)
        return x
