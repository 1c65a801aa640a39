"""DINO loss on the class token: the cross-entropy against the centred teacher and the trainer's term scales."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from dinov2.loss.centering import TeacherCentering
from dinov2.loss.cross_entropy import SoftCrossEntropy

__all__ = ["DINOLoss", "dino_loss_term_scales"]


def dino_loss_term_scales(n_global_crops: int, n_local_crops: int) -> tuple[float, float]:
    """Factors the trainer applies to the raw DINO losses: ``(global_scale, local_scale)``.

    The global crops are processed together, so their raw loss (one student/teacher pair over
    ``2 * B`` rows) is multiplied by 2; both terms are divided by the number of crop pairs,
    ``n_global_terms + n_local_terms`` with ``n_global_terms = 2`` and
    ``n_local_terms = max(2 * n_local_crops, 1)``. As in DinoBloom, a local term exists only for
    ``n_local_crops > 1`` (``local_crops_number: 1`` means "no local crops"); ``local_scale`` is then 0.0,
    yet the pair count still includes the phantom local crop, giving a global factor of 2 / 4.
    """
    if n_global_crops != 2:
        raise ValueError(f"the DINO loss is defined for exactly 2 global crops, got n_global_crops={n_global_crops}")
    if n_local_crops < 0:
        raise ValueError(f"n_local_crops must be >= 0, got {n_local_crops}")
    n_global_terms = (n_global_crops - 1) * n_global_crops
    n_local_terms = max(n_local_crops * n_global_crops, 1)
    n_terms = n_global_terms + n_local_terms
    global_scale = n_global_crops / n_terms
    local_scale = 1.0 / n_terms if n_local_crops > 1 else 0.0
    return global_scale, local_scale


class DINOLoss(TeacherCentering):
    """Cross-entropy between the sharpened, centred teacher distribution and the student on class tokens."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__((1, out_dim), center_momentum)
        self.student_temp = student_temp
        self.cross_entropy = SoftCrossEntropy()

    def forward(
        self,
        student_output_list: Iterable[torch.Tensor],
        teacher_out_softmaxed_centered_list: Iterable[torch.Tensor],
    ) -> torch.Tensor:
        """Sum over all (student, teacher) pairs of the row-averaged cross-entropy ``-sum_k t log softmax(s/T)``."""
        students, teachers = list(student_output_list), list(teacher_out_softmaxed_centered_list)
        if not students or not teachers:
            raise ValueError("DINOLoss.forward needs at least one student and one teacher tensor")
        # All teachers against one student in one call: its log-softmax is computed once, not once per teacher.
        stacked = torch.stack(teachers) if len(teachers) > 1 else teachers[0].unsqueeze(0)
        total: torch.Tensor | None = None
        for student in students:
            for term in self.cross_entropy(student, stacked, self.student_temp).mean(dim=-1):
                total = -term if total is None else total - term
        return total
