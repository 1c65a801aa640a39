"""iBOT loss on masked patch tokens: teacher centering and a per-crop weighted cross-entropy."""

from __future__ import annotations

import torch

from dinov2.loss.centering import TeacherCentering
from dinov2.loss.cross_entropy import SoftCrossEntropy

__all__ = ["iBOTPatchLoss"]


class iBOTPatchLoss(TeacherCentering):  # noqa: N801 (DINOv2's public name)
    """Masked-image-modelling loss of iBOT on the prototype scores of masked patch tokens."""

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__((1, 1, patch_out_dim), center_momentum)
        self.student_temp = student_temp
        self.cross_entropy = SoftCrossEntropy()

    def forward_masked(
        self,
        student_patch_tokens_masked: torch.Tensor,
        teacher_patch_tokens_masked: torch.Tensor,
        student_masks_flat: torch.Tensor,
        masks_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean over crops of each crop's mean cross-entropy over its masked tokens.

        Rows are the masked tokens in ``student_masks_flat`` (n_crops, N) order; ``masks_weight`` holds
        ``1 / #masked(crop)`` per masked token and is derived from the masks when None. Crops without masked
        tokens count in the mean with a zero loss.
        """
        loss = self.cross_entropy(student_patch_tokens_masked, teacher_patch_tokens_masked, self.student_temp)
        if masks_weight is None:
            counts = student_masks_flat.sum(dim=-1, dtype=torch.float32).clamp(min=1.0)
            masks_weight = (1.0 / counts).unsqueeze(-1).expand_as(student_masks_flat)[student_masks_flat]
        if loss.shape[0] != masks_weight.shape[0]:
            raise ValueError(
                f"iBOT forward_masked: {loss.shape[0]} masked-token rows but {masks_weight.shape[0]} mask weights"
            )
        # (0 - x, not -x: with no masked token the loss is 0, not the -0.0 that logs would show)
        return 0.0 - (loss * masks_weight).sum() / student_masks_flat.shape[0]
