"""Throughput of the training input pipeline: decode, multi-crop augmentation, masking collate, loader.

    python scripts/benchmark_data.py --data /path/to/lists_or_images [--workers 0 2 --batch-size 32]
    python scripts/benchmark_data.py --demo /tmp/demo          # generate (once) and use the demo set

Recipes: ``dinobloom`` (hematology augmentation, 2 global crops of 224, no local crops, as DinoBloom
trained) and ``dinov2`` (DINOv2's augmentation, 2 global 224 + 8 local 98). "per worker" rows run in
this process with one thread, as one DataLoader worker would (best of ``--repeats`` passes); "loader" rows
run the real DataLoader with the infinite sampler and the masking collate. ``--colour device`` (the default,
as a CUDA run does) leaves the views' colour operations to the training device: the workers hand over uint8
crops, and a "colour on <device>" row times those operations on whole batches there; ``--colour workers`` runs
them in the workers (as a CPU run does). The last line is ``images_per_s=<x>``: the loader throughput of the
first recipe given (dinobloom by default) with the largest worker count.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# Lets the script run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinov2.data import (  # noqa: E402
    DataAugmentationDINO,
    InfiniteSampler,
    make_data_loader,
    make_dataset,
)
from dinov2.data.collate import collate_data_and_cast  # noqa: E402
from dinov2.data.masking import MaskingGenerator  # noqa: E402
from dinov2.data.photometric import finish_crops  # noqa: E402
from dinov2.data.transforms import load_image  # noqa: E402
from dinov2.parallel import dtype_from_name  # noqa: E402

logger = logging.getLogger("benchmark_data")

RECIPES: dict[str, dict[str, Any]] = {
    "dinobloom": {"local_crops_number": 0, "hematology": True},
    "dinov2": {"local_crops_number": 8, "hematology": False},
}


def make_augmentation(recipe: str) -> DataAugmentationDINO:
    """The augmentation of a named recipe (global scale 0.32..1, local 0.05..0.32, local size 98)."""
    return DataAugmentationDINO(
        (0.32, 1.0), (0.05, 0.32), global_crops_size=224, local_crops_size=98, **RECIPES[recipe]
    )


def make_collate(dtype: torch.dtype, defer_colour: bool) -> Callable[[list[Any]], Any]:
    """The trainer's collate: stack the crops as ``dtype`` (uint8 with ``defer_colour``) and draw the iBOT masks."""
    grid = 224 // 14
    generator = MaskingGenerator.for_global_crops(224, 14)
    return functools.partial(
        collate_data_and_cast,
        mask_ratio_tuple=(0.1, 0.5),
        mask_probability=0.5,
        dtype=dtype,
        n_tokens=grid * grid,
        mask_generator=generator,
        defer_colour=defer_colour,
    )


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def time_per_worker(
    dataset: Any, recipe: str, count: int, collate: Callable[[list[Any]], Any], batch: int, repeats: int = 3
) -> dict[str, float]:
    """Images/s of decode, augmentation and collate in this process with one thread, each the best of ``repeats``.

    The best pass is the one least disturbed by other work on the machine (on a shared machine single passes
    vary by a factor of two).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    decode = augment = collated = 0.0
    try:
        paths = [dataset.path(i % len(dataset)) for i in range(count)]
        augmentation = make_augmentation(recipe)
        for _ in range(repeats):
            start = time.perf_counter()
            images = [load_image(p, dataset.resize) for p in paths]
            decode = max(decode, _rate(count, time.perf_counter() - start))
            start = time.perf_counter()
            samples = [(augmentation(image), 0) for image in images]
            augment = max(augment, _rate(count, time.perf_counter() - start))
            batches = [samples[i : i + batch] for i in range(0, count - batch + 1, batch)] or [samples]
            start = time.perf_counter()
            for chunk in batches:
                collate(chunk)
            collated = max(collated, _rate(sum(len(c) for c in batches), time.perf_counter() - start))
    finally:
        torch.set_num_threads(threads)
    end_to_end = 1.0 / (1.0 / decode + 1.0 / augment + 1.0 / collated)
    return {"decode": decode, "augment": augment, "collate": collated, "decode+augment+collate": end_to_end}


def time_loader(dataset: Any, recipe: str, workers: int, batch: int, batches: int, collate: Callable) -> float:
    """Images/s of the DataLoader after one warm-up batch per worker."""
    dataset.transform = make_augmentation(recipe)
    sampler = InfiniteSampler(len(dataset), seed=0, batch_size=batch)
    loader = make_data_loader(dataset, batch, workers, sampler, collate_fn=collate, pin_memory=False)
    iterator = iter(loader)
    for _ in range(max(1, workers)):
        next(iterator)
    start = time.perf_counter()
    for _ in itertools.islice(iterator, batches):
        pass
    seconds = time.perf_counter() - start
    del iterator
    return _rate(batches * batch, seconds)


def time_colour_on_device(
    dataset: Any, recipe: str, batch: int, collate: Callable, device: torch.device, dtype: torch.dtype, repeats: int
) -> float:
    """Images/s of the deferred colour operations on ``device``, on whole batches (best of ``repeats``)."""
    augmentation = make_augmentation(recipe)
    samples = [(augmentation(load_image(dataset.path(i % len(dataset)), dataset.resize)), 0) for i in range(batch)]
    deferred = collate(samples)
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="dataset: folder of .txt lists, a .txt list, an image folder or Name:root=...")
    source.add_argument("--demo", type=Path, help="generate the demo dataset here (if needed) and use it")
    parser.add_argument("--resize", type=int, default=224, help="resize images first (0: keep the size)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                        help="dtype of the collated crops: the run's compute dtype (bf16 or fp16 on GPU, fp32 on CPU)")
    parser.add_argument("--colour", choices=("device", "workers"), default="device",
                        help="where the views' colour operations run (train.colour_augmentation)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device of the colour operations with --colour device")
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=sorted(RECIPES))
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8, help="timed batches per loader measurement")
    parser.add_argument("--per-worker-images", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="per-worker passes; the best is reported")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    if args.demo is not None:
        from dinov2.data.demo import generate_demo_dataset

        data = str(generate_demo_dataset(args.demo, images_per_class=64).lists_dir)
    else:
        data = args.data
    dataset = make_dataset(data, resize=args.resize or None)
    dtype, defer = dtype_from_name(args.dtype), args.colour == "device"
    collate = make_collate(dtype, defer)
    crops = "uint8 crops, colour on " + args.device if defer else f"crops as {args.dtype}, colour in the workers"
    print(f"data: {data} ({len(dataset)} images, resize {dataset.resize}, {crops})")
    print(f"{'recipe':<10} {'stage':<24} {'workers':>7} {'images/s':>10}")
    headline = 0.0
    for recipe in args.recipes:
        rates = time_per_worker(dataset, recipe, args.per_worker_images, collate, args.batch_size, args.repeats)
        for stage, rate in rates.items():
            print(f"{recipe:<10} {stage:<24} {'1 (per)':>7} {rate:>10.1f}")
        if defer:
            rate = time_colour_on_device(dataset, recipe, args.batch_size, collate, torch.device(args.device), dtype,
                                         args.repeats)  # fmt: skip
            print(f"{recipe:<10} {'colour on ' + args.device:<24} {'batch':>7} {rate:>10.1f}")
        for workers in sorted(args.workers):
            rate = time_loader(dataset, recipe, workers, args.batch_size, args.batches, collate)
            print(f"{recipe:<10} {'loader':<24} {workers:>7} {rate:>10.1f}")
            if recipe == args.recipes[0]:
                headline = rate
    print(f"images_per_s={headline:.1f}")
    return 0


if __name__ == "__main__":
    from dinov2.cli import run_cli

    run_cli(main)
