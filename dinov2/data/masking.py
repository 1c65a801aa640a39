"""Block-wise random patch masking of BEiT / iBOT / DINOv2."""

from __future__ import annotations

import math
import random
from types import ModuleType

import numpy as np

__all__ = ["MaskingGenerator"]

# Python's module-level random functions, or a dedicated generator with the same methods.
RandomSource = random.Random | ModuleType


class MaskingGenerator:
    """Draws boolean (H, W) patch masks made of random rectangles until a target count is reached.

    Random numbers come from Python's module-level ``random`` unless a ``random.Random`` is passed to
    ``__call__``; the sequence of draws is that of the DINOv2 algorithm, so with ``random.seed(s)`` the
    masks equal the reference ones.
    """

    def __init__(
        self,
        input_size: int | tuple[int, int],
        num_masking_patches: int | None = None,
        min_num_patches: int = 4,
        max_num_patches: float | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        self.height, self.width = (int(s) for s in input_size)
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"MaskingGenerator input_size must be positive, got {input_size}")
        self.num_patches = self.height * self.width
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        if self.max_num_patches is None:
            raise ValueError("MaskingGenerator needs max_num_patches (or num_masking_patches) to bound one block")
        if min_aspect <= 0:
            raise ValueError(f"MaskingGenerator min_aspect must be > 0, got {min_aspect}")
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    @classmethod
    def for_global_crops(cls, crop_size: int, patch_size: int) -> MaskingGenerator:
        """The trainer's generator for square global crops: a (crop // patch)^2 grid, blocks of up to half of it.

        The bound is DINOv2's expression ``0.5 * crop // patch * crop // patch`` (floor divisions from the left):
        128 for 224 / 14, but 105 rather than 112.5 for an odd grid such as 210 / 14.
        """
        grid = crop_size // patch_size
        return cls(input_size=(grid, grid), max_num_patches=0.5 * crop_size // patch_size * crop_size // patch_size)

    def __repr__(self) -> str:
        return (
            f"MaskingGenerator({self.height}x{self.width}, block patches {self.min_num_patches}"
            f"..{self.max_num_patches}, log aspect {self.log_aspect_ratio[0]:.3f}..{self.log_aspect_ratio[1]:.3f})"
        )

    def get_shape(self) -> tuple[int, int]:
        """The (H, W) patch grid."""
        return self.height, self.width

    def _add_block(self, mask: np.ndarray, max_mask_patches: float, rng: RandomSource) -> int:
        """Try up to 10 random rectangles; mask the first that adds 1..max_mask_patches new patches."""
        for _ in range(10):
            target_area = rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w >= self.width or h >= self.height:
                continue
            top = rng.randint(0, self.height - h)
            left = rng.randint(0, self.width - w)
            block = mask[top : top + h, left : left + w]
            n_new = h * w - int(block.sum())
            if 0 < n_new <= max_mask_patches:
                block[...] = True
                return n_new
        return 0

    def __call__(self, num_masking_patches: int = 0, rng: random.Random | None = None) -> np.ndarray:
        """A bool (H, W) mask with about ``num_masking_patches`` True entries (fewer if blocks stop fitting)."""
        source: RandomSource = random if rng is None else rng
        mask = np.zeros(self.get_shape(), dtype=bool)
        mask_count = 0
        while mask_count < num_masking_patches:
            max_mask_patches = min(num_masking_patches - mask_count, self.max_num_patches)
            delta = self._add_block(mask, max_mask_patches, source)
            if delta == 0:
                break
            mask_count += delta
        return mask
