"""Feature-extraction throughput of our ViT-S/14 next to timm's `vit_small_patch14_dinov2`, same weights.

    python scripts/benchmark_features.py [--weights DinoBloom-S.pth] [--batch-size 32] [--iters 10] \
        [--precision bf16] [--compile]

Both models run in one process on the same input, interleaved (alternating order) so that both see the
same machine state; after a warm-up, the median time per batch over `--iters` iterations is reported.
Defaults: 224 px, batch 32, float32 on CPU under `torch.inference_mode()`. `--precision bf16` runs both under
bf16 autocast and `--compile` both through `torch.compile` as `extract_features --compile` does (weights frozen
into the compiled code); the features are compared in float32, uncompiled, before the timing.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a file from a checkout: make `dinov2` and export_timm importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import dinov2  # noqa: E402, F401  before torch: it sets OpenMP's wait policy, as for the commands it times

import torch  # noqa: E402

from export_timm import timm_model_config, timm_state_dict  # noqa: E402

from dinov2.cli import non_negative_int, positive_int  # noqa: E402
from dinov2.eval.extract_features import PRECISIONS, compiled_forward  # noqa: E402
from dinov2.eval.protocol import resolve_device  # noqa: E402
from dinov2.hub import load_backbone  # noqa: E402
from dinov2.logs import setup_logging  # noqa: E402

logger = logging.getLogger(__name__)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call; waits for queued GPU work so that the kernels are timed, not their launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def benchmark(
    weights: str | None = None,
    batch_size: int = 32,
    img_size: int = 224,
    iters: int = 10,
    warmup: int = 3,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    compile: bool = False,
) -> dict[str, float]:
    """Median seconds per batch of our backbone and of timm's, after checking they agree to 2e-5 (in float32,
    uncompiled); timed in `precision` ("fp32" or "bf16" autocast), compiled if `compile`."""
    import timm

    device = resolve_device(str(device))
    ours = load_backbone("dinobloom_s", weights, img_size=img_size).to(device)
    name, kwargs = timm_model_config(ours)
    reference = timm.create_model(name, pretrained=False, **kwargs).eval().to(device)
    reference.load_state_dict(timm_state_dict(ours), strict=True)
    x = torch.randn(batch_size, 3, img_size, img_size, generator=torch.Generator().manual_seed(0)).to(device)
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    timm_cls = lambda images: reference.forward_features(images)[:, 0]  # noqa: E731
    # Both in full float32: cuDNN would otherwise run timm's patch convolution in TF32 (our CUDA patch
    # embedding is a matmul, which stays float32), and the features would differ by ~1e-3.
    tf32_conv, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False
    try:
        with torch.inference_mode():
            max_diff = (ours(x) - timm_cls(x)).abs().max().item()
        if max_diff > 2e-5:
            raise RuntimeError(f"our features and timm's differ by {max_diff:.2e}; the comparison is meaningless")
        logger.info("max |ours - timm| = %.2e", max_diff)
        forwards = {"dinov2 (ours)": ours, f"timm {name}": timm_cls}
        if compile:
            forwards = {label: compiled_forward(forward, batch_size) for label, forward in forwards.items()}
        bf16 = precision == "bf16"

        def runner(forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], object]:
            def run() -> object:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    return forward(x)

            return run

        return _time_interleaved({label: runner(f) for label, f in forwards.items()}, iters, warmup, device)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32_conv


def _time_interleaved(
    runners: dict[str, Callable[[], object]], iters: int, warmup: int, device: torch.device
) -> dict[str, float]:
    """Time the runners interleaved (alternating order), after `warmup` rounds; median seconds per call each."""
    with torch.inference_mode():
        times: dict[str, list[float]] = {label: [] for label in runners}
        labels = list(runners)
        for step in range(warmup + iters):
            order = labels if step % 2 == 0 else labels[::-1]
            for label in order:
                elapsed = time_call(runners[label], device)
                if step >= warmup:
                    times[label].append(elapsed)
    return {label: statistics.median(values) for label, values in times.items()}


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description="ViT-S/14 feature-extraction throughput: ours vs timm.")
    parser.add_argument("--weights", default=None, help="checkpoint (any layout the loader accepts); default random")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--img-size", type=positive_int, default=224)
    parser.add_argument("--iters", type=positive_int, default=10)
    parser.add_argument("--warmup", type=non_negative_int, default=3)
    parser.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... or auto (CUDA if available)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="fp32, or bf16 autocast for both")
    parser.add_argument("--compile", action="store_true",
                        help="both through torch.compile, as extract_features --compile (the first warm-up call "
                        "compiles)")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Run the benchmark and print a table."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.compile and args.warmup < 1:
        parser.error("--compile needs --warmup 1 or more: the first call compiles, and would be timed")
    setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = benchmark(args.weights, args.batch_size, args.img_size, args.iters, args.warmup, args.device,
                        args.precision, args.compile)  # fmt: skip
    baseline = max(results.values())
    mode = f"{args.precision}{', compiled' if args.compile else ''}"
    print(f"ViT-S/14, {args.img_size} px, batch {args.batch_size}, {mode}, {resolve_device(args.device)}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, median of {args.iters}")
    print(f"{'implementation':<36} {'ms / batch':>11} {'images / s':>11} {'speed-up':>9}")
    for label, seconds in results.items():
        print(f"{label:<36} {seconds * 1e3:>11.1f} {args.batch_size / seconds:>11.1f} {baseline / seconds:>8.2f}x")
    return results


if __name__ == "__main__":
    from dinov2.cli import run_cli

    run_cli(main)
