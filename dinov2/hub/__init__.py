"""Pretrained backbones: hub entry points, `load_backbone` and the strict weight loader."""

from .backbones import *  # noqa: F403  (the entry points, `load_backbone` and the release URLs)
from .backbones import __all__ as _backbones_all
from .loader import (
    extract_backbone_state,
    infer_backbone_config,
    load_backbone_state,
    load_backbone_weights,
    load_pretrained_backbone_state,
    resize_pos_embed_as_dinobloom,
)

__all__ = [
    *_backbones_all,
    "extract_backbone_state",
    "infer_backbone_config",
    "load_backbone_state",
    "load_backbone_weights",
    "load_pretrained_backbone_state",
    "resize_pos_embed_as_dinobloom",
]
