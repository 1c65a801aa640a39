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

from dinov2.configs import TRAIN_CONFIG_DIR, load_config
from dinov2.data.collate import collate_data_and_cast
from dinov2.data.masking import MaskingGenerator
from dinov2.loss.dino_clstoken_loss import sinkhorn_knopp
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


@pytest.mark.parametrize("seed", [0, 1])
def test_forward_loss_is_dinobloom_objective(seed: int) -> None:
    cfg = load_config(TRAIN_CONFIG_DIR / "demo.yaml", TINY)
    torch.manual_seed(seed)
    model = SSLMetaArch(cfg)
    model.init_weights()
    with torch.no_grad():  # a teacher that is not the student, as after some EMA steps
        for p in model.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.train()
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
