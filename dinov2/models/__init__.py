"""Backbone architectures and `build_model`, which builds them by architecture or hub name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .vision_transformer import (
    ARCH_SIZES,
    DinoVisionTransformer,
    arch_of_width,
    vit_base,
    vit_giant2,
    vit_large,
    vit_small,
)

ARCHITECTURES: dict[str, Callable[..., DinoVisionTransformer]] = {
    "vit_small": vit_small,
    "vit_base": vit_base,
    "vit_large": vit_large,
    "vit_giant2": vit_giant2,
}


def _hub_models() -> dict[str, tuple[str, dict[str, Any]]]:
    """hub name -> (architecture, constructor defaults): exactly the arguments DINOv2's hub builder uses."""
    common: dict[str, Any] = dict(
        patch_size=14,
        init_values=1.0,
        block_chunks=0,
        num_register_tokens=0,
        interpolate_antialias=False,
        interpolate_offset=0.1,
    )
    # DINOv2's `_reg` models use 4 registers and a different pos-embed interpolation.
    registers: dict[str, Any] = dict(num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0)
    sizes = {
        "s": ("vit_small", "mlp"),
        "b": ("vit_base", "mlp"),
        "l": ("vit_large", "mlp"),
        "g": ("vit_giant2", "swiglufused"),
    }
    models: dict[str, tuple[str, dict[str, Any]]] = {}
    for size, (arch, ffn) in sizes.items():
        models[f"dinov2_vit{size}14"] = (arch, {**common, "img_size": 518, "ffn_layer": ffn})
        models[f"dinov2_vit{size}14_reg"] = (arch, {**common, **registers, "img_size": 518, "ffn_layer": ffn})
        models[f"dinobloom_{size}"] = (arch, {**common, "img_size": 224, "ffn_layer": ffn})
    return models


HUB_MODELS = _hub_models()
# What an architecture name fixes; another size is a DinoVisionTransformer of its own.
SIZE_ARGUMENTS = ("embed_dim", "depth", "num_heads", "mlp_ratio")


def build_model(arch: str, **kwargs: Any) -> DinoVisionTransformer:
    """Build a randomly initialised backbone by architecture (`vit_small`...) or hub name (`dinobloom_s`...).

    Hub names start from the hub's constructor defaults; `kwargs` override them, except the size
    (`SIZE_ARGUMENTS`), which the name fixes.
    """
    fixed = [key for key in SIZE_ARGUMENTS if key in kwargs]
    if fixed and (arch in ARCHITECTURES or arch in HUB_MODELS):
        raise ValueError(
            f"{arch} fixes {', '.join(fixed)}; for another size build DinoVisionTransformer(...) directly, or load "
            "the weights with name=None to take the size from them"
        )
    if arch in ARCHITECTURES:
        return ARCHITECTURES[arch](**kwargs)
    if arch in HUB_MODELS:
        base, defaults = HUB_MODELS[arch]
        return ARCHITECTURES[base](**{**defaults, **kwargs})
    known = ", ".join([*ARCHITECTURES, *HUB_MODELS])
    raise ValueError(f"unknown backbone architecture {arch!r}; expected one of: {known}")


__all__ = [
    "ARCHITECTURES",
    "ARCH_SIZES",
    "HUB_MODELS",
    "DinoVisionTransformer",
    "arch_of_width",
    "build_model",
    "vit_base",
    "vit_giant2",
    "vit_large",
    "vit_small",
]
