"""Data: file-list dataset, demo generator, multi-crop augmentation, resumable sampler, loaders.

Masking (``dinov2.data.masking``), batch collation (``dinov2.data.collate``) and the demo generator
(``dinov2.data.demo``, also a ``python -m`` command) are imported from their own modules.
"""

from dinov2.data.augmentations import DataAugmentationDINO
from dinov2.data.datasets import (
    IMAGE_EXTENSIONS,
    DatasetError,
    FileListDataset,
    make_dataset,
    seeded_rng,
)
from dinov2.data.loaders import make_data_loader
from dinov2.data.samplers import InfiniteSampler, SampleKey, derive_seed
from dinov2.data.transforms import IMAGENET_MEAN, IMAGENET_STD, load_image, make_eval_transform

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "DataAugmentationDINO",
    "DatasetError",
    "FileListDataset",
    "InfiniteSampler",
    "SampleKey",
    "derive_seed",
    "load_image",
    "make_data_loader",
    "make_dataset",
    "make_eval_transform",
    "seeded_rng",
]
