"""The training objective as assembled by ``SSLMetaArch.forward_loss``, against the same objective written out.

The loss modules are pinned to DINOv2's numbers elsewhere (tests/test_losses_conformance.py); here the question is
their assembly into DinoBloom's step: which teacher view is whose target, the scales of the terms, KoLeo per
global view, the iBOT term over all crops, and what is logged. The reference below uses no loss module except
Sinkhorn-Knopp for the teacher targets (itself pinned to DINOv2's output).
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from dinov2.configs import TRAIN_CONFIG_DIR, load_config
from dinov2.data.collate import collate_data_and_cast
from dinov2.data.masking import MaskingGenerator
from dinov2.loss import sinkhorn_knopp
from dinov2.train.ssl_meta_arch import SSLMetaArch

B, SIZE, STUDENT_TEMP, TEACHER_TEMP = 6, 28, 0.1, 0.05
TINY = ["student.embed_dim=32", "student.depth=2", "student.num_heads=2", "student.drop_path_rate=0",
        "student.layerscale=1.0",  # (1e-5 would leave every CLS token alike, and which view is whose target moot)
        f"crops.global_crops_size={SIZE}", "dino.head_n_prototypes=64", "dino.head_hidden_dim=32",
        "dino.head_bottleneck_dim=16", "ibot.head_n_prototypes=48", "ibot.head_hidden_dim=32",
        "ibot.head_bottleneck_dim=16", "ibot.mask_sample_probability=0.5"]  # fmt: skip


def _batch(seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    samples = [({"global_crops": [torch.randn(3, SIZE, SIZE, generator=generator) for _ in range(2)],
                 "local_crops": []}, 0) for _ in range(B)]  # fmt: skip
    return collate_data_and_cast(samples, (0.1, 0.5), 0.5, torch.float32,
                                 mask_generator=MaskingGenerator.for_global_crops(SIZE, 14), rng=random.Random(seed))


def _koleo(x: torch.Tensor) -> torch.Tensor:
    """-mean log distance to the nearest neighbour of the L2-normalised rows (DinoBloom's pairwise eps 1e-4)."""
    x = F.normalize(x, dim=-1, eps=1e-8)
    distances = torch.cdist(x, x).fill_diagonal_(float("inf"))
    nearest = distances.argmin(dim=1)
    return -torch.log(torch.linalg.vector_norm(x - x[nearest] + 1e-4, dim=-1) + 1e-8).mean()


@torch.no_grad()
def _reference_terms(model: SSLMetaArch, batch: dict, koleo_weight: float) -> dict[str, torch.Tensor]:
    """DinoBloom's step objective (two global views, its local_crops_number 1 = no local crops), written out."""
    crops, masks = batch["collated_global_crops"], batch["collated_masks"]
    teacher = model.teacher.backbone(crops, is_training=True)
    t_cls_a, t_cls_b = teacher["x_norm_clstoken"].chunk(2)
    # The teacher's view B is the target of the student's view A and vice versa.
    t_probs = sinkhorn_knopp(model.teacher.dino_head(torch.cat((t_cls_b, t_cls_a))), TEACHER_TEMP, 2 * B)
    student = model.student.backbone(crops, masks=masks, is_training=True)
    s_logp = F.log_softmax(model.student.dino_head(student["x_norm_clstoken"]) / STUDENT_TEMP, dim=-1)
    # DINOv2: loss * 2 / (global terms (2 - 1) * 2 + local terms max(1 * 2, 1)): DinoBloom's 2 / 4.
    dino = -(t_probs * s_logp).sum(-1).mean() * 2 / (2 + 2)

    student_cls = student["x_norm_clstoken"]
    koleo = koleo_weight * (_koleo(student_cls[:B]) + _koleo(student_cls[B:]))  # per view, not across the two

    flat = masks.flatten()
    t_masked = model.teacher.ibot_head(teacher["x_norm_patchtokens"].flatten(0, 1)[flat])
    t_patch = sinkhorn_knopp(t_masked, TEACHER_TEMP, int(flat.sum()))
    s_patch = F.log_softmax(model.student.ibot_head(student["x_norm_patchtokens"].flatten(0, 1)[flat]) / STUDENT_TEMP, -1)
    per_token = -(t_patch * s_patch).sum(-1)
    crop_of_token = torch.arange(2 * B).repeat_interleave(masks.sum(dim=1))
    per_crop = torch.zeros(2 * B).index_add_(0, crop_of_token, per_token) / masks.sum(dim=1).clamp(min=1)
    ibot = per_crop.mean()  # every crop counts, a crop without masked tokens with 0; x 2 (views) x 1/2 (scale)
    return {"dino_global_crops_loss": dino, "koleo_loss": koleo / 2, "ibot_loss": ibot / 2,
            "total_loss": dino + koleo + ibot}  # fmt: skip


def _trained_like_model(cfg: DictConfig, seed: int) -> SSLMetaArch:
    """The model of ``cfg`` in training mode, with a teacher that is not the student (as after some EMA steps)."""
    torch.manual_seed(seed)
    model = SSLMetaArch(cfg)
    model.init_weights()
    with torch.no_grad():
        for p in model.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.train()


@pytest.mark.parametrize("seed", [0, 1])
def test_forward_loss_is_dinobloom_objective(seed: int) -> None:
    cfg = load_config(TRAIN_CONFIG_DIR / "demo.yaml", TINY)
    model = _trained_like_model(cfg, seed)
    batch = _batch(seed)
    assert 0 < int(batch["collated_masks"].sum()) and (batch["collated_masks"].sum(dim=1) == 0).any()
    total, terms = model.forward_loss(batch, teacher_temp=TEACHER_TEMP)
    expected = _reference_terms(model, batch, cfg.dino.koleo_loss_weight)
    assert set(terms) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(terms[name], value, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(total.detach(), expected["total_loss"], rtol=1e-5, atol=1e-6)
    assert total.requires_grad


def test_koleo_pairwise_eps_comes_from_the_config() -> None:
    """DinoBloom's 1e-4 by default; DINOv2's 1e-8 is one override away."""
    assert SSLMetaArch(load_config(TRAIN_CONFIG_DIR / "demo.yaml", TINY)).koleo_loss.pairwise_eps == 1e-4
    upstream = load_config(TRAIN_CONFIG_DIR / "demo.yaml", [*TINY, "dino.koleo_pairwise_eps=1e-8"])
    assert SSLMetaArch(upstream).koleo_loss.pairwise_eps == 1e-8


@pytest.mark.parametrize("momentum", [0.0, 0.9, 0.996, 1.0])
@torch.no_grad()
def test_update_teacher_is_ema_of_the_student(momentum: float) -> None:
    """The teacher becomes m * teacher + (1 - m) * student in every parameter (DINOv2's EMA), the student untouched:
    a swapped weight would make the teacher jump to the student at m = 0.996 instead of trailing it."""
    model = SSLMetaArch(load_config(TRAIN_CONFIG_DIR / "demo.yaml", TINY))
    generator = torch.Generator().manual_seed(0)
    for p in [*model.student.parameters(), *model.teacher.parameters()]:
        p.copy_(torch.randn(p.shape, generator=generator))
    teacher_before = [p.clone() for p in model.teacher.parameters()]
    student_before = [p.clone() for p in model.student.parameters()]
    model.update_teacher(momentum)
    teacher_after = list(model.teacher.parameters())
    assert len(teacher_after) == len(student_before) > 0
    for t, t0, s in zip(teacher_after, teacher_before, student_before, strict=True):
        expected = (momentum * t0.double() + (1 - momentum) * s.double()).float()
        torch.testing.assert_close(t, expected, rtol=1e-6, atol=1e-7)
    for s, s0 in zip(model.student.parameters(), student_before, strict=True):
        assert torch.equal(s, s0)


def test_each_training_step_clips_and_averages_the_live_parameters() -> None:
    """A trainer-built model (made on the meta device, materialised, initialised: the way its parameters come to
    be) steps twice: after each step the teacher is exactly the EMA of its weights before and the updated student,
    and every part's gradients were clipped to the limit. The step lists the parameters once, so a list made before
    the weights were materialised would leave the teacher and the clipping on stale tensors."""
    from contextlib import nullcontext

    from dinov2.train.optim import apply_optim_scheduler
    from dinov2.train.train import build_training_state, training_step

    cfg = load_config(TRAIN_CONFIG_DIR / "demo.yaml", [*TINY, "train.dataset_path=unused"])
    torch.manual_seed(0)
    model, optimizer, scaler = build_training_state(cfg, torch.device("cpu"))
    apply_optim_scheduler(optimizer, lr=1e-3, wd=0.04, last_layer_lr=1e-3)  # (the optimizer starts at lr 0)
    for step in range(2):
        teacher_before = [p.clone() for p in model.teacher.parameters()]
        training_step(model, optimizer, scaler, nullcontext(), _batch(step), teacher_temp=TEACHER_TEMP,
                      momentum=0.9, clip_grad=1e-3)  # fmt: skip
        for t, t0, s in zip(model.teacher.parameters(), teacher_before, model.student.parameters(), strict=True):
            torch.testing.assert_close(t, torch.lerp(t0, s, 0.1), rtol=0, atol=1e-7)
        assert not all(torch.equal(t, t0) for t, t0 in zip(model.teacher.parameters(), teacher_before))
        for name, part in model.student.items():
            grads = [p.grad.norm() for p in part.parameters() if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack(grads))
            # each part clipped on its own to the limit (its raw norm is far above it; clipped jointly, each part
            # would come out below the limit)
            assert float(norm) == pytest.approx(1e-3, rel=1e-4), (step, name)


LOCAL_SIZE = 14


def _multicrop_batch(seed: int, n_local: int) -> dict:
    """``_batch``'s two global views per image plus ``n_local`` local views of ``LOCAL_SIZE`` px."""
    generator = torch.Generator().manual_seed(seed)
    samples = [({"global_crops": [torch.randn(3, SIZE, SIZE, generator=generator) for _ in range(2)],
                 "local_crops": [torch.randn(3, LOCAL_SIZE, LOCAL_SIZE, generator=generator) for _ in range(n_local)]},
                0) for _ in range(B)]  # fmt: skip
    return collate_data_and_cast(samples, (0.1, 0.5), 0.5, torch.float32,
                                 mask_generator=MaskingGenerator.for_global_crops(SIZE, 14), rng=random.Random(seed))


@torch.no_grad()
def _reference_local_dino(model: SSLMetaArch, batch: dict, n_local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DINOv2's (global, local) DINO terms with ``n_local`` > 1 local crops, each written out per crop pair."""
    teacher = model.teacher.backbone(batch["collated_global_crops"], is_training=True)
    t_cls_a, t_cls_b = teacher["x_norm_clstoken"].chunk(2)
    t_probs = sinkhorn_knopp(model.teacher.dino_head(torch.cat((t_cls_b, t_cls_a))), TEACHER_TEMP, 2 * B)
    target_of_a, target_of_b = t_probs.chunk(2)  # the teacher's view B is the target of the student's view A

    def cross_entropy(target: torch.Tensor, crops: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        """Row-mean of -sum_k target log softmax(student head / T) over one student view."""
        cls = model.student.backbone(crops, is_training=True, **kwargs)["x_norm_clstoken"]
        return -(target * F.log_softmax(model.student.dino_head(cls) / STUDENT_TEMP, dim=-1)).sum(-1).mean()

    n_terms = 2 * 1 + 2 * n_local  # crop pairs: each global view against the other, each local view against both
    views = batch["collated_global_crops"].chunk(2)
    view_masks = batch["collated_masks"].chunk(2)
    global_pairs = cross_entropy(target_of_a, views[0], masks=view_masks[0]) + cross_entropy(
        target_of_b, views[1], masks=view_masks[1])  # fmt: skip
    local_pairs = sum(cross_entropy(target, local) for local in batch["collated_local_crops"].chunk(n_local)
                      for target in (target_of_a, target_of_b))  # fmt: skip
    return global_pairs / n_terms, local_pairs / n_terms


@pytest.mark.parametrize(("n_local", "seed"), [(2, 0), (3, 1)])
def test_forward_loss_local_crops_is_dinov2_multicrop_objective(n_local: int, seed: int) -> None:
    """With crops.local_crops_number > 1, DINOv2's multi-crop DINO objective: every local view's student CLS against
    both global views' teacher targets, summed over the 2 * n_local (local, teacher) pairs, and the two global pairs;
    both sums are divided by the pair count 2 + 2 * n_local (DINOv2's n_global_terms + n_local_terms, i.e. a global
    scale of 2 / (2 + 2n) on the batched two-view loss and a local one of 1 / (2 + 2n)). KoLeo and iBOT stay as in
    ``_reference_terms``, on the global views only."""
    cfg = load_config(TRAIN_CONFIG_DIR / "demo.yaml",
                      [*TINY, f"crops.local_crops_number={n_local}", f"crops.local_crops_size={LOCAL_SIZE}"])
    model = _trained_like_model(cfg, seed)
    batch = _multicrop_batch(seed, n_local)
    assert batch["collated_local_crops"].shape == (n_local * B, 3, LOCAL_SIZE, LOCAL_SIZE)
    total, terms = model.forward_loss(batch, teacher_temp=TEACHER_TEMP)
    dino_global, dino_local = _reference_local_dino(model, batch, n_local)
    others = _reference_terms(model, batch, cfg.dino.koleo_loss_weight)
    expected = {"dino_global_crops_loss": dino_global, "dino_local_crops_loss": dino_local,
                "koleo_loss": others["koleo_loss"], "ibot_loss": others["ibot_loss"],
                "total_loss": dino_global + dino_local + 2 * (others["koleo_loss"] + others["ibot_loss"])}  # fmt: skip
    assert set(terms) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(terms[name], value, rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(total.detach(), expected["total_loss"], rtol=1e-5, atol=1e-5)
    assert total.requires_grad
