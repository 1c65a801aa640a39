"""iBOT loss on masked patch tokens: teacher centering and a per-crop weighted cross-entropy."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dinov2.loss.dino_clstoken_loss import (
    _at_least_float32,
    _dist_ready,
    _float32_div,
    sinkhorn_knopp,
)

__all__ = ["iBOTPatchLoss"]


class iBOTPatchLoss(nn.Module):  # noqa: N801 (DINOv2's public name)
    """Masked-image-modelling loss of iBOT on the prototype scores of masked patch tokens."""

    center: torch.Tensor

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, 1, patch_out_dim))
        self._pending_sum: torch.Tensor | None = None  # (1, K + 1): token sum and token count
        self._pending_handle: dist.Work | None = None

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_patch_tokens: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Apply any queued center update, then return ``softmax((t - center) / teacher_temp)``."""
        self.apply_center_update()
        return F.softmax((teacher_patch_tokens - self.center) / teacher_temp, dim=-1)

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
        return sinkhorn_knopp(teacher_output, teacher_temp, n_samples, n_iterations)

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
        log_probs = F.log_softmax(_float32_div(student_patch_tokens_masked, self.student_temp), dim=-1)
        loss = torch.sum(_at_least_float32(teacher_patch_tokens_masked) * log_probs, dim=-1)
        if masks_weight is None:
            counts = student_masks_flat.sum(dim=-1, dtype=torch.float32).clamp(min=1.0)
            masks_weight = (1.0 / counts).unsqueeze(-1).expand_as(student_masks_flat)[student_masks_flat]
        if n_masked_patches is not None:
            loss = loss[:n_masked_patches]
        if loss.shape[0] != masks_weight.shape[0]:
            raise ValueError(
                f"iBOT forward_masked: {loss.shape[0]} masked-token rows but {masks_weight.shape[0]} mask weights"
            )
        return -(loss * masks_weight).sum() / student_masks_flat.shape[0]

    @torch.no_grad()
    def update_center(self, teacher_patch_tokens: torch.Tensor) -> None:
        """Queue a center update from (n, T, K) teacher tokens: the mean over all tokens of all processes.

        With one process and n = 1, as the trainer calls it, this is the reference's token mean. Across processes the
        tokens are pooled (the reference averaged per-process means), so a process without masked tokens neither
        spoils the center with a 0/0 nor biases it; when no process has any token the center stays as it is.
        """
        tokens = _at_least_float32(teacher_patch_tokens).flatten(0, -2)
        count = torch.full((1, 1), tokens.shape[0], dtype=tokens.dtype, device=tokens.device)
        # Sum and count travel in one all-reduce.
        self._pending_sum = torch.cat((tokens.sum(dim=0, keepdim=True), count), dim=1)
        self._pending_handle = dist.all_reduce(self._pending_sum, async_op=True) if _dist_ready() else None

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """Fold the queued mean into the center: ``center = m * center + (1 - m) * mean``."""
        if self._pending_sum is None:
            return
        if self._pending_handle is not None:
            self._pending_handle.wait()
        token_sum, count = self._pending_sum[:, :-1], self._pending_sum[:, -1:]
        batch_mean = (token_sum / count.clamp(min=1)).view_as(self.center)
        updated = self.center * self.center_momentum + batch_mean * (1 - self.center_momentum)
        self.center.copy_(torch.where(count.view(1, 1, 1) > 0, updated, self.center))
        self._pending_sum = None
        self._pending_handle = None
