"""``train.compile``'s compiled cross-entropies give the eager losses and gradients."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from types import ModuleType

import pytest
import torch

from dinov2.configs import TRAIN_CONFIG_DIR, load_config
from dinov2.loss import DINOLoss, iBOTPatchLoss
from dinov2.train.ssl_meta_arch import SSLMetaArch

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None,
    reason="torch.compile on CPU needs a C++ compiler (g++ or c++), and none is on PATH",
)


def _scores_and_targets(rows: int, prototypes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    scores = (3 * torch.randn(rows, prototypes, generator=generator)).requires_grad_()
    targets = torch.softmax(5 * torch.randn(rows, prototypes, generator=generator), dim=-1)
    return scores, targets


def test_compiled_losses_match_eager() -> None:
    prototypes = 512
    eager_ibot, compiled_ibot = iBOTPatchLoss(prototypes), iBOTPatchLoss(prototypes)
    eager_dino, compiled_dino = DINOLoss(prototypes), DINOLoss(prototypes)
    for loss in (compiled_ibot, compiled_dino):
        loss.cross_entropy.compile(dynamic=True)
    # A different number of masked tokens every step: the compiled function must follow.
    for step, (crops, tokens) in enumerate([(4, 9), (6, 16)]):
        masks = torch.zeros(crops, tokens, dtype=torch.bool)
        masks[::2, : tokens // 2 + step] = True
        scores, targets = _scores_and_targets(int(masks.sum()), prototypes, seed=step)
        results = []
        for loss in (eager_ibot, compiled_ibot):
            scores.grad = None
            value = loss.forward_masked(scores, targets, student_masks_flat=masks)
            value.backward()
            results.append((value.detach(), scores.grad.clone()))
        torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-8)

        cls_scores, cls_targets = _scores_and_targets(2 * crops, prototypes, seed=10 + step)
        expected = eager_dino([cls_scores], [cls_targets])
        torch.testing.assert_close(compiled_dino([cls_scores], [cls_targets]), expected, rtol=1e-5, atol=1e-6)


def test_train_compile_compiles_both_cross_entropies() -> None:
    cfg = load_config(TRAIN_CONFIG_DIR / "demo.yaml", ["train.dataset_path=unused", "train.compile=true"])
    with torch.device("meta"):
        model = SSLMetaArch(cfg)
    model.compile_losses()
    assert model.dino_loss.cross_entropy._compiled_call_impl is not None
    assert model.ibot_patch_loss.cross_entropy._compiled_call_impl is not None
    assert "cross_entropy" not in "".join(model.state_dict())  # the checkpoint keys stay the same


def test_benchmark_flop_count_leaves_compiled_code_compiled(load_script: Callable[[str], ModuleType]) -> None:
    """``benchmark_train.count_step_flops`` counts a compiled step eagerly and leaves it compiled afterwards
    (PyTorch 2.11 ran compiled code under the FLOP counter and never again: its --compile figures were eager)."""
    from torch.profiler import ProfilerActivity, profile

    from dinov2.layers import Block

    benchmark = load_script("benchmark_train")

    torch.manual_seed(0)
    block = Block(32, 4, init_values=1e-5)
    x = torch.randn(2, 5, 32)

    def step() -> None:
        block(x).sum().backward()

    eager_flops, _ = benchmark.count_step_flops(step)
    block.compile()
    step()
    flops, _ = benchmark.count_step_flops(step)
    assert flops == eager_flops > 0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    assert any("Torch-Compiled Region" in event.name for event in prof.events())
