"""The colour half of the multi-crop augmentation, applied to a whole batch of crops, on any device.

A view is drawn in two halves. Its geometry (crop, flips, rotation) is cut from the uint8 image in the data-loader
worker, which also draws the random parameters of its colour operations (jitter, grayscale, blur, solarisation)
in the order the augmentation always drew them. The colour operations themselves and the normalisation run here:
view by view in the worker (``train.colour_augmentation: workers``, where a view stays in the CPU's caches), or on
a whole batch on the GPU after the uint8 crops were copied there (``device``), where each worker then delivers
2-3 times as many images, and a quarter of float32's bytes cross to the device.

A view's parameters are one float32 row of ``N_PARAMS`` values: jitter on (0/1), its four factors (brightness,
contrast, saturation, hue), the order of its four operations, grayscale on (0/1), blur sigma (0 = no blur),
solarise on (0/1).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from dinov2.data.transforms import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    gaussian_blur,
    normalize_,
    rgb_to_grayscale,
)

__all__ = ["N_PARAMS", "apply_photometric", "finish_crops", "neutral_params"]

JITTER, FACTORS, ORDER, GRAYSCALE, BLUR_SIGMA, SOLARIZE = 0, 1, 5, 9, 10, 11
N_PARAMS = 12
BLUR_KERNEL = 9
SOLARIZE_THRESHOLD = 128.0 / 255.0
# The jitter's operations, by the index the order refers to (torchvision's ColorJitter numbering).
_JITTER_OPS: tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ...] = (
    adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue,
)
# Batch keys: uint8 crops and the parameters of their deferred colour operations.
DEFERRED = {"collated_global_crops": "collated_global_params", "collated_local_crops": "collated_local_params"}


def neutral_params() -> torch.Tensor:
    """The parameters of a view without colour operations (neutral factors, the identity order)."""
    params = torch.zeros(N_PARAMS)
    params[FACTORS : FACTORS + 3] = 1.0
    params[ORDER : ORDER + 4] = torch.arange(4, dtype=torch.float32)
    return params


def _rows(selected: torch.Tensor) -> torch.Tensor | None:
    """Indices of the selected rows (computed on the CPU, so that a GPU batch is never waited for)."""
    rows = selected.nonzero().flatten()
    return rows if rows.numel() else None


def _update_rows(
    x: torch.Tensor, rows: torch.Tensor, op: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    """``x[rows] = op(x[rows])``."""
    if rows.numel() == x.shape[0]:  # every row: no gather and scatter (a no-op copy when ``op`` works in place)
        x.copy_(op(x))
        return
    index = rows.to(x.device, non_blocking=True)
    x.index_copy_(0, index, op(x.index_select(0, index)))


def apply_photometric(crops: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Normalised float32 views from uint8 (N, 3, H, W) crops and their (N, ``N_PARAMS``) colour parameters.

    The crops may live on any device; ``params`` is read on the CPU. Each view gets, in this order, its colour
    jitter (the four operations in its own order, each clamped to [0, 1]), grayscale, Gaussian blur (kernel 9,
    reflect padding), solarisation (threshold 128/255), then the ImageNet normalisation.
    """
    if crops.dtype != torch.uint8 or crops.dim() != 4 or crops.shape[1] != 3:
        raise TypeError(f"expected uint8 (N, 3, H, W) crops, got {crops.dtype} {tuple(crops.shape)}")
    params = params.cpu()
    if params.shape != (crops.shape[0], N_PARAMS):
        raise ValueError(f"expected ({crops.shape[0]}, {N_PARAMS}) colour parameters, got {tuple(params.shape)}")
    x = crops.to(torch.float32).div_(255.0)
    jitter = params[:, JITTER] > 0
    for slot in range(4):
        for op_index, op in enumerate(_JITTER_OPS):
            rows = _rows(jitter & (params[:, ORDER + slot] == op_index))
            if rows is not None:
                factor = params[rows, FACTORS + op_index].view(-1, 1, 1, 1).to(x.device, non_blocking=True)
                _update_rows(x, rows, lambda v, op=op, factor=factor: op(v, factor))
    rows = _rows(params[:, GRAYSCALE] > 0)
    if rows is not None:
        _update_rows(x, rows, lambda v: rgb_to_grayscale(v).expand(-1, 3, -1, -1))
    rows = _rows(params[:, BLUR_SIGMA] > 0)
    if rows is not None:
        sigma = params[rows, BLUR_SIGMA]
        _update_rows(x, rows, lambda v: gaussian_blur(v, sigma, BLUR_KERNEL))
    rows = _rows(params[:, SOLARIZE] > 0)
    if rows is not None:
        _update_rows(x, rows, lambda v: torch.where(v >= SOLARIZE_THRESHOLD, 1.0 - v, v))
    return normalize_(x)


def finish_crops(batch: Mapping[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The batch on ``device``, with the colour operations its collate deferred applied there and the crops as
    ``dtype``; a batch without deferred operations is only moved."""
    params = {key: batch[key] for key in DEFERRED.values() if key in batch}
    moved = {
        key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
        for key, value in batch.items()
        if key not in params
    }
    for crops_key, params_key in DEFERRED.items():
        if params_key in params and moved.get(crops_key) is not None:
            moved[crops_key] = apply_photometric(moved[crops_key], params[params_key]).to(dtype)
    return moved
