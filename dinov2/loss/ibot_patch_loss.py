"""iBOT loss on masked patch tokens: teacher centering and a per-crop weighted cross-entropy."""

from __future__ import annotations

import torch
import torch.distributed as dist

from dinov2.loss.centering import SoftmaxCentering, _dist_ready
from dinov2.loss.cross_entropy import SoftCrossEntropy
from dinov2.loss.dino_clstoken_loss import compiled_sinkhorn_knopp_pays, sinkhorn_knopp

__all__ = ["iBOTPatchLoss"]


class iBOTPatchLoss(SoftmaxCentering):  # noqa: N801 (DINOv2's public name)
    """Masked-image-modelling loss of iBOT on the prototype scores of masked patch tokens."""

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__((1, 1, patch_out_dim), center_momentum)
        self.student_temp = student_temp
        self.cross_entropy = SoftCrossEntropy()
        self.compile_sinkhorn_knopp = False  # train.compile: where it pays, see sinkhorn_knopp

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self,
        teacher_output: torch.Tensor,
        teacher_temp: float,
        n_masked_patches_tensor: torch.Tensor,
        n_iterations: int = 3,
    ) -> torch.Tensor:
        """Sinkhorn-Knopp targets for (M, K) masked-token logits; M is summed over processes.

        Unlike the reference, the all-reduce works on a copy (on the logits' device), so the caller's
        ``n_masked_patches_tensor`` keeps its local value, and it is skipped when no process group is initialised.
        """
        n_samples = n_masked_patches_tensor.detach().to(teacher_output.device, copy=True)
        if _dist_ready():
            dist.all_reduce(n_samples)
        compiled = self.compile_sinkhorn_knopp and compiled_sinkhorn_knopp_pays(teacher_output)
        return sinkhorn_knopp(teacher_output, teacher_temp, n_samples, n_iterations, compiled)

    def forward_masked(
        self,
        student_patch_tokens_masked: torch.Tensor,
        teacher_patch_tokens_masked: torch.Tensor,
        student_masks_flat: torch.Tensor,
        n_masked_patches: int | None = None,
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
        if n_masked_patches is not None:
            loss = loss[:n_masked_patches]
        if loss.shape[0] != masks_weight.shape[0]:
            raise ValueError(
                f"iBOT forward_masked: {loss.shape[0]} masked-token rows but {masks_weight.shape[0]} mask weights"
            )
        # (0 - x, not -x: with no masked token the loss is 0, not the -0.0 that logs would show)
        return 0.0 - (loss * masks_weight).sum() / student_masks_flat.shape[0]
