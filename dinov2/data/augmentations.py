"""Multi-crop augmentation of DINOv2 and its hematology variant used by DinoBloom.

All random numbers come from torch's default CPU generator, so running the augmentation under a fixed
seed (as :class:`dinov2.data.datasets.FileListDataset` does per sample) makes it reproducible. A view comes out
as its uint8 crop (geometry done) and the parameters of its colour operations, which
:func:`dinov2.data.photometric.apply_photometric` applies to a whole batch, in the worker or on the GPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from dinov2.data.photometric import BLUR_SIGMA, FACTORS, GRAYSCALE, JITTER, ORDER, SOLARIZE, neutral_params

__all__ = ["TRAINED_BLUR_PROBABILITIES", "ColorJitter", "CropView", "DataAugmentationDINO"]

logger = logging.getLogger(__name__)

_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_BLUR_SIGMA = (0.1, 2.0)
# How often (global view 1, global view 2, local views) were blurred in training, by DINOv2 and DinoBloom alike
# (see DataAugmentationDINO).
TRAINED_BLUR_PROBABILITIES = (0.0, 0.9, 0.5)


def _coin(p: float) -> bool:
    """True with probability ``p``; always draws one number so the random stream does not depend on ``p``."""
    return bool(torch.rand(()) < p)


def _uniform(low: float, high: float) -> float:
    """One uniform draw in [low, high) from torch's generator."""
    return float(torch.empty(()).uniform_(low, high))


@dataclass(frozen=True)
class ColorJitter:
    """torchvision's ``ColorJitter(brightness, contrast, saturation, hue)``: its random factors and order.

    Same factor ranges and the same random order of the four operations; ``apply_photometric`` applies them
    with the same clamping after each, the hue step as the exact HSV rotation computed in RGB
    (``transforms.adjust_hue``), several times faster than torchvision's HSV round trip.
    """

    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1

    def draw(self, params: torch.Tensor) -> None:
        """Draw the four factors and the order of the operations into a view's ``params``."""
        params[JITTER] = 1.0
        params[FACTORS : FACTORS + 4] = torch.tensor([
            _uniform(1.0 - self.brightness, 1.0 + self.brightness),
            _uniform(1.0 - self.contrast, 1.0 + self.contrast),
            _uniform(1.0 - self.saturation, 1.0 + self.saturation),
            _uniform(-self.hue, self.hue),
        ])  # fmt: skip
        params[ORDER : ORDER + 4] = torch.randperm(4).to(torch.float32)


@dataclass(frozen=True)
class CropView:
    """One kind of view: random resized crop, flips/rotations, colour, blur and solarisation probabilities."""

    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float = 0.0
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    dihedral: bool = False

    def __call__(self, image: torch.Tensor, jitter: ColorJitter) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw one view of a uint8 (3, H, W) image: its uint8 (3, size, size) crop and its colour parameters."""
        top, left, height, width = RandomResizedCrop.get_params(image, list(self.scale), list(_RATIO))
        crop = _resized_crop(image, top, left, height, width, self.size)
        # The flips and the counter-clockwise quarter turn, in this order, as one flip of a (transposed) view.
        flipped = {-1} if _coin(0.5) else set()
        if self.dihedral:
            if _coin(0.5):
                flipped ^= {-2}
            if _coin(0.5):  # rot90(x) == x.transpose(-2, -1).flip(-2), and a transpose swaps the flipped axes
                crop = crop.transpose(-2, -1)
                flipped = {-3 - axis for axis in flipped} ^ {-2}
        crop = crop.contiguous()
        if flipped:
            crop = crop.flip(sorted(flipped))
        params = neutral_params()
        if _coin(self.color_jitter_p):
            jitter.draw(params)
        if _coin(self.grayscale_p):
            params[GRAYSCALE] = 1.0
        if _coin(self.blur_p):
            params[BLUR_SIGMA] = _uniform(*_BLUR_SIGMA)
        if _coin(self.solarize_p):
            params[SOLARIZE] = 1.0
        return crop, params


def _resized_crop(image: torch.Tensor, top: int, left: int, height: int, width: int, size: int) -> torch.Tensor:
    """torchvision's ``resized_crop`` of a uint8 (3, H, W) image to (3, size, size), bicubic and antialiased, to the
    bit; on a CPU (the data-loader workers) computed channels-last, where PyTorch's uint8 resampling kernel works (a
    third faster). Other devices have no uint8 kernel: torchvision resamples there in float."""
    if image.device.type != "cpu":
        return F.resized_crop(image, top, left, height, width, [size, size], interpolation=InterpolationMode.BICUBIC,
                              antialias=True)  # fmt: skip
    region = image[:, top : top + height, left : left + width].unsqueeze(0)
    region = region.contiguous(memory_format=torch.channels_last)
    crop = torch.nn.functional.interpolate(region, size=(size, size), mode="bicubic", antialias=True)
    return crop[0]


class DataAugmentationDINO:
    """DINOv2 multi-crop augmentation: two global views (student and teacher) and ``local_crops_number`` local ones.

    DINOv2's recipe (``hematology=False``): ``RandomResizedCrop`` (bicubic, antialiased, aspect ratio 3/4..4/3),
    horizontal flip p=0.5, ``ColorJitter(0.4, 0.4, 0.2, 0.1)`` p=0.8, grayscale p=0.2, Gaussian blur (kernel 9,
    sigma 0.1..2), solarisation (threshold 128) p=0.2 on the second global view only, ImageNet normalisation.

    Blur probabilities are those DINOv2's and DinoBloom's code trains with. DINOv2's ``GaussianBlur(p)`` hands
    ``1 - p`` to torchvision's ``RandomApply``, so a view written with p is blurred with probability 1 - p:
    "p=1.0, 0.1, 0.5" blurred the first global view never, the second with 0.9 and local views with 0.5.
    ``blur_probabilities`` (global view 1, global view 2, local views) sets other values, e.g. (1.0, 0.1, 0.5)
    for the paper's text.

    DinoBloom's recipe (``hematology=True``) is DINOv2's with the cells' symmetries added: vertical flip p=0.5
    and a 90 degree rotation p=0.5 after the horizontal flip (together a uniform draw from the 8 symmetries of
    the square); colour, blur and solarisation as DINOv2's. This is the ``DataAugmentationDINO`` of DinoBloom's
    final code (marrlab/DinoBloom at commit 6a12ca2e, the revision whose trainer reads ``data_transform``, and the
    forks made after the release), which its released config selects (``data_transform: "default"``). An earlier
    revision of that class (e.g. 5592a190) had no grayscale and no solarisation and wrote p=0.1 for both global
    views' blur (so blurred both with 0.9); which revision trained the released weights is not recorded. The
    experimental ``DataAugmentationHEMA`` (``data_transform: "hema"``) is not what the release config selects.

    The output dict is what ``collate_data_and_cast`` consumes: ``global_crops`` (2 uint8 tensors),
    ``local_crops`` (``local_crops_number`` uint8 tensors, possibly none), ``global_crops_params`` and
    ``local_crops_params`` (the views' colour parameters, see :mod:`dinov2.data.photometric`).
    """

    def __init__(
        self,
        global_crops_scale: tuple[float, float],
        local_crops_scale: tuple[float, float],
        local_crops_number: int,
        global_crops_size: int = 224,
        local_crops_size: int = 96,
        hematology: bool = True,
        blur_probabilities: tuple[float, float, float] | None = None,
    ) -> None:
        for name, scale in (("global_crops_scale", global_crops_scale), ("local_crops_scale", local_crops_scale)):
            low, high = (float(s) for s in scale)
            if not 0.0 < low <= high <= 1.0:
                raise ValueError(f"{name} must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
        if local_crops_number < 0:
            raise ValueError(f"local_crops_number must be >= 0, got {local_crops_number}")
        if blur_probabilities is None:
            blur_probabilities = TRAINED_BLUR_PROBABILITIES
        blur = [float(b) for b in blur_probabilities]
        if len(blur) != 3 or not all(0.0 <= b <= 1.0 for b in blur):
            raise ValueError(
                "blur_probabilities must be 3 probabilities (global view 1, global view 2, local), "
                f"got {blur_probabilities}"
            )
        blur1, blur2, blur_local = blur
        self.blur_probabilities = (blur1, blur2, blur_local)
        self.local_crops_number = int(local_crops_number)
        self.hematology = hematology
        self.jitter = ColorJitter(0.4, 0.4, 0.2, 0.1)
        common: dict[str, Any] = {"grayscale_p": 0.2, "dihedral": hematology}
        global_scale = (float(global_crops_scale[0]), float(global_crops_scale[1]))
        self.global_view1 = CropView(global_crops_size, global_scale, blur_p=blur1, **common)
        self.global_view2 = CropView(global_crops_size, global_scale, blur_p=blur2, solarize_p=0.2, **common)
        local_scale = (float(local_crops_scale[0]), float(local_crops_scale[1]))
        self.local_view = CropView(local_crops_size, local_scale, blur_p=blur_local, **common)
        logger.info(
            "augmentation: %s recipe, global %d px scale %s, %d local crops %d px scale %s, blur p %s",
            "hematology (DinoBloom)" if hematology else "DINOv2",
            global_crops_size,
            global_scale,
            self.local_crops_number,
            local_crops_size,
            local_scale,
            tuple(blur),
        )

    def record(self) -> dict[str, Any]:
        """The recipe and each view's probabilities (global 1, global 2, local), as checkpoints record them."""
        views = (self.global_view1, self.global_view2, self.local_view)
        return {
            "recipe": "hematology" if self.hematology else "dinov2",
            "dihedral": self.hematology,
            "grayscale": [view.grayscale_p for view in views],
            "blur": list(self.blur_probabilities),
            "solarize": [view.solarize_p for view in views],
        }

    def __call__(self, image: Image.Image | torch.Tensor) -> dict[str, Any]:
        """Draw all views of one PIL image or uint8 (3, H, W) tensor."""
        pixels = F.pil_to_tensor(image) if isinstance(image, Image.Image) else image
        if pixels.dtype != torch.uint8 or pixels.ndim != 3 or pixels.shape[0] != 3:
            raise TypeError(
                f"expected an RGB PIL image or a uint8 (3, H, W) tensor, got {pixels.dtype} {tuple(pixels.shape)}"
            )
        global1, params1 = self.global_view1(pixels, self.jitter)
        global2, params2 = self.global_view2(pixels, self.jitter)
        local = [self.local_view(pixels, self.jitter) for _ in range(self.local_crops_number)]
        return {
            "global_crops": [global1, global2],
            "global_crops_params": [params1, params2],
            "local_crops": [crop for crop, _ in local],
            "local_crops_params": [params for _, params in local],
        }

    def __repr__(self) -> str:
        recipe = "hematology" if self.hematology else "dinov2"
        return (
            f"DataAugmentationDINO({recipe}, global {self.global_view1.size}px {self.global_view1.scale}, "
            f"{self.local_crops_number} x local {self.local_view.size}px {self.local_view.scale})"
        )
