"""Image to patch-token embedding: a patch-sized, patch-strided convolution (one matmul on CUDA)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def patch_matmul(images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The patch-strided convolution of (B, C, H, W) images with a (D, C, p, p) kernel, as (B, H/p * W/p, D) tokens.

    The kernel equals the stride, so this is one matmul of each flattened (C, p, p) patch with the flattened
    kernel. On CUDA it replaces the convolution, for which cuDNN runs a generic implicit-GEMM kernel (1.6 ms for
    256 crops of 224 px on an H200) where the reordering copy and the matmul take a fraction of that. On the CPU
    oneDNN's convolution is as fast and stays: its gradients, unlike the matmul's, summed the same over one
    batch as over two halves within the FSDP test's tolerance.
    """
    batch, channels, height, width = images.shape
    dim, _, patch_h, patch_w = weight.shape
    grid_h, grid_w = height // patch_h, width // patch_w
    patches = images.reshape(batch, channels, grid_h, patch_h, grid_w, patch_w).permute(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(batch, grid_h * grid_w, channels * patch_h * patch_w)
    return F.linear(patches, weight.reshape(dim, -1), bias)


class PatchEmbed(nn.Module):
    """Split (B, C, H, W) images into non-overlapping patches and project each to `embed_dim`.

    The output is (B, H/p * W/p, D) in row-major patch order, or (B, H/p, W/p, D) with
    `flatten_embedding=False`.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        norm_layer: Callable[[int], nn.Module] | None = None,
        flatten_embedding: bool = True,
    ) -> None:
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        self.patches_resolution = (
            self.img_size[0] // self.patch_size[0],
            self.img_size[1] // self.patch_size[1],
        )
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.flatten_embedding = flatten_embedding
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed the patches of `x`."""
        height, width = x.shape[-2:]
        patch_h, patch_w = self.patch_size
        if height % patch_h or width % patch_w:
            raise ValueError(
                f"input size {height}x{width} is not a multiple of the patch size {patch_h}x{patch_w}"
            )
        if x.is_cuda:
            x = patch_matmul(x, self.proj.weight, self.proj.bias)
        else:
            x = self.proj(x).flatten(2).transpose(1, 2)
        x = self.norm(x)
        grid_h, grid_w = height // patch_h, width // patch_w
        if not self.flatten_embedding:
            x = x.reshape(-1, grid_h, grid_w, self.embed_dim)
        return x
