"""Time of the iBOT loss path over masked tokens, the largest non-matmul cost of a small ViT's training step.

    python scripts/benchmark_loss.py                                   # CPU, float32 scores
    python scripts/benchmark_loss.py --device cuda --tokens 9749        # ViT-S/14, batch 128, DinoBloom recipe

With the iBOT head's 65,536 prototypes every masked token carries a row of 65,536 scores, and the step passes
over the (masked tokens x prototypes) matrices many times: the teacher's Sinkhorn-Knopp targets, the student's
log-softmax cross-entropy and its backward. This script times exactly that path (``iBOTPatchLoss``'s
``sinkhorn_knopp_teacher`` and ``forward_masked`` plus the backward to the student's scores) on random scores,
each part alone and the whole, median of ``--iters`` after a warm-up. The scores come in the dtype a training run
gives them (bf16 on a GPU under autocast, float32 on a CPU). The last line reads
``ms_per_step=<x> sinkhorn_ms=<y> cross_entropy_ms=<z>``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import dinov2  # noqa: E402, F401  before torch: it sets OpenMP's wait policy, as for the commands it times

import argparse
import logging
import statistics
from collections.abc import Callable

import torch
from benchmark_features import time_call

from dinov2.cli import non_negative_int, positive_int
from dinov2.eval.protocol import resolve_device
from dinov2.logs import setup_logging
from dinov2.loss import iBOTPatchLoss

logger = logging.getLogger(__name__)

TOKENS_PER_CROP = 256  # 16 x 16 patches of a 224 px crop at patch size 14


def _median_seconds(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median wall time of ``fn`` after ``warmup`` untimed calls."""
    times = [time_call(fn, device) for _ in range(warmup + iters)]
    return statistics.median(times[warmup:])


def random_masks(tokens: int, crops: int, seed: int) -> torch.Tensor:
    """(crops, 256) boolean masks with ``tokens`` masked positions in all, spread at random."""
    if not 0 < tokens <= crops * TOKENS_PER_CROP:
        raise ValueError(f"--tokens must be in 1..{crops * TOKENS_PER_CROP} for {crops} crops, got {tokens}")
    order = torch.randperm(crops * TOKENS_PER_CROP, generator=torch.Generator().manual_seed(seed))
    masks = torch.zeros(crops * TOKENS_PER_CROP, dtype=torch.bool)
    masks[order[:tokens]] = True
    return masks.view(crops, TOKENS_PER_CROP)


def benchmark(
    tokens: int,
    prototypes: int,
    crops: int,
    dtype: torch.dtype,
    device: torch.device,
    warmup: int,
    iters: int,
    compile: bool = False,
) -> dict[str, float]:
    """Median seconds of Sinkhorn-Knopp, of the cross-entropy forward and backward, and of both.

    ``compile``: the cross-entropy and Sinkhorn-Knopp as ``train.compile`` compiles them (Sinkhorn-Knopp on
    CUDA only, where it pays).
    """
    masks = random_masks(tokens, crops, seed=0).to(device)
    counts = masks.sum(dim=-1, keepdim=True).clamp(min=1)
    masks_weight = (1.0 / counts).expand_as(masks)[masks]
    generator = torch.Generator(device=device).manual_seed(0)
    # weight-normalised heads give scores in [-1, 1] (times the prototype norms, 1 at initialisation)
    teacher_scores = (2 * torch.rand(tokens, prototypes, generator=generator, device=device) - 1).to(dtype)
    student_scores = (2 * torch.rand(tokens, prototypes, generator=generator, device=device) - 1).to(dtype)
    student_scores.requires_grad_()
    loss = iBOTPatchLoss(prototypes).to(device)

    def targets() -> torch.Tensor:
        return loss.sinkhorn_knopp_teacher(teacher_scores, teacher_temp=0.07)

    if compile:  # dynamic shapes, as in training, where the number of masked tokens changes every step
        loss.cross_entropy.compile(dynamic=True)
        loss.compile_sinkhorn_knopp = True
    fixed_targets = targets()

    def cross_entropy(target: torch.Tensor) -> None:
        student_scores.grad = None
        loss.forward_masked(student_scores, target, student_masks_flat=masks, masks_weight=masks_weight).backward()

    return {
        "sinkhorn": _median_seconds(targets, device, warmup, iters),
        "cross_entropy": _median_seconds(lambda: cross_entropy(fixed_targets), device, warmup, iters),
        "step": _median_seconds(lambda: cross_entropy(targets()), device, warmup, iters),
    }


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``fp32``, ``bf16`` or ``fp16`` as a dtype; ``auto``: bf16 on a GPU (as under autocast), fp32 on a CPU."""
    names = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    return names[name] if name != "auto" else (torch.float32 if device.type == "cpu" else torch.bfloat16)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=positive_int, default=2048, help="masked tokens in the step (all crops together)")
    p.add_argument("--crops", type=positive_int, default=256, help="global crops the tokens are spread over")
    p.add_argument("--prototypes", type=positive_int, default=65536, help="iBOT head prototypes")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="the scores' dtype; auto: bf16 on a GPU (as under autocast), fp32 on a CPU")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... or auto (CUDA if available)")
    p.add_argument("--warmup", type=non_negative_int, default=2)
    p.add_argument("--iters", type=positive_int, default=7)
    p.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile as train.compile does (Sinkhorn-Knopp on CUDA only)")
    return p


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Parse the options, run the benchmark and print its figures."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.compile and args.warmup < 1:
        parser.error("--compile needs --warmup 1 or more, or the compilation is timed as a call")
    setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    logger.info("%d masked tokens x %d prototypes, %s scores on %s, torch %s, %d threads%s",
                args.tokens, args.prototypes, dtype, device, torch.__version__, torch.get_num_threads(),
                ", compiled" if args.compile else "")
    results = benchmark(args.tokens, args.prototypes, args.crops, dtype, device, args.warmup, args.iters, args.compile)
    print(f"ms_per_step={results['step'] * 1e3:.2f} sinkhorn_ms={results['sinkhorn'] * 1e3:.2f} "
          f"cross_entropy_ms={results['cross_entropy'] * 1e3:.2f}")
    return results


if __name__ == "__main__":
    from dinov2.cli import run_cli

    run_cli(main)
