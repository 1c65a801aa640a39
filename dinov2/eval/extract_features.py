"""Extract the CLS features of a backbone for a folder or list of images into a features file.

    python -m dinov2.eval.extract_features --model dinobloom_s --weights DinoBloom-S.pth \\
        --data cells/ --output features.h5

`--data` is one of:

* a folder, searched recursively; the first folder level is the label (`<class>/.../<image>`), deeper
  levels are kept in the stored relative paths (e.g. `<label>/<patient>/<cell>.jpg`); images directly in
  the folder are unlabelled (-1), with a warning naming them when the folder also has class folders (the
  probes refuse unlabelled images); hidden files and folders (".name") are skipped; symlinked folders are
  followed, each real folder once;
* a `.txt` file with one image path per line (relative to the file's folder, or to `--root`, or absolute; `#`
  comments), read by the rules of the training lists: unlabelled;
* a `.csv` file with a `path` column (image paths as in a `.txt` list, `~` expanded) and an optional `label`
  column (class names; empty = unlabelled); `--csv-columns file,label` names other columns. An image listed twice
  is an error: its copies would test each other in cross-validation.

A list none of whose (about 20, evenly spaced) images looked up exists is an error before the model is loaded;
single missing images are skipped and counted like unreadable ones. The `--output` folder is created and tried
with a temporary file before any work too.

Without `--img-size`, images are resized to the size the weights were trained at where the file tells it (a
training run's `teacher_checkpoint.pth`: its run's `crops.global_crops_size`, or, copied out of its run, the size
its position-embedding grid implies, grid x patch size), else to DinoBloom's 224 (released DinoBloom files, DINOv2
hub files, other layouts).

Preprocessing is DinoBloom's: Resize((img_size, img_size)) bilinear with antialias (`--resize pil-bicubic`:
PIL's bicubic resize, as DinoBloom's cross-validation probes), ToTensor, ImageNet normalisation. The stored
features are `model(x)`, the CLS token after the final LayerNorm (`x_norm_clstoken`), as float32 and not
L2-normalised: DinoBloom's kNN and logistic-regression probes work on exactly these (its C = dim * classes / 100
assumes their scale). The backbone runs in float32 unless `--precision bf16` (autocast on CUDA or a CPU; on a CPU it
pays where the CPU computes bf16 natively, as Xeons with AMX or AVX-512 BF16 do). `--compile` runs the backbone
through `torch.compile` (with its weights frozen into the compiled code, and every batch the same size), which
pays back on a CPU from a few thousand images on. Images that cannot be read are logged by path and skipped, with a
count at the end. Progress is saved every minute in `<output>.partial/`, and when the extraction is interrupted
(Ctrl-C, or SIGTERM as from `kill` or a job scheduler), so that the same command, run again, continues where it
stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from dinov2.data.loaders import init_worker
from dinov2.data.transforms import EVAL_RESIZES, IMAGE_LOAD_ERRORS, load_image, make_eval_transform
from dinov2.eval.features_io import FeatureSet, check_names_storable, check_writable, save_features
from dinov2.eval.image_list import ImageList, add_list_arguments, check_list_paths, list_images
from dinov2.eval.partial_features import PartialFeatures, image_list_digest
from dinov2.cli import non_negative_int, positive_int, run_cli
from dinov2.eval.protocol import resolve_device
from dinov2.hub import RELEASE_URLS, load_backbone
from dinov2.hub.backbones import check_image_size, default_image_size
from dinov2.files import file_sha256
from dinov2.logs import setup_logging
from dinov2.models import arch_of_width
from dinov2.parallel import check_compile_toolchain

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
BF16_DEVICE_TYPES = ("cuda", "cpu")  # where `--precision bf16` autocasts; elsewhere the features are float32
PARTIAL_SAVE_SECONDS = 60.0  # an interrupted extraction loses at most about this much work


class _ImageDataset(Dataset):
    """Decoded, preprocessed images; an unreadable file yields (index, None, reason) instead of failing."""

    def __init__(self, image_list: ImageList, img_size: int, resize: str = "bilinear") -> None:
        self.image_list = image_list
        self.transform = make_eval_transform(img_size, resize)

    def __len__(self) -> int:
        return len(self.image_list.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            image = load_image(self.image_list.root / self.image_list.paths[index])
            return index, self.transform(image), None
        except IMAGE_LOAD_ERRORS as err:
            return index, None, f"{type(err).__name__}: {err}"


def _collate(
    items: list[tuple[int, torch.Tensor | None, str | None]],
) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    ok = [(i, x) for i, x, _ in items if x is not None]
    failed = [(i, reason) for i, x, reason in items if x is None]
    images = torch.stack([x for _, x in ok]) if ok else None
    return [i for i, _ in ok], images, failed


def release_weights(model: str) -> str:
    """The published weights URL of a hub entry name (DinoBloom on Zenodo, DINOv2 on dl.fbaipublicfiles)."""
    if model not in RELEASE_URLS:
        raise ValueError(f"no released weights known for {model!r}; pass --weights (known: {', '.join(RELEASE_URLS)})")
    return RELEASE_URLS[model]


class _Batch(NamedTuple):
    """One embedded batch: its features (None when no image of it could be read), the indices of the images that
    could be read, and the end of the stretch of the image list processed so far."""

    features: np.ndarray | None
    indices: list[int]
    end: int


def _save_progress(partial: PartialFeatures, batches: list[_Batch]) -> None:
    """Save the batches that ``partial`` does not hold yet (those ending after ``partial.done``)."""
    unsaved = [batch for batch in batches if batch.end > partial.done]
    if not unsaved:
        return
    parts = [batch.features for batch in unsaved if batch.features is not None]
    features = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    indices = np.asarray([i for batch in unsaved for i in batch.indices], np.int64)
    partial.save(features, indices, unsaved[-1].end)


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """While in the block, SIGTERM raises KeyboardInterrupt; on leaving it, SIGTERM ends the process as before.

    A scheduler's or ``kill``'s SIGTERM would otherwise end the process at once, losing the progress since the last
    save; this way it is saved first and the process still ends with SIGTERM's status. The handler is set only where
    SIGTERM has its default action and in the main thread (the only one that may set handlers): a program that
    handles SIGTERM itself keeps its handler.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    received = False

    def interrupt(signum: int, frame: FrameType | None) -> None:
        nonlocal received
        received = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if received:
            signal.raise_signal(signal.SIGTERM)


@contextmanager
def _saved_when_interrupted(partial: PartialFeatures, batches: list[_Batch], total: int) -> Iterator[None]:
    """On KeyboardInterrupt (or SIGTERM, see ``_sigterm_interrupts``) in the block, save ``batches``, say how to
    continue, and re-raise."""
    with _sigterm_interrupts():
        try:
            yield
        except KeyboardInterrupt:
            # A second interrupt stops this save half-way: the folder stays consistent (files are renamed into place).
            _save_progress(partial, batches)
            if partial.done:
                logger.warning(
                    "interrupted: %s of %s images are saved in %s; run the same command to continue",
                    f"{partial.done:,}", f"{total:,}", partial.folder,
                )
            raise


@torch.inference_mode()
def embed_images(
    model: nn.Module,
    image_list: ImageList,
    batch_size: int = 64,
    num_workers: int = 0,
    img_size: int = 224,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    partial: PartialFeatures | None = None,
    progress: bool = True,
    resize: str = "bilinear",
    compile: bool = False,
) -> tuple[np.ndarray, list[int]]:
    """`model(x)` features (N_ok, D), float32, and the indices of the images that could be read.

    ``progress``: show a progress bar (the kNN monitor shows it on the first rank only).

    ``precision="bf16"`` runs the backbone under bf16 autocast on CUDA or a CPU (faster; features differ slightly).
    ``compile``: run it through `torch.compile`, see :func:`compiled_forward`.
    ``resize``: how images are resized (see :func:`dinov2.data.transforms.make_eval_transform`).
    ``partial``: continue after the images it holds, and save progress to it every ``PARTIAL_SAVE_SECONDS`` and
    when interrupted (KeyboardInterrupt, or SIGTERM where it has its default action), before re-raising.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    device = torch.device(device)
    if precision == "bf16" and device.type not in BF16_DEVICE_TYPES:
        logger.warning("--precision bf16 applies on CUDA and CPUs only; computing the features in fp32 on %s", device)
    bf16 = precision == "bf16" and device.type in BF16_DEVICE_TYPES
    model = model.to(device).eval()
    dataset: Dataset = _ImageDataset(image_list, img_size, resize)
    start = partial.done if partial is not None else 0
    if start:
        dataset = Subset(dataset, range(start, len(image_list.paths)))
    # (one compiled shape: batches padded to the longest one there can be)
    forward = compiled_forward(model, min(batch_size, len(dataset))) if compile else model
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        worker_init_fn=init_worker,  # workers ignore a SIGTERM to the process group: this process saves first
    )
    chunks = list(partial.features) if partial is not None else []
    kept = [int(i) for part in partial.indices for i in part] if partial is not None else []
    # One append per batch: an interrupt, which can come between any two statements, never leaves half a batch.
    batches: list[_Batch] = []
    last_save = time.monotonic()
    saving = _saved_when_interrupted(partial, batches, len(image_list.paths)) if partial is not None else nullcontext()
    # (log lines, e.g. an unreadable image's path, print above the progress bar, not glued to it)
    redirect = logging_redirect_tqdm() if progress else nullcontext()
    with saving, redirect, tqdm(total=len(image_list.paths), initial=start, desc="extracting features", unit="img",
                                disable=not progress) as bar:
        for indices, images, failed in loader:
            for index, reason in failed:
                logger.warning("skipping unreadable image %s (%s)", image_list.root / image_list.paths[index], reason)
            features = None
            if images is not None:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    cls = forward(images.to(device, non_blocking=True))
                features = cls.float().cpu().numpy()
            end = (batches[-1].end if batches else start) + len(indices) + len(failed)
            batches.append(_Batch(features, indices, end))
            bar.update(len(indices) + len(failed))
            if partial is not None and time.monotonic() - last_save >= PARTIAL_SAVE_SECONDS:
                _save_progress(partial, batches)
                last_save = time.monotonic()
    chunks += [batch.features for batch in batches if batch.features is not None]
    kept += [i for batch in batches for i in batch.indices]
    n_failed = len(image_list.paths) - len(kept)
    if not kept:
        examples = ", ".join(str(image_list.root / p) for p in image_list.paths[:3])
        raise ValueError(
            f"none of the {len(image_list.paths)} images could be read, e.g. {examples} (see the warnings above)"
        )
    if n_failed:  # all of them, also those skipped before an interruption, whose warnings are in an earlier log
        skipped = _skipped_paths(image_list, kept)
        more = f" and {len(skipped) - 20} more (the features file lists them all)" if len(skipped) > 20 else ""
        logger.warning("skipped %d of %d images that could not be read: %s%s", n_failed, len(image_list.paths),
                       ", ".join(skipped[:20]), more)  # fmt: skip
    return np.concatenate([c for c in chunks if c.shape[0]]), kept


def _skipped_paths(image_list: ImageList, kept: Sequence[int]) -> list[str]:
    """The paths (as listed) of the images that are not among the ``kept`` indices."""
    read = set(kept)
    return [path for index, path in enumerate(image_list.paths) if index not in read]


def compiled_forward(model: nn.Module, batch_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """`model`'s forward through `torch.compile` for inference, on batches padded to `batch_size` images.

    The weights are frozen into the compiled code (Inductor's `freezing`: constants folded, and on a CPU the
    matmul weights pre-packed once), so the model must not change while the returned function is used. Shorter
    batches (the last one, or one with unreadable images) are padded with zeros and the padding's rows dropped,
    so that one compilation serves the whole extraction; the padding does not change the other rows' features
    (a batch of another size may round them differently, by about 1e-6, as in eager mode).
    """
    compiled = torch.compile(model, dynamic=False, options={"freezing": True})

    def forward(images: torch.Tensor) -> torch.Tensor:
        n = images.shape[0]
        if n < batch_size:
            images = torch.cat([images, images.new_zeros((batch_size - n, *images.shape[1:]))])
        return compiled(images)[:n]

    return forward


def _load_backbone(
    model: str | nn.Module | None, weights: str | os.PathLike[str] | None
) -> tuple[nn.Module, str, str | os.PathLike[str] | None]:
    """The backbone of :func:`extract_features`'s `model` and `weights`, its name for the metadata, and the weights
    it holds (a hub name's release file when none are given; None for a module)."""
    if isinstance(model, nn.Module):
        if weights is not None:
            raise ValueError("pass either a model module or weights, not both")
        return model, type(model).__name__, None
    if model is None and weights is None:
        raise ValueError("give --model, --weights, or both")
    if weights is None:
        weights = release_weights(model)
    backbone = load_backbone(model, weights)
    return backbone, model or f"inferred:{arch_of_width(backbone.embed_dim) or 'vit'}", weights


def _default_image_size(weights: str | os.PathLike[str] | None, model: object, backbone: nn.Module) -> int:
    """The image size when none is given (:func:`dinov2.hub.backbones.default_image_size`): the one the weights'
    training run trained at, from its config.yaml or, for a training export outside its run, its position-embedding
    grid; else 224."""
    trained_at, why = default_image_size(weights)
    if why is None:
        return trained_at
    logger.info("images resized to %d px, %s (--img-size to change)", trained_at, why)
    built_at = backbone.patch_embed.img_size[0]
    if model is not None and built_at != trained_at:
        logger.warning(
            "--model %s is built for %d px: the run's %d px position embedding was resampled to %d px when "
            "it loaded, and is resampled back for the %d px images, which changes the features; leave "
            "--model out to embed them with the run's own network", model, built_at, trained_at, built_at,
            trained_at,
        )
    return trained_at


def _progress_settings(
    model_name: str,
    weights: str | os.PathLike[str],
    weights_file: Path | None,
    image_list: ImageList,
    img_size: int,
    resize: str,
    precision: str,
    compile: bool,
    device: torch.device,
) -> dict[str, Any]:
    """What the features depend on, which an interrupted extraction's progress must match to be continued."""
    weights_stat = weights_file.stat() if weights_file is not None else None
    return {
        "model": model_name,
        # absolute: the same relative name run from another folder is another file
        "weights": str(weights_file.resolve() if weights_file else weights),
        "weights_bytes_mtime": [weights_stat.st_size, weights_stat.st_mtime] if weights_stat else None,
        "img_size": img_size,
        "resize": resize,
        "precision": precision,
        **({"compiled": True} if compile else {}),  # (absent otherwise: older partial folders still match)
        "device_type": device.type,
        "images": [str(image_list.root.resolve()), len(image_list.paths), image_list_digest(image_list.paths)],
    }


def extract_features(
    data: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    model: str | nn.Module | None = None,
    weights: str | os.PathLike[str] | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    img_size: int | None = None,
    device: str | torch.device = "auto",
    precision: str = "fp32",
    resize: str = "bilinear",
    compile: bool = False,
    root: str | os.PathLike[str] | None = None,
    csv_columns: tuple[str, str | None] | None = None,
) -> FeatureSet:
    """Embed every image of `data` and return (and, with `output`, write) the feature set.

    `model` is a hub name (`dinobloom_s`, `dinov2_vitb14`, ...), a module, or None to infer the
    architecture from `weights`; for a hub name without `weights` the released weights are downloaded.
    `img_size`: None means the size the weights were trained at where they tell it (a training run's
    `teacher_checkpoint.pth`: `crops.global_crops_size` of the run's config.yaml or, away from its run, the size
    its position-embedding grid implies; see :func:`dinov2.hub.backbones.default_image_size`), else 224.
    `resize`: "bilinear" or "pil-bicubic" (see :func:`dinov2.data.transforms.make_eval_transform`).
    `precision` ("fp32" or "bf16") and `compile`: see :func:`embed_images`.
    `root`: the folder that the relative paths of a `.txt`/`.csv` list are relative to (default: the list's folder);
    `csv_columns`: the CSV's path and (optional) label column names (default: `path` and, if present, `label`).
    """
    if output is not None:  # before the model is loaded (perhaps downloaded) and every image embedded
        check_writable(Path(output))
    device = resolve_device(str(device))
    if compile:
        check_compile_toolchain(device, "--compile")
    image_list = list_images(
        data, root=root, columns=csv_columns, root_setting="--root", columns_setting="--csv-columns"
    )
    check_list_paths(data, image_list, root_setting="--root")
    if output is not None:
        others = [str(data)] + ([str(weights)] if weights is not None and not isinstance(model, nn.Module) else [])
        check_names_storable(Path(output), image_list.paths, image_list.root.resolve(), others)
    backbone, model_name, weights = _load_backbone(model, weights)
    if img_size is None:
        img_size = _default_image_size(weights, model, backbone)
    check_image_size(backbone, img_size)
    used_precision = precision if device.type in BF16_DEVICE_TYPES else "fp32"
    logger.info("embedding %d images from %s with %s on %s", len(image_list.paths), data, model_name, device)
    if image_list.class_names:  # (a folder's classes are its first folder level, whatever lies deeper)
        more = f" and {len(image_list.class_names) - 10} more" if len(image_list.class_names) > 10 else ""
        logger.info("%d classes: %s%s", len(image_list.class_names), ", ".join(image_list.class_names[:10]), more)
    weights_file = Path(weights).expanduser() if weights is not None and Path(weights).expanduser().is_file() else None
    partial = None
    if output is not None and not isinstance(model, nn.Module):  # (a module's weights have no name to check)
        settings = _progress_settings(
            model_name, weights, weights_file, image_list, img_size, resize, used_precision, compile, device
        )
        partial = PartialFeatures(Path(output), settings)
    features, kept = embed_images(
        backbone, image_list, batch_size, num_workers, img_size, device, precision, partial=partial, resize=resize,
        compile=compile,
    )
    result = FeatureSet(
        features=features,
        labels=np.asarray([image_list.labels[i] for i in kept], dtype=np.int64),
        paths=[image_list.paths[i] for i in kept],
        class_names=image_list.class_names,
        meta={
            "model": model_name,
            "weights": "" if weights is None else str(weights),
            # what the probes compare: the weights' bytes, and where the images are
            "weights_sha256": file_sha256(weights_file) if weights_file is not None else "",
            "embed_dim": int(features.shape[1]),
            "img_size": img_size,
            "resize": resize,
            "feature": "x_norm_clstoken (CLS token after the final LayerNorm; not L2-normalised)",
            "precision": used_precision,
            "compiled": compile,
            "data": str(data),
            "root": str(image_list.root.resolve()),  # the paths are relative to it (or absolute)
            "n_skipped": len(image_list.paths) - len(kept),
            "skipped_paths": json.dumps(_skipped_paths(image_list, kept)),  # (a JSON list: metadata are scalars)
        },
    )
    if output is not None:
        save_features(output, result.features, result.labels, result.paths, result.class_names, result.meta)
        logger.info("wrote %d features of dimension %d to %s", len(result), features.shape[1], output)
        if partial is not None:
            partial.remove()
    return result


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog="python -m dinov2.eval.extract_features",
        description="Extract the CLS features of a DinoBloom / DINOv2 backbone into a .h5 or .npz file.",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="hub entry (dinobloom_s/b/l/g, dinov2_vits14...); omit to infer the architecture from --weights",
    )
    parser.add_argument(
        "--weights",
        default=None,
        help="checkpoint path or URL (DinoBloom release, DINOv2 hub file, teacher_checkpoint.pth of a run); "
        "omit to download the released weights of --model",
    )
    parser.add_argument(
        "--data", required=True, help="image folder (<label>/.../<image>), .txt list or .csv (path,label)"
    )
    add_list_arguments(parser)
    parser.add_argument("--output", required=True, help="features file to write (.h5 or .npz)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--num-workers", type=non_negative_int, default=min(8, os.cpu_count() or 1),
                        help="image-loading processes (default: the CPU count, at most 8)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--img-size", type=positive_int, default=None,
                        help="images are resized to this square size (default: for a training run's "
                        "teacher_checkpoint.pth the size it trained at: its run's crops.global_crops_size or, copied "
                        "out of its run, the size its position-embedding grid implies; else 224)")
    parser.add_argument(
        "--resize", choices=EVAL_RESIZES, default="bilinear",
        help="bilinear (torchvision Resize, as DinoBloom's model-loading and fixed-split code; default) or pil-bicubic "
        "(PIL's resize, as the datasets of DinoBloom's cross-validation probes behind the paper's tables)",
    )
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="fp32 (DinoBloom's, default) or bf16 autocast on CUDA or a CPU (faster, features differ "
                        "slightly; on a CPU only where it computes bf16 natively, e.g. Xeons with AMX)")
    parser.add_argument("--compile", action="store_true",
                        help="run the backbone through torch.compile: a minute or less to compile, then faster "
                        "batches; pays back on a CPU from a few thousand images on (there it needs a C++ compiler)")
    return parser


def main(argv: Sequence[str] | None = None) -> FeatureSet:
    """Run the CLI; returns the feature set."""
    args = build_parser().parse_args(argv)
    setup_logging()
    result = extract_features(
        args.data,
        args.output,
        model=args.model,
        weights=args.weights,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        img_size=args.img_size,
        device=args.device,
        precision=args.precision,
        resize=args.resize,
        compile=args.compile,
        root=args.root,
        csv_columns=args.csv_columns,
    )
    skipped = int(result.meta["n_skipped"])
    print(f"wrote {len(result)} features (dim {result.features.shape[1]}) to {args.output}; "
          f"skipped {skipped} unreadable image{'' if skipped == 1 else 's'}")
    return result


if __name__ == "__main__":
    run_cli(main)
