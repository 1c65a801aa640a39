"""Teacher softmax centering with an EMA centre, shared by the DINO and iBOT losses."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _dist_ready() -> bool:
    """True when a process group exists, so collectives may be called."""
    return dist.is_available() and dist.is_initialized()


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half precision to float32; float32 and float64 stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class SoftmaxCentering(nn.Module):
    """``softmax((t - center) / T)`` with ``center`` an EMA of the teacher outputs' mean, updated lazily.

    ``update_center`` queues the sum and the count of this step's outputs in one asynchronous all-reduce;
    the next ``softmax_center_teacher`` (or ``apply_center_update``) folds the pooled mean into the centre:
    ``center = m * center + (1 - m) * mean``. Pooling the outputs over processes equals DINOv2's average of
    per-process means when the processes hold equally many, and stays right when they do not (a process that
    dropped unreadable images, or one without masked patches); with no output anywhere the centre is kept.
    The counts differ most for iBOT, whose masked tokens per process vary every step: with several processes its
    centre is the mean over all masked tokens, where DINOv2's weighs each process's mean equally (a deliberate
    difference; DinoBloom's recipe uses Sinkhorn-Knopp, not this centering).
    """

    center: torch.Tensor

    def __init__(self, center_shape: tuple[int, ...], center_momentum: float) -> None:
        super().__init__()
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(center_shape))
        self._pending: torch.Tensor | None = None  # (1, K + 1): the outputs' sum and their count
        self._pending_handle: dist.Work | None = None

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Apply any queued center update, then return ``softmax((t - center) / teacher_temp)``."""
        self.apply_center_update()
        return F.softmax((teacher_output - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """Queue a center update with the mean of ``teacher_output`` (..., K) over all rows of all processes."""
        rows = _at_least_float32(teacher_output).flatten(0, -2)
        count = torch.full((1, 1), rows.shape[0], dtype=rows.dtype, device=rows.device)
        self._pending = torch.cat((rows.sum(dim=0, keepdim=True), count), dim=1)
        self._pending_handle = dist.all_reduce(self._pending, async_op=True) if _dist_ready() else None

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """Fold the queued mean into the center: ``center = m * center + (1 - m) * mean``."""
        if self._pending is None:
            return
        if self._pending_handle is not None:
            self._pending_handle.wait()
        row_sum, count = self._pending[:, :-1], self._pending[:, -1:]
        batch_mean = (row_sum / count.clamp(min=1)).view_as(self.center)
        updated = self.center * self.center_momentum + batch_mean * (1 - self.center_momentum)
        self.center.copy_(torch.where(count.flatten() > 0, updated, self.center))
        self._pending = None
        self._pending_handle = None
