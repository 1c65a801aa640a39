"""Image loading, the evaluation transform and the tensor primitives the augmentations are built from.

Every colour primitive here works on one ``(3, H, W)`` image or a batch ``(N, 3, H, W)``, with a factor that
is a number or, for a batch, one value per image (shape ``(N, 1, 1, 1)``; ``(N,)`` for the blur's sigma), on any
device. They use element-wise operations only (no BLAS, no convolution kernels; the one reduction, the contrast's
mean, runs in float64), so a result is bitwise the same whatever the number of intra-op threads.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = [
    "EVAL_RESIZES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "as_rgb",
    "gaussian_blur",
    "gaussian_kernel1d",
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
Factor = Union[float, torch.Tensor]  # a number, or one value per image of a batch
# ITU-R 601-2 luma, the weights torchvision and PIL use for grayscale.
_LUMA = (0.2989, 0.587, 0.114)
_TINY = torch.finfo(torch.float32).tiny
# PIL's modes of 16-bit (and 32-bit integer) grayscale, which convert("RGB") clips at 255 instead of scaling.
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


#: What :func:`load_image` raises for a missing, unreadable, truncated, oversized or floating-point image file.
IMAGE_LOAD_ERRORS: tuple[type[Exception], ...] = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def load_image(path: str | Path, resize: int | None = None) -> Image.Image:
    """Decode an image file to RGB, optionally resized to ``resize`` x ``resize`` with Lanczos (as DinoBloom's
    training data were). For features as ``extract_features`` and the README compute them, leave ``resize`` None
    and pass the image to :func:`make_eval_transform`, which resizes bilinearly as DinoBloom's evaluation code did.

    16-bit grayscale (microscopy PNG and TIFF) is scaled to 8 bits (``round(value * 255 / 65535)``, values
    outside 0..65535 clipped); a floating-point image raises ``ValueError``, as its range is unknown.
    """
    with Image.open(path) as image:
        rgb = as_rgb(image, str(path))
    if resize is not None and rgb.size != (resize, resize):
        rgb = rgb.resize((resize, resize), Image.Resampling.LANCZOS)
    return rgb


def as_rgb(image: Image.Image, source: str = "image") -> Image.Image:
    """A loaded 8-bit RGB copy of ``image``: grayscale repeated, alpha dropped, 16-bit grayscale scaled (see
    :func:`load_image`).

    ``source`` names the image in the error for a floating-point one.
    """
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(image), 0, 65535).astype(np.float32)
        image = Image.fromarray(np.rint(values * 255 / 65535).astype(np.uint8))
    elif image.mode == "F":
        raise ValueError(
            f"{source}: floating-point images (PIL mode F) are not supported; save the image as 8- or 16-bit integers"
        )
    return image.convert("RGB")


def _checked_rgb(image: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
    """A PIL image made RGB (:func:`as_rgb`), or a uint8 (3, H, W) tensor (or a batch of them) as it is; anything
    else is refused with what to pass instead."""
    if isinstance(image, Image.Image):
        return as_rgb(image)
    if not isinstance(image, torch.Tensor):
        hint = " (Image.fromarray(array) makes a PIL image of it)" if isinstance(image, np.ndarray) else ""
        raise TypeError(f"expected a PIL image or a uint8 (3, H, W) tensor, got a {type(image).__name__}{hint}")
    if image.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 image tensor, got {image.dtype}")
    if image.ndim < 3 or image.shape[-3] != 3:
        hint = "; channels last: image.permute(2, 0, 1)" if image.ndim == 3 and image.shape[-1] == 3 else ""
        raise ValueError(f"expected a uint8 (3, H, W) image tensor (or a batch of them), got shape "
                         f"{tuple(image.shape)}{hint}")  # fmt: skip
    return image


def to_float_tensor(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """PIL image or uint8 (..., 3, H, W) tensor to float32 in [0, 1], dividing by 255 exactly as ``ToTensor``."""
    if isinstance(image, Image.Image):
        image = F.pil_to_tensor(image)
    return _checked_rgb(image).to(torch.float32).div_(255.0)


def normalize_(x: torch.Tensor) -> torch.Tensor:
    """Normalise float (..., 3, H, W) images in place with the ImageNet mean and standard deviation."""
    return x.sub_(_MEAN.to(x.device)).div_(_STD.to(x.device))


#: How evaluation resizes an image (``make_eval_transform``): the two ways DinoBloom's evaluation code did.
EVAL_RESIZES = ("bilinear", "pil-bicubic")


def _pil_bicubic_resize(image: Image.Image | torch.Tensor, size: int) -> Image.Image | torch.Tensor:
    """``PIL.Image.resize((size, size))`` with its default (bicubic) filter, as DinoBloom's probe datasets; a batch
    of uint8 (..., 3, H, W) images is resized image by image into a uint8 batch."""
    if isinstance(image, torch.Tensor):
        if image.ndim > 3:
            flat = image.reshape(-1, *image.shape[-3:])
            resized = [F.pil_to_tensor(_pil_bicubic_resize(one, size)) for one in flat]
            return torch.stack(resized).reshape(*image.shape[:-2], size, size)
        image = F.to_pil_image(image)
    return image.resize((size, size), Image.Resampling.BICUBIC)


def make_eval_transform(
    size: int = 224, resize: str = "bilinear"
) -> Callable[[Image.Image | torch.Tensor], torch.Tensor]:
    """DinoBloom's evaluation preprocessing: a resize to ``size`` x ``size``, ``ToTensor``, ImageNet norm.

    ``resize="bilinear"``: torchvision's ``Resize((size, size))`` (antialiased), as DinoBloom's model-loading and
    fixed-split code, which the reference features follow. ``"pil-bicubic"``: PIL's ``resize`` with its default
    bicubic filter, as the datasets of DinoBloom's cross-validation probes (the paper's tables); the two differ by
    about 0.01 on average in normalised pixel values. A PIL image in another mode than RGB (RGBA, grayscale,
    16-bit) is first made RGB as :func:`load_image` does; a tensor must already be a uint8 (3, H, W) image or a
    batch of them.
    """
    if resize not in EVAL_RESIZES:
        raise ValueError(f"resize must be one of {', '.join(EVAL_RESIZES)}, got {resize!r}")
    if resize == "bilinear":
        resizing = v2.Resize((size, size), interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
    else:
        resizing = v2.Lambda(functools.partial(_pil_bicubic_resize, size=size))
    return v2.Compose(
        [
            v2.Lambda(_checked_rgb),
            resizing,
            v2.Lambda(to_float_tensor),
            v2.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ]
    )


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma of float (..., 3, H, W) images, shape (..., 1, H, W)."""
    r, g, b = x[..., 0:1, :, :], x[..., 1:2, :, :], x[..., 2:3, :, :]
    return (r * _LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2])


def _blend_(x: torch.Tensor, other: torch.Tensor | float, factor: Factor) -> torch.Tensor:
    """``factor * x + (1 - factor) * other`` clamped to [0, 1], in place (torchvision's blend)."""
    x.mul_(factor)
    if isinstance(other, float) and isinstance(factor, float):
        x.add_(other * (1.0 - factor))
    else:
        x.add_(torch.mul(other, 1.0 - factor))
    return x.clamp_(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, factor: Factor) -> torch.Tensor:
    """Scale intensities by ``factor`` and clamp, in place."""
    return x.mul_(factor).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: Factor) -> torch.Tensor:
    """Blend each image with its mean luma, in place.

    The mean is accumulated in float64 (float32 on MPS, which has no float64), where the sum of the float32 luma
    values is (nearly always) exact, so it does not depend on how many threads split the reduction.
    """
    wide = torch.float32 if x.device.type == "mps" else torch.float64
    mean = rgb_to_grayscale(x).to(wide).mean(dim=(-3, -2, -1), keepdim=True).to(torch.float32)
    return _blend_(x, mean, factor)


def adjust_saturation(x: torch.Tensor, factor: Factor) -> torch.Tensor:
    """Blend with the grayscale image, in place."""
    return _blend_(x, rgb_to_grayscale(x), factor)


def adjust_hue(x: torch.Tensor, shift: Factor) -> torch.Tensor:
    """Rotate the HSV hue by ``shift`` (fraction of a turn, in [-0.5, 0.5]; per image: shape (N, 1, 1, 1));
    returns a new tensor.

    Same result as HSV conversion, shift and back conversion, computed without leaving RGB: value (max)
    and chroma (max - min) are unchanged by a hue rotation, and each channel is
    ``max - chroma * clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + 6 h) mod 6`` for n = 5, 3, 1, where
    ``clamp(min(k, 4 - k), 0, 1)`` is ``clamp(2 - d, 0, 1)`` with ``d`` the distance of ``k - 2`` to the
    nearest multiple of 6. Written with float arithmetic only (no boolean masks, no ``remainder``) and
    mostly in place: this is the costliest step of the augmentation, and both are several times slower.
    """
    r, g, b = x[..., 0, :, :], x[..., 1, :, :], x[..., 2, :, :]
    if isinstance(shift, torch.Tensor):
        shift = shift.reshape(-1, 1, 1)  # per image, against (N, H, W) channel planes
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
        torch.sub(maxc, ramp.mul_(chroma), out=out[..., channel, :, :])
    return out


def gaussian_kernel1d(kernel_size: int, sigma: Factor) -> torch.Tensor:
    """Normalised 1-D Gaussian weights on the integer offsets -(k//2) .. k//2, float32, one row per sigma."""
    half = kernel_size // 2
    sigmas = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
    weights = torch.exp(-0.5 * (torch.arange(-half, half + 1, dtype=torch.float64, device=sigmas.device) / sigmas) ** 2)
    return (weights / weights.sum(dim=1, keepdim=True)).to(torch.float32)


def gaussian_blur(x: torch.Tensor, sigma: Factor, kernel_size: int = 9) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding (torchvision's kernel), as sums of shifted slices.

    ``sigma``: a number, or one per image of a batch (shape (N,)).
    """
    if kernel_size % 2 != 1 or kernel_size <= 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    half = kernel_size // 2
    batched = x.dim() == 4
    images = x if batched else x.unsqueeze(0)
    weights = gaussian_kernel1d(kernel_size, sigma).to(x.device)
    weights = weights.expand(images.shape[0], -1).T.reshape(kernel_size, -1, 1, 1, 1)  # weights[k]: (N, 1, 1, 1)
    height, width = x.shape[-2:]
    padded = torch.nn.functional.pad(images, (half, half, half, half), mode="reflect")
    rows = padded[..., 0:width] * weights[0]
    for k in range(1, kernel_size):
        rows.addcmul_(padded[..., k : k + width], weights[k])
    out = rows[..., 0:height, :] * weights[0]
    for k in range(1, kernel_size):
        out.addcmul_(rows[..., k : k + height, :], weights[k])
    return out if batched else out.squeeze(0)
