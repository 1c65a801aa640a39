"""Pretrained backbones: hub entry points, `load_backbone` and the strict weight loader."""

from .backbones import (
    DINOBLOOM_URLS,
    DINOV2_URLS,
    RELEASE_URLS,
    dinobloom_b,
    dinobloom_g,
    dinobloom_l,
    dinobloom_s,
    dinov2_vitb14,
    dinov2_vitg14,
    dinov2_vitl14,
    dinov2_vits14,
    load_backbone,
)
from .loader import (
    CheckpointError,
    extract_backbone_state,
    infer_backbone_config,
    load_backbone_state,
    load_backbone_weights,
    load_pretrained_backbone_state,
    resize_pos_embed,
)

__all__ = [
    "DINOBLOOM_URLS",
    "DINOV2_URLS",
    "RELEASE_URLS",
    "CheckpointError",
    "dinobloom_b",
    "dinobloom_g",
    "dinobloom_l",
    "dinobloom_s",
    "dinov2_vitb14",
    "dinov2_vitg14",
    "dinov2_vitl14",
    "dinov2_vits14",
    "extract_backbone_state",
    "infer_backbone_config",
    "load_backbone",
    "load_backbone_state",
    "load_backbone_weights",
    "load_pretrained_backbone_state",
    "resize_pos_embed",
]
