"""Throughput of the training input pipeline: decode, multi-crop augmentation, masking collate, loader.

    python scripts/benchmark_data.py --data /path/to/lists_or_images [--workers 0 2 --batch-size 32]
    python scripts/benchmark_data.py --demo /tmp/demo          # generate (once) and use the demo set

Every stage is the trainer's own, built from DinoBloom's training config (``custom.yaml``) as
``dinov2/train/data.py`` builds it: the dataset with its Lanczos resize and augmentation, the collate that draws the
iBOT masks from per-batch seeds, and the loader with the infinite sampler. Recipes: ``dinobloom`` (that config as
it is: hematology views, 2 global crops of 224, no local crops) and ``dinov2`` (DINOv2's views, 2 global 224 + 8
local 98). "per worker" rows run in this process with one thread, as one DataLoader worker would (best of
``--repeats`` passes): "decode" (and the Lanczos resize), "views" (each view's crop, flips and rotations, and the
draw of its colour parameters), "collate" (stacking, iBOT masks, and with ``--colour workers`` the colour
operations, applied there view by view: "collate+colour") and "all three"; "loader" rows run the training loader.
``--colour device`` (the default on CUDA, as a CUDA run does) leaves the views' colour operations to the training
device: the workers hand over uint8 crops, and a "colour on <device>" row times those operations on whole batches
there; ``--colour workers`` (the default on a CPU, as a CPU run does) runs them in the workers. The crops are
collated in the run's compute dtype (by default bf16 on CUDA, fp32 on a CPU). The last line is
``images_per_s=<x>``: the loader throughput of the first recipe given (dinobloom by default) with the largest worker
count.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
import time
from pathlib import Path

# Lets the script run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dinov2  # noqa: E402, F401  before torch: it sets OpenMP's wait policy, as for the commands it times

import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from dinov2.cli import non_negative_int, positive_int  # noqa: E402
from dinov2.configs import TRAIN_CONFIG_DIR, load_config  # noqa: E402
from dinov2.data import FileListDataset, SampleKey, load_image  # noqa: E402
from dinov2.data.photometric import finish_crops  # noqa: E402
from dinov2.eval.protocol import resolve_device  # noqa: E402
from dinov2.logs import setup_logging  # noqa: E402
from dinov2.parallel import dtype_from_name  # noqa: E402
from dinov2.train.data import build_train_collate, build_train_dataset, build_train_loader  # noqa: E402


#: Overrides of DinoBloom's training config that give each recipe.
RECIPES: dict[str, list[str]] = {
    "dinobloom": [],
    "dinov2": ["crops.local_crops_number=8", "train.augmentation=dinov2"],
}


def recipe_config(recipe: str, data: str, resize: int, batch_size: int) -> DictConfig:
    """DinoBloom's training config with ``recipe``'s overrides, reading ``data``."""
    cfg = load_config(
        TRAIN_CONFIG_DIR / "custom.yaml",
        [f"train.image_resize={resize}", f"train.batch_size_per_gpu={batch_size}", *RECIPES[recipe]],
    )
    cfg.train.dataset_path = data
    return cfg


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def time_per_worker(
    cfg: DictConfig, dataset: FileListDataset, count: int, dtype: torch.dtype, defer_colour: bool, repeats: int = 3
) -> dict[str, float]:
    """Images/s of decode, augmentation and collate in this process with one thread, each the best of ``repeats``.

    The best pass is the one least disturbed by other work on the machine (on a shared machine single passes
    vary by a factor of two).
    """
    collate = build_train_collate(cfg, dtype, defer_colour)
    batch = int(cfg.train.batch_size_per_gpu)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    decode = augment = collated = 0.0
    try:
        paths = [dataset.path(i % len(dataset)) for i in range(count)]
        for _ in range(repeats):
            start = time.perf_counter()
            images = [load_image(p, dataset.resize) for p in paths]
            decode = max(decode, _rate(count, time.perf_counter() - start))
            start = time.perf_counter()
            items = [((dataset.transform(image), 0), SampleKey(i, 0)) for i, image in enumerate(images)]
            augment = max(augment, _rate(count, time.perf_counter() - start))
            batches = [items[i : i + batch] for i in range(0, count - batch + 1, batch)] or [items]
            start = time.perf_counter()
            for chunk in batches:
                collate(chunk)
            collated = max(collated, _rate(sum(len(c) for c in batches), time.perf_counter() - start))
    finally:
        torch.set_num_threads(threads)
    end_to_end = 1.0 / (1.0 / decode + 1.0 / augment + 1.0 / collated)
    # The views' colour operations run in the collate (view by view) when they run in the workers.
    collate_name = "collate" if defer_colour else "collate+colour"
    return {"decode": decode, "views": augment, collate_name: collated, "all three": end_to_end}


def time_loader(
    cfg: DictConfig, dataset: FileListDataset, batches: int, dtype: torch.dtype, defer_colour: bool,
    device: torch.device,
) -> float:
    """Images/s of the training loader (``train.num_workers`` workers) over ``batches`` batches, and at least two per
    worker (fewer would time the workers' start rather than their steady state), after one warm-up batch per worker;
    its batches pinned for a CUDA ``device``, as a training run's are."""
    loader = build_train_loader(cfg, dataset, start=0, rank=0, world_size=1, dtype=dtype, defer_colour=defer_colour,
                                pin_memory=device.type == "cuda")  # fmt: skip
    workers = int(cfg.train.num_workers)
    batches = max(batches, 2 * workers)
    iterator = iter(loader)
    for _ in range(max(1, workers)):
        next(iterator)
    start = time.perf_counter()
    for _ in itertools.islice(iterator, batches):
        pass
    seconds = time.perf_counter() - start
    del iterator
    return _rate(batches * int(cfg.train.batch_size_per_gpu), seconds)


def time_colour_on_device(
    cfg: DictConfig, dataset: FileListDataset, device: torch.device, dtype: torch.dtype, repeats: int
) -> float:
    """Images/s of the deferred colour operations on ``device``, on whole batches (best of ``repeats``)."""
    batch = int(cfg.train.batch_size_per_gpu)
    items = [(dataset[SampleKey(i % len(dataset), 0)], SampleKey(i, 0)) for i in range(batch)]
    deferred = build_train_collate(cfg, dtype, defer_colour=True)(items)
    best = 0.0
    for _ in range(repeats + 1):  # the first pass warms the device up
        start = time.perf_counter()
        finished = finish_crops(deferred, device, dtype)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, _rate(batch, time.perf_counter() - start))
        del finished
    return best


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="dataset: folder of .txt lists, a .txt list, an image folder or Name:root=...")
    source.add_argument("--demo", type=Path, help="generate the demo dataset here (if needed) and use it")
    parser.add_argument("--resize", type=int, default=224, help="resize images first (0: keep the size)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                        help="dtype of the collated crops: the run's compute dtype (default: bf16 on CUDA, fp32 on "
                        "CPU)")
    parser.add_argument("--colour", choices=("device", "workers"), default=None,
                        help="where the views' colour operations run, as train.colour_augmentation (default: device "
                        "on CUDA, workers on CPU, as a training run does)")
    parser.add_argument("--device", default="auto",
                        help="the training device: cpu, cuda, cuda:1, ... or auto (CUDA if available)")
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=sorted(RECIPES))
    parser.add_argument("--workers", nargs="+", type=non_negative_int, default=[0, 2])
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--batches", type=positive_int, default=8,
                        help="timed batches per loader measurement (at least two per worker are timed)")
    parser.add_argument("--per-worker-images", type=positive_int, default=128)
    parser.add_argument("--repeats", type=positive_int, default=3, help="per-worker passes; the best is reported")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    args = build_parser().parse_args(argv)
    setup_logging(logging.WARNING)  # the figures are printed; the log only says what went wrong (unreadable images)
    device = resolve_device(args.device)  # a device this machine lacks is refused before any work
    colour = args.colour or ("device" if device.type == "cuda" else "workers")
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")

    if args.demo is not None:
        from dinov2.data.demo import generate_demo_dataset

        data = str(generate_demo_dataset(args.demo, images_per_class=64).lists_dir)
    else:
        data = args.data
    dtype, defer = dtype_from_name(dtype_name), colour == "device"
    crops = f"uint8 crops, colour on {device}" if defer else f"crops as {dtype_name}, colour in the workers"
    headline = 0.0
    for recipe in args.recipes:
        cfg = recipe_config(recipe, data, args.resize, args.batch_size)
        dataset = build_train_dataset(cfg)
        if recipe == args.recipes[0]:
            print(f"data: {data} ({len(dataset)} images, resize {dataset.resize}, {crops})")
            print(f"{'recipe':<10} {'stage':<24} {'workers':>7} {'images/s':>10}")
        rates = time_per_worker(cfg, dataset, args.per_worker_images, dtype, defer, args.repeats)
        for stage, rate in rates.items():
            print(f"{recipe:<10} {stage:<24} {'1 (per)':>7} {rate:>10.1f}")
        if defer:
            rate = time_colour_on_device(cfg, dataset, device, dtype, args.repeats)
            print(f"{recipe:<10} {'colour on ' + str(device):<24} {'batch':>7} {rate:>10.1f}")
        for workers in sorted(args.workers):
            cfg.train.num_workers = workers
            rate = time_loader(cfg, dataset, args.batches, dtype, defer, device)
            print(f"{recipe:<10} {'loader':<24} {workers:>7} {rate:>10.1f}")
            if recipe == args.recipes[0]:
                headline = rate
    print(f"images_per_s={headline:.1f}")
    return 0


if __name__ == "__main__":
    from dinov2.cli import run_cli

    run_cli(main)
