"""Training throughput and model-FLOP utilisation (MFU) of the DINO + iBOT + KoLeo step.

    python scripts/benchmark_train.py --arch vit_small --batch-size 32            # GPU: bf16, CPU: fp32
    python scripts/benchmark_train.py --config-file dinov2/configs/train/demo.yaml --batch-size 16
    torchrun --nproc_per_node=8 scripts/benchmark_train.py --arch vit_large --batch-size 64   # FSDP2

Times full training steps (forward and backward of the student on every crop, teacher forward, clipping,
AdamW, EMA) on synthetic images after a warm-up, and reports the median. FLOPs of one step are counted
with ``torch.utils.flop_counter``; MFU is achieved FLOP/s over the dense matrix-multiply rate that this
script measures on the same device (fp32 on CPU, bf16 on GPU). The last line reads
``images_per_s=<x> mfu=<fraction> peak_mem_gb=<z>``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import logging
import random
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from dinov2 import distributed
from dinov2.configs import apply_scaling_rules_to_cfg, load_config
from dinov2.data.collate import collate_data_and_cast
from dinov2.data.masking import MaskingGenerator
from dinov2.train.data import effective_local_crops
from dinov2.train.train import build_training_state, make_autocast, training_step

logger = logging.getLogger("benchmark_train")

ARCH_PATCH = {"vit_small": 14, "vit_base": 14, "vit_large": 14, "vit_giant2": 14}


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so wall-clock times mean something."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> float:
    """Best measured FLOP/s of a square dense matrix multiply on ``device``."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / 5)
    return 2 * size**3 / best


def synthetic_batch(cfg, batch_size: int, seed: int) -> dict:
    """A collated batch of random images with iBOT masks, shaped like the training loader's."""
    gen = torch.Generator().manual_seed(seed)
    g, l = cfg.crops.global_crops_size, cfg.crops.local_crops_size
    n_local = effective_local_crops(cfg)
    samples = [
        (
            {
                "global_crops": [torch.randn(3, g, g, generator=gen) for _ in range(2)],
                "local_crops": [torch.randn(3, l, l, generator=gen) for _ in range(n_local)],
            },
            0,
        )
        for _ in range(batch_size)
    ]
    grid = g // cfg.student.patch_size
    return collate_data_and_cast(
        samples,
        mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
        mask_probability=cfg.ibot.mask_sample_probability,
        dtype=torch.float32,
        mask_generator=MaskingGenerator((grid, grid), max_num_patches=0.5 * grid * grid),
        rng=random.Random(seed),
    )


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default="dinov2/configs/train/custom.yaml", help="training config to benchmark")
    p.add_argument("--arch", default=None, help="vit_small | vit_base | vit_large | vit_giant2 (overrides the config)")
    p.add_argument("--batch-size", type=int, default=32, help="images per rank")
    p.add_argument("--crops", choices=("dinobloom", "dinov2", "config"), default="config",
                   help="dinobloom: 2 global crops; dinov2: 2 global + 8 local (98 px); config: as configured")
    p.add_argument("--precision", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute block activations")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--iters", type=int, default=10, help="timed steps")
    p.add_argument("--heads", default=None, help="prototypes,hidden,bottleneck of both heads, e.g. 65536,2048,256")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="further key=value config overrides")
    return p


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the benchmark and print its figures."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    info = distributed.enable_distributed()
    device = info.device
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    overrides = [
        f"train.batch_size_per_gpu={args.batch_size}",
        f"train.precision={precision}",
        f"train.compile={args.compile}",
        f"train.activation_checkpointing={args.activation_checkpointing}",
        "student.pretrained_weights=''",
        "train.dataset_path=unused",
    ]
    if args.arch:
        overrides += [f"student.arch={args.arch}", f"student.patch_size={ARCH_PATCH[args.arch]}",
                      "student.embed_dim=0", "student.depth=0", "student.num_heads=0"]
        if args.arch == "vit_giant2":
            overrides.append("student.ffn_layer=swiglufused")
    if args.crops == "dinobloom":
        overrides += ["crops.local_crops_number=1", "crops.global_crops_size=224"]
    elif args.crops == "dinov2":
        overrides += ["crops.local_crops_number=8", "crops.local_crops_size=98", "crops.global_crops_size=224"]
    if args.heads:
        k, hidden, bottleneck = (int(v) for v in args.heads.split(","))
        for head in ("dino", "ibot"):
            overrides += [f"{head}.head_n_prototypes={k}", f"{head}.head_hidden_dim={hidden}",
                          f"{head}.head_bottleneck_dim={bottleneck}"]
    cfg = load_config(args.config_file, overrides + [o for o in args.opts if o != "--"])
    apply_scaling_rules_to_cfg(cfg, info.world_size)

    torch.manual_seed(0)
    model, optimizer, scaler = build_training_state(cfg, device)
    autocast = make_autocast(cfg, device)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in synthetic_batch(cfg, args.batch_size, info.rank).items()}
    n_params = sum(p.numel() for p in model.student.backbone.parameters())

    def step() -> None:
        training_step(model, optimizer, scaler, autocast, batch, teacher_temp=0.07, momentum=0.994, clip_grad=3.0)

    for _ in range(args.warmup):
        step()
    synchronize(device)
    # FLOPs of one step, counted on the eager graph (compiled code runs the same matmuls).
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops_per_step = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.iters):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    peak_mem_gb = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")

    matmul_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    size, repeats = (8192, 20) if device.type == "cuda" else (2048, 5)
    peak = matmul_peak_flops(device, matmul_dtype, size, repeats)
    images_per_s = args.batch_size * info.world_size / seconds
    achieved = flops_per_step * info.world_size / seconds  # each rank counts its own share
    mfu = achieved / (peak * info.world_size)
    result = {
        "images_per_s": images_per_s,
        "s_per_iter": seconds,
        "tflops_per_step": flops_per_step / 1e12,
        "achieved_tflops_per_rank": achieved / info.world_size / 1e12,
        "matmul_peak_tflops": peak / 1e12,
        "mfu": mfu,
        "peak_mem_gb": peak_mem_gb,
    }
    if info.is_main_process:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
        print(f"device: {name}; ranks: {info.world_size}; precision: {precision}; compile: {args.compile}; "
              f"activation checkpointing: {args.activation_checkpointing}")
        print(f"model: {cfg.student.arch} ({n_params / 1e6:.1f} M backbone params), crops {args.crops} "
              f"(global {cfg.crops.global_crops_size} px, {effective_local_crops(cfg)} local), batch {args.batch_size}/rank, "
              f"heads {cfg.dino.head_n_prototypes} prototypes")
        for key, value in result.items():
            print(f"{key:>26}: {value:.4g}")
        print(f"images_per_s={images_per_s:.2f} mfu={mfu:.3f} peak_mem_gb={peak_mem_gb:.2f}")
    distributed.destroy()
    return result


if __name__ == "__main__":
    main()
