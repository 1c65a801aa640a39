"""Batch collation for self-supervised training: stack the crops and draw the iBOT patch masks."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from dinov2.data.masking import MaskingGenerator, RandomSource
from dinov2.data.photometric import DEFERRED, apply_photometric

__all__ = ["collate_data_and_cast"]


def _crop_major(samples_list: Sequence[Any], key: str) -> list[torch.Tensor]:
    """Entry ``key`` of every sample's crops dict, crop-major ([crop0 of all images, crop1 of all images, ...])."""
    per_sample: list[Sequence[torch.Tensor]] = []
    for index, sample in enumerate(samples_list):
        crops_dict = sample[0]
        if not isinstance(crops_dict, Mapping) or key not in crops_dict:
            raise KeyError(f"collate: sample {index} has no '{key}' entry in its crops dict")
        per_sample.append(crops_dict[key])
    n_crops = len(per_sample[0])
    if any(len(crops) != n_crops for crops in per_sample):
        raise ValueError(f"collate: samples have different numbers of '{key}': {[len(c) for c in per_sample]}")
    return [crops[i] for i in range(n_crops) for crops in per_sample]


def _stack_crops(samples_list: Sequence[Any], key: str, dtype: torch.dtype, defer_colour: bool) -> dict[str, Any]:
    """The batch entries of crops ``key``: ``collated_<key>`` (None without crops) and, when the colour operations
    are deferred to the device, their parameters (``DEFERRED[collated_<key>]``).

    Samples of :class:`~dinov2.data.augmentations.DataAugmentationDINO` carry uint8 crops and their colour
    parameters (``<key>_params``): the colour operations run here, view by view, and the views are stored as
    ``dtype``; or, with ``defer_colour``, the uint8 crops and their parameters are passed on. Crops without
    parameters (already finished) are stacked as ``dtype``.
    """
    name = f"collated_{key}"
    tensors = _crop_major(samples_list, key)
    if not tensors:
        return {name: None}
    if f"{key}_params" not in samples_list[0][0]:
        return {name: _stack_as(tensors, dtype)}
    params = torch.stack(_crop_major(samples_list, f"{key}_params"))
    if defer_colour:
        return {name: _stack_as(tensors, torch.uint8), DEFERRED[name]: params}
    out = _batch_output(tensors, dtype)
    for row, crop, view_params in zip(out, tensors, params):  # view by view: each stays in the CPU's caches
        row.copy_(apply_photometric(crop[None], view_params[None])[0])
    return {name: out}


def _stack_as(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``torch.stack(tensors)`` as ``dtype``, into shared memory in a DataLoader worker."""
    out = _batch_output(tensors, dtype)
    if tensors[0].dtype == dtype:
        return torch.stack(tensors, out=out)
    for row, tensor in zip(out, tensors):  # converted while copied: one pass, no float32 batch in between
        row.copy_(tensor)
    return out


def _batch_output(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """An empty ``dtype`` batch for ``tensors``; in a DataLoader worker, in shared memory (as ``default_collate``).

    The batch then crosses to the main process without the extra copy into shared memory that sending a
    private tensor costs.
    """
    first = tensors[0]
    shape = (len(tensors), *first.shape)
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype, device=first.device)
    nbytes = first.numel() * len(tensors) * dtype.itemsize
    storage = first.untyped_storage()._new_shared(nbytes, device=first.device)
    return torch.empty(0, dtype=dtype, device=first.device).set_(storage).view(shape)


def collate_data_and_cast(
    samples_list: Sequence[Any],
    mask_ratio_tuple: tuple[float, float],
    mask_probability: float,
    dtype: torch.dtype,
    mask_generator: MaskingGenerator,
    rng: random.Random | None = None,
    defer_colour: bool = False,
) -> dict[str, Any]:
    """Collate ``(crops_dict, target)`` samples into a training batch with iBOT masks for the global crops.

    A fraction ``mask_probability`` of the global crops gets masks whose ratios are spread over
    ``mask_ratio_tuple`` (evenly spaced bins, one per masked crop, each ratio drawn uniformly within its bin),
    the others get none; the list is then shuffled. Random numbers come from the module-level ``random``
    unless ``rng`` is given. ``collated_local_crops`` is None when the samples carry no local crops. The crops
    are collated as ``dtype``: a mixed-precision run passes its compute dtype (DINOv2 collated fp16), which halves
    the bytes that cross to the main process and to the GPU and gives the first layer the very input autocast
    would have given it. ``defer_colour``: leave the augmentation's colour operations to
    :func:`dinov2.data.photometric.finish_crops` on the device (the crops stay uint8, with their parameters).
    """
    if not samples_list:
        raise ValueError("collate: empty samples_list")
    source: RandomSource = random if rng is None else rng

    crops = _stack_crops(samples_list, "global_crops", dtype, defer_colour)
    if crops["collated_global_crops"] is None:
        raise ValueError("collate: samples have no global crops")
    crops.update(_stack_crops(samples_list, "local_crops", dtype, defer_colour))
    collated_global_crops = crops["collated_global_crops"]

    n_crops = collated_global_crops.shape[0]
    n_masked_crops = int(n_crops * mask_probability)
    # Float32 bin edges and float32 ratio arithmetic reproduce the reference masks exactly.
    edges = torch.linspace(mask_ratio_tuple[0], mask_ratio_tuple[1], n_masked_crops + 1)
    masks: list[np.ndarray] = []
    for i in range(n_masked_crops):
        low, high = edges[i], edges[i + 1]
        ratio = low + (high - low) * source.random()
        masks.append(mask_generator(int(mask_generator.num_patches * ratio), rng=rng))
    masks.extend(mask_generator(0, rng=rng) for _ in range(n_masked_crops, n_crops))
    source.shuffle(masks)

    collated_masks = torch.from_numpy(np.stack(masks)).flatten(1)
    mask_indices_list = collated_masks.flatten().nonzero().flatten()
    per_crop_weight = 1.0 / collated_masks.sum(dim=-1, dtype=torch.float32).clamp(min=1.0)
    masks_weight = per_crop_weight.unsqueeze(-1).expand_as(collated_masks)[collated_masks]

    return {
        **crops,
        "collated_masks": collated_masks,
        "mask_indices_list": mask_indices_list,
        "masks_weight": masks_weight,
    }
