"""Forward and backward time of each `scaled_dot_product_attention` backend at a ViT's training shapes.

    python scripts/benchmark_attention.py --device cuda                 # ViT-S/14 and ViT-L/14, bf16
    python scripts/benchmark_attention.py --arch vit_small --crops 256   # 2 global crops x 128 images

A 224 px crop gives 257 tokens (256 patches and the class token), an awkward length for the fused kernels'
tiles of 64 or 128 tokens. This script times the attention of one block, forward and backward, with queries, keys
and values laid out as the model's attention passes them (strided (crops, heads, 257, 64) views of one qkv
projection): first as PyTorch picks the backend (the ``default`` row, what training runs through SDPA; xFormers, if
installed, replaces SDPA in eager CUDA runs), then under each backend it offers on the device. Is the default the
fastest? Median of ``--iters`` after a warm-up. TFLOP/s count the forward's two matrix products (``4 N^2 d`` per
head) and the backward's four (``8 N^2 d``), not the scores that flash kernels recompute. The last line names each
architecture's fastest backend, ``vit_small=<backend> vit_large=<backend>``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file from a checkout: make `dinov2` and the other benchmarks importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import dinov2  # noqa: E402, F401  before torch: it sets OpenMP's wait policy, as for the commands it times

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from benchmark_features import time_call  # noqa: E402
from benchmark_loss import resolve_dtype  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from dinov2.cli import non_negative_int, positive_int  # noqa: E402
from dinov2.eval.protocol import resolve_device  # noqa: E402
from dinov2.logs import setup_logging  # noqa: E402
from dinov2.models import ARCH_SIZES  # noqa: E402

logger = logging.getLogger(__name__)

#: PyTorch's own choice, then each backend in PyTorch's names; those a device or dtype does not support are
#: reported as such.
BACKENDS = ("default", "CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


def attention_flops(crops: int, heads: int, tokens: int, head_dim: int) -> int:
    """FLOPs of attention forward (``4 N^2 d`` per head) and backward (``8 N^2 d``), without recomputed scores."""
    return 12 * crops * heads * tokens**2 * head_dim


def time_backend(
    backend: str, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device, warmup: int, iters: int
) -> float | None:
    """Median seconds of one forward and backward under ``backend`` (``default``: PyTorch's choice), or None where
    it cannot run these inputs. ``shape`` is (crops, heads, tokens, head_dim)."""
    crops, heads, tokens, head_dim = shape
    generator = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(crops, tokens, 3, heads, head_dim, generator=generator, device=device, dtype=dtype)
    qkv.requires_grad_()
    grad = torch.randn(shape, generator=generator, device=device, dtype=dtype)

    def step() -> None:
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # as dinov2.layers.Attention passes them
        with contextlib.nullcontext() if backend == "default" else sdpa_kernel(getattr(SDPBackend, backend)):
            out = F.scaled_dot_product_attention(q, k, v)
        torch.autograd.backward(out, grad)
        qkv.grad = None

    try:
        step()
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as error:  # "No available kernel" for this device, dtype or head size
        logger.info("%s: not available here (%s)", backend, str(error).splitlines()[0])
        return None
    for _ in range(warmup):
        step()
    return statistics.median(time_call(step, device) for _ in range(iters))


def add_shape_arguments(p: argparse.ArgumentParser) -> None:
    """The options that set a block's training shape, dtype, device and timing (shared with benchmark_block)."""
    p.add_argument("--crops", type=positive_int, default=None,
                   help="crops per step (default: 256 for ViT-S, 128 for larger: the GPU check's batches x 2 global "
                   "crops)")
    p.add_argument("--tokens", type=positive_int, default=257, help="tokens per crop (257: 224 px, patch 14)")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="auto: bf16 on a GPU (as under autocast), fp32 on a CPU")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... or auto (CUDA if available)")
    p.add_argument("--warmup", type=non_negative_int, default=3)
    p.add_argument("--iters", type=positive_int, default=20)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=["vit_small", "vit_large"], choices=sorted(ARCH_SIZES))
    add_shape_arguments(p)
    return p


def main(argv: list[str] | None = None) -> dict[str, str]:
    """Print a table of the backends per architecture; return (and print) the fastest backend of each."""
    args = build_parser().parse_args(argv)
    setup_logging()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    logger.info("%s, %s, torch %s", device, dtype, torch.__version__)
    print(f"{'arch':<12}{'shape (crops, heads, tokens, dim)':<36}{'backend':<22}{'ms':>9}{'TFLOP/s':>10}")
    fastest: dict[str, tuple[float, str]] = {}
    for arch in args.arch:
        width, _, heads = ARCH_SIZES[arch]
        crops = args.crops or (256 if arch == "vit_small" else 128)
        shape = (crops, heads, args.tokens, width // heads)
        flops = attention_flops(*shape)
        for backend in BACKENDS:
            seconds = time_backend(backend, shape, dtype, device, args.warmup, args.iters)
            if seconds is None:
                print(f"{arch:<12}{str(shape):<36}{backend:<22}{'n/a':>9}{'':>10}")
                continue
            print(f"{arch:<12}{str(shape):<36}{backend:<22}{seconds * 1e3:>9.3f}{flops / seconds / 1e12:>10.2f}")
            if backend != "default":
                fastest[arch] = min(fastest.get(arch, (seconds, backend)), (seconds, backend))
    print(" ".join(f"{arch}={backend}" for arch, (_, backend) in fastest.items()))
    return {arch: backend for arch, (_, backend) in fastest.items()}


if __name__ == "__main__":
    from dinov2.cli import run_cli

    run_cli(main)
