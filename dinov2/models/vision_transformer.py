"""The DINOv2 Vision Transformer, parameter-for-parameter and numerically identical to the reference.

State-dict keys, shapes and forward semantics follow facebookresearch/dinov2 (see
../shared/conformance/README.md), so DinoBloom and DINOv2 checkpoints load unchanged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dinov2.layers import Block, BlockChunk, LayerNorm, LayerScale, Mlp, PatchEmbed, SwiGLUFFNFused

logger = logging.getLogger(__name__)

FFN_LAYERS = ("mlp", "swiglu", "swiglufused", "identity")


def _identity_ffn(*args: object, **kwargs: object) -> nn.Module:
    return nn.Identity()


def _ffn_factory(ffn_layer: str) -> Callable[..., nn.Module]:
    if ffn_layer == "mlp":
        return Mlp
    if ffn_layer in ("swiglu", "swiglufused"):
        return SwiGLUFFNFused
    if ffn_layer == "identity":
        return _identity_ffn
    raise ValueError(f"unknown ffn_layer {ffn_layer!r}; expected one of {', '.join(FFN_LAYERS)}")


def _init_linear_trunc_normal(module: nn.Module) -> None:
    """timm's ViT init: truncated-normal (std 0.02) linear weights and zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def resample_pos_embed(
    pos_embed: torch.Tensor, patch_size: int, height: int, width: int, offset: float, antialias: bool
) -> torch.Tensor:
    """A (1, 1 + M*M, D) position embedding resampled for a `height` x `width` image, in float32, as DINOv2 does.

    The M x M patch grid is resized bicubically (align_corners=False, `antialias` as configured); the cls row is
    kept. With a non-zero `offset` DINOv2 passes ``scale_factor=((H/p + offset)/M, (W/p + offset)/M)`` rather
    than a size, and PyTorch then maps coordinates with that exact scale (it changes the result); with offset 0
    the size is passed.
    """
    pos_embed = pos_embed.float()
    n_stored = pos_embed.shape[1] - 1
    side = int(math.sqrt(n_stored))
    if side * side != n_stored:
        raise ValueError(f"pos_embed has {n_stored} patch positions, which is not a square grid")
    grid_h, grid_w = height // patch_size, width // patch_size
    dim = pos_embed.shape[-1]
    if offset:
        resize: dict[str, Any] = {"scale_factor": (float(grid_h + offset) / side, float(grid_w + offset) / side)}
    else:
        resize = {"size": (grid_h, grid_w)}
    patch_pos = F.interpolate(
        pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2), mode="bicubic", antialias=antialias, **resize
    )
    if patch_pos.shape[-2:] != (grid_h, grid_w):
        raise RuntimeError(f"interpolated grid {tuple(patch_pos.shape[-2:])} != expected {(grid_h, grid_w)}")
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
    return torch.cat((pos_embed[:, :1], patch_pos), dim=1)


class DinoVisionTransformer(nn.Module):
    """DINOv2's ViT: patch embedding, cls (+ register) tokens, interpolated position embedding, blocks, norm."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 14,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ffn_bias: bool = True,
        proj_bias: bool = True,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        init_values: float | None = None,
        embed_layer: Callable[..., nn.Module] = PatchEmbed,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        block_fn: Callable[..., nn.Module] = Block,
        ffn_layer: str = "mlp",
        block_chunks: int = 0,
        num_register_tokens: int = 0,
        interpolate_antialias: bool = False,
        interpolate_offset: float = 0.1,
    ) -> None:
        super().__init__()
        if num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {num_register_tokens}")
        norm_layer = partial(LayerNorm, eps=1e-6)

        self.num_features = self.embed_dim = embed_dim
        self.num_tokens = 1
        self.n_blocks = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset

        self.patch_embed = embed_layer(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_tokens, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )

        if drop_path_uniform:
            drop_path_rates = [drop_path_rate] * depth
        else:
            drop_path_rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        ffn = _ffn_factory(ffn_layer)
        blocks = [
            block_fn(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_bias=proj_bias,
                ffn_bias=ffn_bias,
                drop_path=drop_path_rates[i],
                norm_layer=norm_layer,
                act_layer=act_layer,
                ffn_layer=ffn,
                init_values=init_values,
            )
            for i in range(depth)
        ]
        self.chunked_blocks = block_chunks > 0
        if self.chunked_blocks:
            # DINOv2 pads chunk c with Identity modules in front, so chunk c keeps the global block indices
            # (`blocks.{c}.{i}.`) and checkpoints of chunked configs load unchanged.
            chunk_size = depth // block_chunks
            self.blocks = nn.ModuleList(
                BlockChunk([nn.Identity()] * start + blocks[start : start + chunk_size])
                for start in range(0, depth, chunk_size)
            )
        else:
            self.blocks = nn.ModuleList(blocks)

        self.norm = norm_layer(embed_dim)
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.init_weights()

    def init_weights(self) -> None:
        """(Re)initialise every parameter as DINOv2 does; works after `to_empty()` from the meta device."""
        for module in self.modules():
            if isinstance(module, (nn.LayerNorm, nn.Conv2d, LayerScale)):
                module.reset_parameters()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        nn.init.zeros_(self.mask_token)
        self.apply(_init_linear_trunc_normal)

    def iter_blocks(self) -> Iterator[nn.Module]:
        """The transformer blocks in order, skipping the Identity padding of chunked layouts."""
        for module in self.blocks:
            if isinstance(module, BlockChunk):
                yield from (block for block in module if not isinstance(block, nn.Identity))
            else:
                yield module

    def interpolate_pos_encoding(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Position embedding for tokens `x` (cls + patches) of an image of `height` x `width` pixels.

        The stored embedding is used as-is only for the training grid size and square images; otherwise
        the patch grid is resampled as :func:`resample_pos_embed` describes.
        """
        if x.shape[1] - 1 == self.pos_embed.shape[1] - 1 and height == width:
            return self.pos_embed
        pos_embed = resample_pos_embed(
            self.pos_embed, self.patch_size, height, width, self.interpolate_offset, self.interpolate_antialias
        )
        return pos_embed.to(x.dtype)

    def _check_images(self, x: torch.Tensor) -> None:
        """Refuse what the model cannot embed, saying what to pass instead (torch's own errors come later and
        name neither the input nor the remedy)."""
        channels = self.patch_embed.in_chans
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"expected images as a (B, {channels}, H, W) float tensor, got a {type(x).__name__}; make one with "
                "dinov2.data.transforms.make_eval_transform() (torch.stack several)"
            )
        if x.ndim != 4 or x.shape[1] != channels:
            hint = ""
            if x.ndim == 3 and x.shape[0] == channels:
                hint = "; one image: add the batch dimension, x.unsqueeze(0)"
            elif x.ndim == 4 and x.shape[-1] == channels:
                hint = "; channels last: x.permute(0, 3, 1, 2)"
            raise ValueError(f"expected images as a (B, {channels}, H, W) tensor, got shape {tuple(x.shape)}{hint}")
        if not x.is_floating_point():
            raise TypeError(
                f"expected float images, normalised as dinov2.data.transforms.make_eval_transform() does, got {x.dtype}"
            )
        weight = self.patch_embed.proj.weight
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"the images are {x.dtype} but the model's weights are {weight.dtype}: convert one to the other "
                f"(x.to({weight.dtype}) or model.to(...)), or run under torch.autocast"
            )

    def prepare_tokens_with_masks(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Patch-embed images (B, C, H, W), replace masked patches by `mask_token`, add cls/pos/registers."""
        self._check_images(x)
        height, width = x.shape[-2:]
        x = self.patch_embed(x)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, height, width)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)
        if self.training and torch.is_autocast_enabled(x.device.type):
            # Training: the blocks' residual stream in the compute dtype, as DINOv2's training and our multi-GPU
            # runs have it (their FSDP mixed precision casts the parameters, and so the tokens, to it); the float32
            # parameters above would otherwise keep it float32, and every block would pay for float32 adds and
            # casts. In eval mode it stays float32 under autocast, as in DINOv2's hub models, whose features (and
            # their float32 dtype) a user of the released weights compares with.
            x = x.to(torch.get_autocast_dtype(x.device.type))
        return x

    def _split_outputs(self, x: torch.Tensor, masks: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
        x_norm = self.norm(x)
        first_patch = 1 + self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1:first_patch],
            "x_norm_patchtokens": x_norm[:, first_patch:],
            "x_prenorm": x,
            "masks": masks,
        }

    def forward_features(
        self,
        x: torch.Tensor | list[torch.Tensor],
        masks: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
    ) -> dict[str, torch.Tensor | None] | list[dict[str, torch.Tensor | None]]:
        """Normalised cls / register / patch tokens and the pre-norm sequence.

        `x` is a batch (B, C, H, W) or a list of batches (one dict each, each at its own size); `masks`
        is boolean (B, n_patches), True for patches to replace with the mask token, or a list of those.
        """
        if isinstance(x, (list, tuple)):
            masks_list = [None] * len(x) if masks is None else list(masks)
            if len(masks_list) != len(x):
                raise ValueError(f"got {len(x)} image batches but {len(masks_list)} masks")
            return [self.forward_features(xi, mi) for xi, mi in zip(x, masks_list)]
        tokens = self.prepare_tokens_with_masks(x, masks)
        for block in self.blocks:
            tokens = block(tokens)
        return self._split_outputs(tokens, masks)

    def _intermediate_outputs(self, x: torch.Tensor, n: int | Sequence[int]) -> list[torch.Tensor]:
        tokens = self.prepare_tokens_with_masks(x)
        take = set(range(self.n_blocks - n, self.n_blocks) if isinstance(n, int) else n)
        outputs = []
        for index, block in enumerate(self.iter_blocks()):
            tokens = block(tokens)
            if index in take:
                outputs.append(tokens)
        if len(outputs) != len(take):
            raise ValueError(f"requested blocks {sorted(take)} but the model has {self.n_blocks} blocks")
        return outputs

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple[torch.Tensor, ...] | tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """Patch tokens (and optionally cls tokens) of the last `n` blocks, or of the block indices in `n`.

        Outputs are shallow first; `norm` applies the final LayerNorm; `reshape` returns (B, D, h, w) maps.
        """
        outputs = self._intermediate_outputs(x, n)
        if norm:
            outputs = [self.norm(out) for out in outputs]
        class_tokens = [out[:, 0] for out in outputs]
        patches = [out[:, 1 + self.num_register_tokens :] for out in outputs]
        if reshape:
            batch = x.shape[0]
            grid_h, grid_w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
            patches = [
                out.reshape(batch, grid_h, grid_w, -1).permute(0, 3, 1, 2).contiguous() for out in patches
            ]
        if return_class_token:
            return tuple(zip(patches, class_tokens))
        return tuple(patches)

    def forward(
        self,
        x: torch.Tensor | list[torch.Tensor],
        masks: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
        is_training: bool = False,
    ) -> torch.Tensor | list[torch.Tensor] | dict[str, torch.Tensor | None] | list[dict[str, torch.Tensor | None]]:
        """The normalised cls token (B, D), one per batch for a list of batches; with `is_training=True` the full
        `forward_features` output."""
        features = self.forward_features(x, masks)
        if is_training:
            return features
        if isinstance(features, list):
            return [self.head(f["x_norm_clstoken"]) for f in features]
        return self.head(features["x_norm_clstoken"])


#: Width, depth and heads of the architectures DINOv2 defines (all with mlp_ratio 4; ViT-g with a SwiGLU FFN).
ARCH_SIZES: dict[str, tuple[int, int, int]] = {
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_giant2": (1536, 40, 24),
}


def arch_of_width(embed_dim: int) -> str | None:
    """The DINOv2 architecture that is ``embed_dim`` wide, or None for a width DINOv2 does not have."""
    return next((name for name, (width, _, _) in ARCH_SIZES.items() if width == embed_dim), None)


def _sizes(arch: str) -> dict[str, int]:
    """``embed_dim``, ``depth`` and ``num_heads`` of ``arch`` as constructor arguments."""
    embed_dim, depth, num_heads = ARCH_SIZES[arch]
    return {"embed_dim": embed_dim, "depth": depth, "num_heads": num_heads}


def vit_small(patch_size: int = 14, num_register_tokens: int = 0, **kwargs: object) -> DinoVisionTransformer:
    """ViT-S: 384 wide, 12 blocks, 6 heads (21M parameters)."""
    return DinoVisionTransformer(
        patch_size=patch_size,
        **_sizes("vit_small"),
        mlp_ratio=4,
        num_register_tokens=num_register_tokens,
        **kwargs,
    )


def vit_base(patch_size: int = 14, num_register_tokens: int = 0, **kwargs: object) -> DinoVisionTransformer:
    """ViT-B: 768 wide, 12 blocks, 12 heads (86M parameters)."""
    return DinoVisionTransformer(
        patch_size=patch_size,
        **_sizes("vit_base"),
        mlp_ratio=4,
        num_register_tokens=num_register_tokens,
        **kwargs,
    )


def vit_large(patch_size: int = 14, num_register_tokens: int = 0, **kwargs: object) -> DinoVisionTransformer:
    """ViT-L: 1024 wide, 24 blocks, 16 heads (303M parameters)."""
    return DinoVisionTransformer(
        patch_size=patch_size,
        **_sizes("vit_large"),
        mlp_ratio=4,
        num_register_tokens=num_register_tokens,
        **kwargs,
    )


def vit_giant2(patch_size: int = 14, num_register_tokens: int = 0, **kwargs: object) -> DinoVisionTransformer:
    """ViT-g/2: 1536 wide, 40 blocks, 24 heads (1.1B parameters); use with `ffn_layer="swiglufused"`."""
    return DinoVisionTransformer(
        patch_size=patch_size,
        **_sizes("vit_giant2"),
        mlp_ratio=4,
        num_register_tokens=num_register_tokens,
        **kwargs,
    )
