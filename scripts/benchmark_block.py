"""Time of one transformer block at a ViT's training shape, eager and under each ``torch.compile`` setting.

    python scripts/benchmark_block.py --device cuda                    # ViT-S/14, 256 crops x 257 tokens, bf16
    python scripts/benchmark_block.py --device cuda --modes compiled max-autotune

A training step runs every block forward and backward for the student and forward without gradients for the
teacher. This script times both for one block (LayerScale; a GELU MLP, SwiGLU for ViT-g; as the backbone builds
it) under:

* ``eager``: no compilation;
* ``compiled``: ``Module.compile()``, what ``train.compile`` does;
* ``coordinate-descent``: the same with Inductor's ``coordinate_descent_tuning`` (``train.compile_tuning``): it
  tunes the block sizes of the fused element-wise and reduction kernels by measuring them, which takes longer;
* ``max-autotune``: ``mode="max-autotune-no-cudagraphs"`` (Triton matrix-multiply templates measured against
  cuBLAS, with element-wise work such as GELU fused into their epilogues where a template wins; on an H200 none
  won for the ViT-S MLP's first layer, 0.193 ms against cuBLAS's 0.137, and compiling took minutes).

Median of ``--iters`` after a warm-up; the first call's time (mostly the compilation) is printed too. The last line
reads ``<mode>=<ms per forward and backward> ...`` so that runs can be compared by a script.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a file from a checkout: make `dinov2` and the other benchmarks importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import dinov2  # noqa: E402, F401  before torch: it sets OpenMP's wait policy, as for the commands it times

import torch  # noqa: E402
from benchmark_attention import add_shape_arguments  # noqa: E402
from benchmark_features import time_call  # noqa: E402
from benchmark_loss import resolve_dtype  # noqa: E402
from torch import nn  # noqa: E402

from dinov2.eval.protocol import resolve_device  # noqa: E402
from dinov2.logs import setup_logging  # noqa: E402
from dinov2.models import ARCH_SIZES, DinoVisionTransformer  # noqa: E402
from dinov2.parallel import COMPILE_TUNING_OPTIONS  # noqa: E402

logger = logging.getLogger(__name__)

MODES = ("eager", "compiled", "coordinate-descent", "max-autotune")


def prepare(block: nn.Module, mode: str) -> nn.Module:
    """A copy of ``block`` set up for ``mode`` (see the module's help)."""
    block = copy.deepcopy(block)
    if mode == "compiled":
        block.compile()
    elif mode == "coordinate-descent":
        block.compile(options=COMPILE_TUNING_OPTIONS)
    elif mode == "max-autotune":
        block.compile(mode="max-autotune-no-cudagraphs")
    elif mode != "eager":
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    return block


def time_block(
    block: nn.Module, tokens: torch.Tensor, dtype: torch.dtype, warmup: int, iters: int
) -> dict[str, float]:
    """Seconds of the first two calls (with and without gradients: mostly compilation), and the medians of a
    forward and backward (the student's) and of a forward without gradients (the teacher's), under autocast to
    ``dtype`` (none for float32). Gradients are cleared before each backward, as a training step's are."""
    device = tokens.device
    grad = torch.randn_like(tokens)

    def train() -> None:
        block.zero_grad(set_to_none=True)
        tokens.grad = None
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = block(tokens)
        torch.autograd.backward(out, grad)

    @torch.no_grad()
    def teacher() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            block(tokens)

    first = time_call(train, device) + time_call(teacher, device)
    for _ in range(warmup):
        train()
        teacher()

    def median(fn: Callable[[], None]) -> float:
        return statistics.median(time_call(fn, device) for _ in range(iters))

    return {"first_s": first, "train_s": median(train), "teacher_s": median(teacher)}


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="vit_small", choices=sorted(ARCH_SIZES))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="settings to time, in this order")
    add_shape_arguments(p)
    return p


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Print a row per mode; return (and print) each mode's milliseconds per forward and backward."""
    args = build_parser().parse_args(argv)
    setup_logging()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(0)
    with device:
        width, _, heads = ARCH_SIZES[args.arch]
        ffn = "swiglufused" if args.arch == "vit_giant2" else "mlp"  # as the recipes build them
        backbone = DinoVisionTransformer(embed_dim=width, depth=1, num_heads=heads, init_values=1e-5, ffn_layer=ffn)
        block = backbone.blocks[0]
        crops = args.crops or (256 if args.arch == "vit_small" else 128)
        tokens = torch.randn(crops, args.tokens, width, requires_grad=True)
    logger.info("%s block, %d crops x %d tokens x %d, %s on %s, torch %s", args.arch, crops, args.tokens, width,
                dtype, device, torch.__version__)  # fmt: skip
    print(f"{'mode':<20}{'first call s':>14}{'fwd+bwd ms':>12}{'no-grad fwd ms':>16}", flush=True)
    results: dict[str, float] = {}
    for mode in args.modes:
        torch._dynamo.reset()  # each mode compiles afresh
        times = time_block(prepare(block, mode), tokens, dtype, args.warmup, args.iters)
        results[mode] = times["train_s"] * 1e3
        teacher_ms = times["teacher_s"] * 1e3
        print(f"{mode:<20}{times['first_s']:>14.1f}{results[mode]:>12.3f}{teacher_ms:>16.3f}", flush=True)
    print(" ".join(f"{mode}={ms:.3f}" for mode, ms in results.items()))
    return results


if __name__ == "__main__":
    from dinov2.cli import run_cli

    run_cli(main)
