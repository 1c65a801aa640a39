"""The training input pipeline: dataset, multi-crop augmentation, seeded masks and the resumable loader."""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from dinov2.configs import ConfigError
from dinov2.data.augmentations import DataAugmentationDINO
from dinov2.data.collate import collate_data_and_cast
from dinov2.data.datasets import FileListDataset, absolute_dataset_string, make_dataset
from dinov2.data.loaders import make_data_loader
from dinov2.data.masking import MaskingGenerator
from dinov2.data.samplers import InfiniteSampler, SampleKey, derive_seed

logger = logging.getLogger(__name__)


def effective_local_crops(cfg: DictConfig) -> int:
    """Local crops that are drawn and enter the loss.

    DinoBloom's release set ``crops.local_crops_number: 1`` and only computed the local DINO term for more
    than one local crop, so its single local crop never reached the loss: here 0 and 1 both mean no local
    crops (1 keeps DinoBloom's normalisation of the global term, see ``dino_loss_term_scales``).
    """
    n = int(cfg.crops.local_crops_number)
    return n if n > 1 else 0


class KeyedSamples(Dataset):
    """Pass the sampler's key through with each sample, so the collate can seed the batch's masks."""

    def __init__(self, dataset: FileListDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: SampleKey) -> tuple[Any, SampleKey]:
        return self.dataset[key], key


@dataclass
class TrainCollate:
    """Drop unreadable images, stack the crops and draw the iBOT masks from a per-batch seed.

    A batch carries its counts, ``n_images`` and ``n_bad_images``. When none of its images can be read, the first
    readable of the images that follow its first draw in the data set (same epoch, up to ``MAX_SUBSTITUTES`` tried)
    stands in for the batch, so that a run whose batch is all bad (one image per rank, say) trains on, and resumes,
    past it; only the batch's own images are counted (the others are, when they are drawn). A batch without a
    stand-in carries only its counts, and ``n_tried``, the images tried in its stead.
    """

    MAX_SUBSTITUTES = 100

    mask_generator: MaskingGenerator
    mask_ratio_tuple: tuple[float, float]
    mask_probability: float
    seed: int
    dtype: torch.dtype = torch.float32  # of the crops: the run's compute dtype
    defer_colour: bool = False  # leave the colour operations to the device (dinov2.data.photometric.finish_crops)
    substitutes: KeyedSamples | None = None  # where a batch without a readable image finds a stand-in

    def __call__(self, items: list[tuple[Any, SampleKey]]) -> dict[str, Any]:
        samples = [sample for sample, _ in items if sample is not None]
        first = items[0][1]
        n_bad = len(items) - len(samples)
        tried = 0
        if not samples and self.substitutes is not None:
            size = len(self.substitutes)
            for tried in range(1, min(size, self.MAX_SUBSTITUTES + 1)):
                sample, key = self.substitutes[SampleKey((first.index + tried) % size, first.epoch)]
                if sample is not None:
                    logger.warning("none of the %d images of a batch could be read: image %d stands in for them",
                                   len(items), key.index)  # fmt: skip
                    samples = [sample]
                    break
        if not samples:  # the trainer stops on such a batch, from its own process (a worker's error would be wrapped)
            return {"n_images": len(items), "n_bad_images": n_bad, "n_tried": tried}
        # The batch's first draw is unique within a run, so the masks depend only on (seed, batch). Its seed is also
        # the one `random` gets for that sample's augmentation, which draws from torch only: an augmentation that
        # drew from `random` would repeat the masks' numbers.
        rng = random.Random(derive_seed(self.seed, first.index, first.epoch))
        batch = collate_data_and_cast(
            samples,
            mask_ratio_tuple=self.mask_ratio_tuple,
            mask_probability=self.mask_probability,
            dtype=self.dtype,
            mask_generator=self.mask_generator,
            rng=rng,
            defer_colour=self.defer_colour,
        )
        batch["n_images"] = len(items)
        batch["n_bad_images"] = n_bad
        return batch


def anchor_data_paths(cfg: DictConfig) -> None:
    """Make ``train.dataset_path`` and ``evaluation.knn_data`` absolute in ``cfg`` (a relative path is taken from the
    current folder), so that config.yaml records the data the run reads, and a resume from another folder, where the
    same relative path names other data, says so among the settings that changed."""
    if cfg.train.dataset_path:
        cfg.train.dataset_path = absolute_dataset_string(str(cfg.train.dataset_path))
    if cfg.evaluation.knn_data:
        cfg.evaluation.knn_data = os.path.abspath(os.path.expanduser(str(cfg.evaluation.knn_data)))


def build_train_dataset(cfg: DictConfig) -> FileListDataset:
    """The training images of ``train.dataset_path`` with the configured multi-crop augmentation.

    ``train.image_resize`` > 0 resizes every image to that square size before the augmentation (DinoBloom: 224);
    0 keeps the images as they are, except that DinoBloom's spelling ``HemaStandardDataset:root=...`` resizes to 224
    unless it says ``:resize=none``. Raises before any model is built when the path is missing, a list is empty or
    no image is found.
    """
    if not cfg.train.dataset_path:
        raise ConfigError("train.dataset_path is empty: name a folder of .txt image lists (or one .txt list)")
    if cfg.crops.local_crops_number == 1:
        logger.info(
            "crops.local_crops_number=1 is DinoBloom's setting for 'no local crops': none are drawn and the global "
            "DINO term keeps DinoBloom's 2/(2+2) scale; use 0 for DINOv2's 2/3 or > 1 for multi-crop"
        )
    augmentation = DataAugmentationDINO(
        global_crops_scale=tuple(cfg.crops.global_crops_scale),
        local_crops_scale=tuple(cfg.crops.local_crops_scale),
        local_crops_number=effective_local_crops(cfg),
        global_crops_size=cfg.crops.global_crops_size,
        local_crops_size=cfg.crops.local_crops_size,
        hematology=cfg.train.augmentation == "hematology",
        blur_probabilities=cfg.crops.blur_probabilities,
    )
    resize = int(cfg.train.image_resize) or None
    dataset = make_dataset(str(cfg.train.dataset_path), transform=augmentation, resize=resize, seed=cfg.train.seed)
    if dataset.resize:  # (also DinoBloom's HemaStandardDataset spelling, which resizes unless told otherwise)
        logger.info("images are resized to %d x %d px (Lanczos) before the augmentation", dataset.resize,
                    dataset.resize)
    return dataset


def build_train_loader(
    cfg: DictConfig,
    dataset: FileListDataset,
    *,
    start: int,
    rank: int,
    world_size: int,
    dtype: torch.dtype = torch.float32,
    defer_colour: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """An endless loader for this rank that starts at global draw ``start`` (a resumed run's position).

    Crops come as ``dtype``, the run's compute dtype (``autocast_dtype``): bf16 or fp16 halve what workers hand
    over and what is copied to the GPU, and the first layer gets the same input as from float32 under autocast.
    With ``defer_colour`` they come as uint8 with the parameters of their colour operations, which
    :func:`dinov2.data.photometric.finish_crops` applies on the device. ``pin_memory`` for a run on a CUDA device.
    """
    batch_size = int(cfg.train.batch_size_per_gpu)
    sampler = InfiniteSampler(
        len(dataset), shuffle=True, seed=cfg.train.seed, start=start, rank=rank, world_size=world_size,
        batch_size=batch_size,
    )
    keyed = KeyedSamples(dataset)
    return make_data_loader(
        keyed,
        batch_size=batch_size,
        num_workers=int(cfg.train.num_workers),
        sampler=sampler,
        collate_fn=build_train_collate(cfg, dtype, defer_colour, substitutes=keyed),
        seed=derive_seed(cfg.train.seed, rank),
        timeout_s=float(cfg.train.data_timeout_s),
        pin_memory=pin_memory,
    )


def build_train_collate(
    cfg: DictConfig, dtype: torch.dtype = torch.float32, defer_colour: bool = False,
    substitutes: KeyedSamples | None = None,
) -> TrainCollate:
    """The loader's collate: crops stacked as ``dtype`` (uint8 with ``defer_colour``), iBOT masks as configured,
    a stand-in from ``substitutes`` for a batch without a readable image (see :class:`TrainCollate`)."""
    return TrainCollate(
        mask_generator=MaskingGenerator.for_global_crops(cfg.crops.global_crops_size, cfg.student.patch_size),
        mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
        mask_probability=float(cfg.ibot.mask_sample_probability),
        seed=int(cfg.train.seed),
        dtype=dtype,
        defer_colour=defer_colour,
        substitutes=substitutes,
    )
