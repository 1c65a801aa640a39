"""AdamW parameter groups as DINOv2 builds them: layer-wise lr decay, no weight decay on biases/norms/LayerScale.

Rules (those of DINOv2's `get_params_groups_with_decay`, kept exactly so the recipe behaves the same):

* weight decay multiplier 0 for every parameter whose name ends in ``.bias`` or contains ``norm`` or ``gamma``
  (LayerNorms and LayerScale); 1 for everything else, including ``cls_token``, ``pos_embed``, ``mask_token``,
  ``register_tokens`` and the DINO head's ``last_layer.weight_g``;
* lr multiplier ``layerwise_decay ** (depth + 1 - layer_id)`` in a backbone, where the tokens and the patch embedding
  are layer 0, block i is layer i + 1 and everything else (final norm) is layer depth + 1; 1 in a head;
  the patch embedding is further multiplied by ``patch_embed_lr_mult``;
* ``is_last_layer`` marks the head's prototypes (``last_layer``), which follow the ``last_layer_lr`` schedule.

Names come from ``named_parameters()``, which FSDP2 (``fully_shard``) leaves unchanged, so this works on sharded
modules (DTensor parameters) as on plain ones.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.distributed.tensor import DTensor

logger = logging.getLogger(__name__)

_LAYER_ZERO = ("cls_token", "pos_embed", "mask_token", "register_tokens", "patch_embed")
_GROUP_KEYS = ("lr_multiplier", "wd_multiplier", "is_last_layer")


def _layer_id(name: str, n_blocks: int, chunked_blocks: bool) -> int:
    """Depth index of a backbone parameter: 0 for tokens and patch embedding, i + 1 for block i, else depth + 1."""
    if any(token in name for token in _LAYER_ZERO):
        return 0
    parts = name.split(".")
    if "blocks" in parts:
        # Chunked layouts are blocks.<chunk>.<global block index>.*; flat ones blocks.<index>.*
        index = parts.index("blocks") + (2 if chunked_blocks else 1)
        return int(parts[index]) + 1
    return n_blocks + 1


def get_params_groups(
    module: nn.Module, *, layerwise_decay: float = 1.0, patch_embed_lr_mult: float = 1.0
) -> list[dict[str, Any]]:
    """One group per trainable parameter of `module` with `lr_multiplier`, `wd_multiplier`, `is_last_layer`, `name`."""
    if hasattr(module, "n_blocks"):
        n_blocks, chunked = int(module.n_blocks), bool(getattr(module, "chunked_blocks", False))
    elif hasattr(module, "blocks"):
        n_blocks, chunked = len(module.blocks), False
    else:
        n_blocks, chunked = 0, False
    groups = []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        lr_multiplier = 1.0
        if n_blocks > 0:
            lr_multiplier = layerwise_decay ** (n_blocks + 1 - _layer_id(name, n_blocks, chunked))
        if "patch_embed" in name:
            lr_multiplier *= patch_embed_lr_mult
        no_decay = name.endswith(".bias") or "norm" in name or "gamma" in name
        groups.append(
            {
                "params": param,
                "name": name,
                "lr_multiplier": lr_multiplier,
                "wd_multiplier": 0.0 if no_decay else 1.0,
                "is_last_layer": "last_layer" in name,
            }
        )
        logger.debug("%s: lr_multiplier %g, wd_multiplier %g", name, lr_multiplier, groups[-1]["wd_multiplier"])
    return groups


def fuse_params_groups(groups: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge per-parameter groups that share `lr_multiplier`, `wd_multiplier` and `is_last_layer`."""
    fused: dict[tuple, dict[str, Any]] = {}
    for group in groups:
        key = tuple(group[k] for k in _GROUP_KEYS)
        if key not in fused:
            fused[key] = {**{k: group[k] for k in _GROUP_KEYS}, "params": []}
        fused[key]["params"].append(group["params"])
    return list(fused.values())


def build_param_groups(parts: nn.ModuleDict, cfg: DictConfig) -> list[dict[str, Any]]:
    """Fused groups for every part of the student (backbone, heads), with `cfg.optim`'s decay settings."""
    groups: list[dict[str, Any]] = []
    for part in parts.values():
        groups += fuse_params_groups(
            get_params_groups(
                part, layerwise_decay=cfg.optim.layerwise_decay, patch_embed_lr_mult=cfg.optim.patch_embed_lr_mult
            )
        )
    return groups


def build_optimizer(
    param_groups: list[dict[str, Any]], cfg: DictConfig, *, loss_scaled: bool = False
) -> torch.optim.AdamW:
    """AdamW with `cfg.optim`'s betas: the fused kernel when every parameter is on CUDA or every one is an unsharded
    CPU tensor, foreach otherwise.

    Sharded (DTensor) parameters of a run with a loss scaler (`loss_scaled`: the caller's `scaler is not None`, from
    `dinov2.parallel.build_grad_scaler`) also use foreach (see the comment below).

    Learning rate and weight decay are set every iteration by `apply_optim_scheduler`.
    """
    params = [p for group in param_groups for p in group["params"]]
    on_cuda = bool(params) and all(p.device.type == "cuda" for p in params)
    on_cpu = bool(params) and all(p.device.type == "cpu" for p in params)
    sharded = any(isinstance(p, DTensor) for p in params)
    # FSDP's ShardedGradScaler hands the fused kernel a found_inf of shape [1], which it rejects (seen with
    # torch 2.11 on an H200): sharded loss-scaled runs use the foreach kernel. The fused kernel also runs on CPU
    # (about 4x faster than foreach there); sharded CPU parameters (gloo FSDP2) keep foreach.
    fused = (on_cuda and not (sharded and loss_scaled)) or (on_cpu and not sharded)
    kernel = {"fused": True} if fused else {"foreach": True}
    optimizer = torch.optim.AdamW(
        param_groups, lr=0.0, weight_decay=0.0, betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2), **kernel
    )
    _initialize_state(optimizer)
    return optimizer


def _initialize_state(optimizer: torch.optim.AdamW) -> None:
    """Create every parameter's AdamW state now, exactly as AdamW would at its first update (step 0, zero moments).

    A parameter that has had no gradient yet (e.g. one that a loss term switched off never reaches) would otherwise
    have no state in an early checkpoint, and a resumed run could not match that checkpoint's optimizer entries.
    """
    for group in optimizer.param_groups:
        for param in group["params"]:
            on_device = group["fused"] or group["capturable"]
            state = optimizer.state[param]
            state["step"] = torch.zeros((), dtype=torch.float32, device=param.device if on_device else "cpu")
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def apply_optim_scheduler(optimizer: torch.optim.Optimizer, lr: float, wd: float, last_layer_lr: float) -> None:
    """Set each group's lr (`last_layer_lr` for the prototypes) times its multiplier, and weight decay likewise."""
    for group in optimizer.param_groups:
        group["lr"] = (last_layer_lr if group["is_last_layer"] else lr) * group["lr_multiplier"]
        group["weight_decay"] = wd * group["wd_multiplier"]
