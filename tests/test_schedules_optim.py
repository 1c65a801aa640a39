"""Schedules (DINOv2 semantics) and the optimizer's parameter groups."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from dinov2.configs import TRAIN_CONFIG_DIR, apply_scaling_rules_to_cfg, load_config
from dinov2.layers import DINOHead
from dinov2.models import DinoVisionTransformer
from dinov2.train.optim import (
    apply_optim_scheduler,
    build_optimizer,
    build_param_groups,
    fuse_params_groups,
    get_params_groups,
)
from dinov2.train.schedules import CosineScheduler, build_schedulers, total_iterations


def _tiny_student(block_chunks: int = 0, depth: int = 2) -> nn.ModuleDict:
    torch.manual_seed(0)
    backbone = DinoVisionTransformer(
        img_size=28, patch_size=14, embed_dim=32, depth=depth, num_heads=2, init_values=1e-5, block_chunks=block_chunks
    )
    return nn.ModuleDict({"backbone": backbone, "dino_head": DINOHead(32, 16, hidden_dim=16, bottleneck_dim=8)})


def test_cosine_scheduler_warmup_cosine() -> None:
    s = CosineScheduler(base_value=1.0, final_value=0.0, total_iters=8, warmup_iters=4, start_warmup_value=0.2)
    half_cos = [0.5 * (1 + math.cos(math.pi * i / 4)) for i in range(4)]  # cosine part of length 4
    expected = [0.2, 0.2 + 0.8 / 3, 0.2 + 1.6 / 3, 1.0, *half_cos]
    assert [s[i] for i in range(8)] == pytest.approx(expected)
    assert s[8] == 0.0 and s[10_000] == 0.0  # final_value past the end
    with pytest.raises(ValueError, match="total_iters"):
        CosineScheduler(1.0, 0.0, total_iters=3, warmup_iters=4)
    with pytest.raises(IndexError):
        s[-1]


def test_constant_after_warmup_only_schedule() -> None:
    temp = CosineScheduler(0.07, 0.07, total_iters=30, warmup_iters=30, start_warmup_value=0.04)
    assert temp[0] == pytest.approx(0.04) and temp[29] == pytest.approx(0.07) and temp[30] == pytest.approx(0.07)
    assert np.all(np.diff(temp.schedule) > 0)


def test_build_schedulers_for_the_dinobloom_recipe() -> None:
    cfg = apply_scaling_rules_to_cfg(load_config(TRAIN_CONFIG_DIR / "custom.yaml"), world_size=8)
    s = build_schedulers(cfg)
    total, epoch = total_iterations(cfg), 500
    assert total == 200 * 500
    peak = 2e-4 * math.sqrt(960 / 1024)
    assert s["lr"][0] == 0.0 and s["lr"][20 * epoch - 1] == pytest.approx(peak)  # linear warm-up over 20 epochs
    assert s["lr"][20 * epoch] == pytest.approx(peak)  # the cosine starts at its peak
    assert s["lr"][total] == pytest.approx(1e-6) and s["lr"][total - 1] == pytest.approx(1e-6, abs=1e-9)
    assert s["wd"][0] == pytest.approx(0.04) and s["wd"][total] == pytest.approx(0.2)
    assert s["momentum"][0] == pytest.approx(0.994) and s["momentum"][total] == 1.0
    # half-way along each cosine: the mean of its ends (cos(pi / 2) = 0)
    assert s["wd"][total // 2] == pytest.approx((0.04 + 0.2) / 2)
    assert s["momentum"][total // 2] == pytest.approx((0.994 + 1.0) / 2)
    assert s["lr"][20 * epoch + (total - 20 * epoch) // 2] == pytest.approx((peak + 1e-6) / 2)
    assert s["wd"][total // 4] == pytest.approx(0.2 + (0.04 - 0.2) * (1 + math.cos(math.pi / 4)) / 2)
    assert s["teacher_temp"][0] == pytest.approx(0.04)
    assert s["teacher_temp"][15 * epoch] == pytest.approx(0.04 + 0.03 * (15 * epoch) / (30 * epoch - 1))
    assert s["teacher_temp"][30 * epoch - 1] == pytest.approx(0.07)
    assert s["teacher_temp"][total - 1] == pytest.approx(0.07)
    # The prototypes are frozen for freeze_last_layer_epochs (1), then follow the lr schedule.
    assert all(s["last_layer_lr"][i] == 0.0 for i in (0, 250, epoch - 1))
    assert s["last_layer_lr"][epoch] == s["lr"][epoch] > 0


def test_build_schedulers_needs_the_scaled_lr() -> None:
    with pytest.raises(ValueError, match="apply_scaling_rules_to_cfg"):
        build_schedulers(load_config(TRAIN_CONFIG_DIR / "demo.yaml"))


def test_param_groups_follow_dinov2_rules() -> None:
    student = _tiny_student()
    decayed = get_params_groups(student["backbone"], layerwise_decay=0.5, patch_embed_lr_mult=0.2)
    groups = {g["name"]: g for g in decayed}
    # Layer ids: tokens/patch embedding 0, block i -> i + 1, final norm depth + 1 = 3; multiplier 0.5 ** (3 - id).
    assert groups["patch_embed.proj.weight"]["lr_multiplier"] == pytest.approx(0.5**3 * 0.2)
    assert groups["cls_token"]["lr_multiplier"] == pytest.approx(0.5**3)
    assert groups["pos_embed"]["lr_multiplier"] == pytest.approx(0.5**3)
    assert groups["blocks.0.attn.qkv.weight"]["lr_multiplier"] == pytest.approx(0.5**2)
    assert groups["blocks.1.mlp.fc1.weight"]["lr_multiplier"] == pytest.approx(0.5)
    assert groups["norm.weight"]["lr_multiplier"] == 1.0
    no_decay = {name for name, g in groups.items() if g["wd_multiplier"] == 0.0}
    assert {"blocks.0.norm1.weight", "blocks.0.ls1.gamma", "blocks.1.attn.qkv.bias", "norm.bias",
            "patch_embed.proj.bias"} <= no_decay
    # DINOv2 decays the tokens and the position embedding.
    assert groups["cls_token"]["wd_multiplier"] == groups["pos_embed"]["wd_multiplier"] == 1.0
    assert groups["mask_token"]["wd_multiplier"] == 1.0
    assert not any(g["is_last_layer"] for g in groups.values())

    head = {g["name"]: g for g in get_params_groups(student["dino_head"], layerwise_decay=0.5, patch_embed_lr_mult=0.2)}
    assert all(g["lr_multiplier"] == 1.0 for g in head.values())
    assert {n for n, g in head.items() if g["is_last_layer"]} == {"last_layer.weight_g", "last_layer.weight_v"}
    assert head["last_layer.weight_g"]["wd_multiplier"] == 1.0  # as DINOv2 (no "norm"/"gamma"/".bias" in the name)
    assert head["mlp.0.bias"]["wd_multiplier"] == 0.0


def test_register_tokens_are_at_layer_zero_as_in_dinov2() -> None:
    """DINOv2 puts its registers with the class token and the embeddings at layer 0 (its "Update lr decay rates for
    reg tokens", October 2023): decay ** (depth + 1) under layer-wise decay, not the multiplier 1 of the final norm."""
    backbone = DinoVisionTransformer(
        img_size=28, patch_size=14, embed_dim=32, depth=2, num_heads=2, num_register_tokens=4
    )
    groups = {g["name"]: g for g in get_params_groups(backbone, layerwise_decay=0.5)}
    assert groups["register_tokens"]["lr_multiplier"] == groups["cls_token"]["lr_multiplier"] == pytest.approx(0.5**3)
    assert groups["register_tokens"]["wd_multiplier"] == 1.0 and groups["norm.weight"]["lr_multiplier"] == 1.0


def test_chunked_blocks_use_the_global_block_index() -> None:
    backbone = _tiny_student(block_chunks=2, depth=4)["backbone"]
    groups = {g["name"]: g for g in get_params_groups(backbone, layerwise_decay=0.5)}
    assert "blocks.1.3.attn.qkv.weight" in groups
    assert groups["blocks.1.3.attn.qkv.weight"]["lr_multiplier"] == pytest.approx(0.5)  # block 3 of 4 -> id 4
    assert groups["blocks.0.0.attn.qkv.weight"]["lr_multiplier"] == pytest.approx(0.5**4)


def test_frozen_parameters_are_left_out() -> None:
    backbone = _tiny_student()["backbone"]
    backbone.pos_embed.requires_grad_(False)
    assert "pos_embed" not in {g["name"] for g in get_params_groups(backbone)}


def test_fused_groups_cover_every_parameter_once() -> None:
    student = _tiny_student()
    cfg = load_config(None, ["optim.layerwise_decay=0.5"])
    fused = build_param_groups(student, cfg)
    params = [p for g in fused for p in g["params"]]
    assert len(params) == len(set(map(id, params))) == len(list(student.parameters()))
    # Fused per part, as DINOv2: within a part no two groups share (lr_multiplier, wd_multiplier, is_last_layer).
    for part in student.values():
        part_groups = fuse_params_groups(get_params_groups(part, layerwise_decay=0.5, patch_embed_lr_mult=0.2))
        keys = [(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in part_groups]
        assert len(keys) == len(set(keys))
    # backbone: 4 lr levels (tokens, patch embed, 2 blocks, final norm -> 5) x decay/no decay, minus empty combinations
    backbone_keys = {(g["lr_multiplier"], g["wd_multiplier"]) for g in fused[:-3]}
    assert (0.5**3 * 0.2, 0.0) in backbone_keys and (1.0, 0.0) in backbone_keys


def test_optimizer_groups_get_scheduled_values() -> None:
    student = _tiny_student()
    cfg = load_config(None, ["optim.layerwise_decay=0.5", "optim.adamw_beta2=0.99"])
    optimizer = build_optimizer(build_param_groups(student, cfg), cfg)
    # Unsharded CPU parameters get the fused kernel (several times faster than foreach on CPU).
    assert optimizer.defaults["betas"] == (0.9, 0.99) and optimizer.defaults["fused"] is True
    apply_optim_scheduler(optimizer, lr=1e-3, wd=0.05, last_layer_lr=0.0)
    for group in optimizer.param_groups:
        expected_lr = 0.0 if group["is_last_layer"] else 1e-3 * group["lr_multiplier"]
        assert group["lr"] == pytest.approx(expected_lr)
        assert group["weight_decay"] == pytest.approx(0.05 * group["wd_multiplier"])
    assert len(optimizer.state) == len(list(student.parameters()))  # every parameter has state from the start


def test_initialised_state_steps_like_lazy_adamw() -> None:
    """Pre-created state (so checkpoints hold every parameter) must not change AdamW's updates."""
    cfg = load_config(None)
    ours, reference = _tiny_student(), _tiny_student()
    optimizer = build_optimizer(build_param_groups(ours, cfg), cfg)
    apply_optim_scheduler(optimizer, lr=1e-2, wd=0.04, last_layer_lr=1e-2)
    lazy = torch.optim.AdamW(
        [{"params": g["params"], "lr": 1e-2 * g["lr_multiplier"], "weight_decay": 0.04 * g["wd_multiplier"]}
         for g in build_param_groups(reference, cfg)],
        fused=optimizer.defaults["fused"],
    )
    for _ in range(3):
        x = torch.randn(2, 3, 28, 28)
        for model, opt in ((ours, optimizer), (reference, lazy)):
            opt.zero_grad()
            out = model["backbone"](x)
            model["dino_head"](out).square().mean().backward()
            model["dino_head"].last_layer.weight_v.grad = None  # a parameter without gradient keeps step 0
            opt.step()
    for (name, a), b in zip(ours.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    assert optimizer.state[ours["dino_head"].last_layer.weight_v]["step"] == 0
