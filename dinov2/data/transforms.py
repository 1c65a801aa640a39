"""Image loading, the evaluation transform and the tensor primitives the augmentations are built from.

Every primitive here works on ``(3, H, W)`` tensors with element-wise operations only (no BLAS, no
convolution kernels, no multi-threaded float reductions), so its result is bitwise the same whatever the
number of intra-op threads: in the main process (several threads) and in a DataLoader worker (one thread).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "gaussian_blur",
    "load_image",
    "make_eval_transform",
    "normalize_",
    "rgb_to_grayscale",
    "to_float_tensor",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)
# ITU-R 601-2 luma, the weights torchvision and PIL use for grayscale.
_LUMA = (0.2989, 0.587, 0.114)
_TINY = torch.finfo(torch.float32).tiny
# PIL's modes of 16-bit (and 32-bit integer) grayscale, which convert("RGB") clips at 255 instead of scaling.
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def load_image(path: str | Path, resize: int | None = None) -> Image.Image:
    """Decode an image file to RGB, optionally resized to ``resize`` x ``resize`` with Lanczos (as DinoBloom).

    16-bit grayscale (microscopy PNG and TIFF) is scaled to 8 bits (``round(value * 255 / 65535)``, values
    outside 0..65535 clipped); a floating-point image raises ``ValueError``, as its range is unknown.
    """
    with Image.open(path) as image:
        if image.mode in _SIXTEEN_BIT_MODES:
            values = np.clip(np.asarray(image), 0, 65535).astype(np.float32)
            image = Image.fromarray(np.rint(values * 255 / 65535).astype(np.uint8))
        elif image.mode == "F":
            raise ValueError(
                f"{path}: floating-point images (PIL mode F) are not supported; save the image as 8- or 16-bit integers"
            )
        rgb = image.convert("RGB")
    if resize is not None and rgb.size != (resize, resize):
        rgb = rgb.resize((resize, resize), Image.Resampling.LANCZOS)
    return rgb


def to_float_tensor(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """PIL image or uint8 (3, H, W) tensor to float32 in [0, 1], dividing by 255 exactly as ``ToTensor``."""
    if isinstance(image, Image.Image):
        image = F.pil_to_tensor(image)
    if image.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 image tensor, got {image.dtype}")
    return image.to(torch.float32).div_(255.0)


def normalize_(x: torch.Tensor) -> torch.Tensor:
    """Normalise a float (3, H, W) image in place with the ImageNet mean and standard deviation."""
    return x.sub_(_MEAN).div_(_STD)


def make_eval_transform(size: int = 224) -> Callable[[Image.Image], torch.Tensor]:
    """DinoBloom's evaluation preprocessing: ``Resize((size, size))`` (bilinear), ``ToTensor``, ImageNet norm."""
    return v2.Compose(
        [
            v2.Resize((size, size), interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
            v2.Lambda(to_float_tensor),
            v2.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ]
    )


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma of a float (3, H, W) image, shape (1, H, W)."""
    return (x[0:1] * _LUMA[0]).add_(x[1:2], alpha=_LUMA[1]).add_(x[2:3], alpha=_LUMA[2])


def _blend_(x: torch.Tensor, other: torch.Tensor | float, factor: float) -> torch.Tensor:
    """``factor * x + (1 - factor) * other`` clamped to [0, 1], in place (torchvision's blend)."""
    x.mul_(factor)
    if isinstance(other, float):
        x.add_(other * (1.0 - factor))
    else:
        x.add_(other.mul(1.0 - factor))
    return x.clamp_(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Scale intensities by ``factor`` and clamp, in place."""
    return x.mul_(factor).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with the mean luma, in place.

    The mean is accumulated in float64, where the sum of the float32 luma values is (nearly always) exact,
    so it does not depend on how many threads split the reduction.
    """
    mean = float(rgb_to_grayscale(x).to(torch.float64).mean())
    return _blend_(x, float(torch.tensor(mean, dtype=torch.float32)), factor)


def adjust_saturation(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with the grayscale image, in place."""
    return _blend_(x, rgb_to_grayscale(x), factor)


def adjust_hue(x: torch.Tensor, shift: float) -> torch.Tensor:
    """Rotate the HSV hue by ``shift`` (fraction of a turn, in [-0.5, 0.5]); returns a new tensor.

    Same result as HSV conversion, shift and back conversion, computed without leaving RGB: value (max)
    and chroma (max - min) are unchanged by a hue rotation, and each channel is
    ``max - chroma * clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + 6 h) mod 6`` for n = 5, 3, 1, where
    ``clamp(min(k, 4 - k), 0, 1)`` is ``clamp(2 - d, 0, 1)`` with ``d`` the distance of ``k - 2`` to the
    nearest multiple of 6. Written with float arithmetic only (no boolean masks, no ``remainder``) and
    mostly in place: this is the costliest step of the augmentation, and both are several times slower.
    """
    r, g, b = x[0], x[1], x[2]
    maxc = torch.maximum(r, g)
    torch.maximum(maxc, b, out=maxc)
    chroma = torch.minimum(r, g)
    torch.minimum(chroma, b, out=chroma)
    chroma.neg_().add_(maxc)
    # Which channel holds the maximum, as 0/1 floats, with torchvision's priority red > green > blue.
    not_r = torch.sub(maxc, r).sign_()
    not_g = torch.sub(maxc, g).sign_()
    is_b = not_r * not_g
    is_g = not_r.sub_(is_b)
    is_r = not_g.fill_(1.0).sub_(is_g).sub_(is_b)
    # Hue in sixths of a turn, in [-1, 5]; grey pixels (chroma 0) get 0, and their output is max anyway.
    hue6 = torch.sub(g, b).mul_(is_r)
    hue6.addcmul_(torch.sub(b, r), is_g).addcmul_(torch.sub(r, g), is_b).div_(chroma.clamp_min(_TINY))
    hue6.add_(is_g, alpha=2.0).add_(is_b, alpha=4.0)
    out = torch.empty_like(x)
    ramp = torch.empty_like(r)
    periods = torch.empty_like(r)
    for channel, n in enumerate((5.0, 3.0, 1.0)):
        torch.add(hue6, 6.0 * shift + n - 2.0, out=ramp)
        torch.mul(ramp, 1.0 / 6.0, out=periods).round_()
        ramp.sub_(periods, alpha=6.0).abs_().neg_().add_(2.0).clamp_(0.0, 1.0)
        torch.sub(maxc, ramp.mul_(chroma), out=out[channel])
    return out


def _gaussian_kernel1d(kernel_size: int, sigma: float) -> list[float]:
    """Normalised 1-D Gaussian weights on the integer offsets -(k//2) .. k//2."""
    half = kernel_size // 2
    weights = torch.exp(-0.5 * (torch.arange(-half, half + 1, dtype=torch.float64) / sigma) ** 2)
    return (weights / weights.sum()).tolist()


def gaussian_blur(x: torch.Tensor, sigma: float, kernel_size: int = 9) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding (torchvision's kernel), as sums of shifted slices."""
    if kernel_size % 2 != 1 or kernel_size <= 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    half = kernel_size // 2
    weights = _gaussian_kernel1d(kernel_size, sigma)
    height, width = x.shape[-2:]
    padded = torch.nn.functional.pad(x.unsqueeze(0), (half, half, half, half), mode="reflect").squeeze(0)
    rows = padded[:, :, 0:width] * weights[0]
    for k in range(1, kernel_size):
        rows.add_(padded[:, :, k : k + width], alpha=weights[k])
    out = rows[:, 0:height] * weights[0]
    for k in range(1, kernel_size):
        out.add_(rows[:, k : k + height], alpha=weights[k])
    return out
