"""DINO loss on the class token: teacher centering (EMA softmax or Sinkhorn-Knopp) and cross-entropy."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from dinov2.loss.centering import SoftmaxCentering, _dist_ready
from dinov2.loss.cross_entropy import SoftCrossEntropy, fuses_mixed_dtypes

__all__ = ["DINOLoss", "dino_loss_term_scales", "sinkhorn_knopp"]


@torch.no_grad()
def sinkhorn_knopp(
    teacher_output: torch.Tensor,
    teacher_temp: float,
    n_samples: int | torch.Tensor,
    n_iterations: int = 3,
) -> torch.Tensor:
    """Sinkhorn-Knopp teacher targets: (B, K) logits -> (B, K) probabilities whose rows sum to 1.

    ``n_samples`` is the number of rows over all processes; per-prototype sums are all-reduced when a
    process group is initialised. Each prototype's maximum logit (over all processes) is subtracted before
    ``exp``. The first per-prototype normalisation cancels that factor, and the reference's initial division
    by the total sum too, so the result equals the reference ``exp(t / T)`` version up to rounding (2e-8 on
    the conformance fixture), but it cannot overflow, nor turn a prototype into 0/0, for large ``t / T``. (A
    sample whose every logit lies more than about 87 ``T`` below each prototype's maximum still underflows to
    0/0; with weight-normalised heads, whose logits lie in [-|g|, |g|], that needs prototype norms near 2 at
    ``T = 0.04``.)

    The alternating normalisations are carried by two scaling vectors, ``u`` per sample and ``v`` per
    prototype, with the current matrix ``diag(u) Q diag(v)`` never written out: an iteration reads ``Q``
    twice (two matrix-vector products) instead of rewriting it four times, and the result is
    ``n_samples * diag(u) Q diag(v)`` after the last one, i.e. the rows of ``Q diag(v)`` normalised to 1.
    """
    if n_iterations < 1:
        raise ValueError(f"sinkhorn_knopp needs n_iterations >= 1, got {n_iterations}")
    # Autocast would run the matrix-vector products below in half precision on CUDA: each would copy the
    # float32 (B, K) matrix to bf16/fp16 and sum rounded values. DINOv2 sums in float32; so do we, without copies.
    with torch.autocast(device_type=teacher_output.device.type, enabled=False):
        dtype = torch.promote_types(teacher_output.dtype, torch.float32)
        if teacher_output.shape[0] > 0:  # exact in the logits' own dtype: half the bytes to read for bf16
            shift = teacher_output.amax(dim=0, keepdim=True).to(dtype)
        else:  # an empty shard (no masked patch on this rank) contributes -inf to the all-reduced maximum
            shift = torch.full((1, teacher_output.shape[1]), float("-inf"), dtype=dtype, device=teacher_output.device)
        if _dist_ready():
            dist.all_reduce(shift, op=dist.ReduceOp.MAX)
        # Q = exp((t - max) / T): (B, K) samples x prototypes, in a float32 buffer of our own, updated in place
        if teacher_output.dtype == dtype or fuses_mixed_dtypes(teacher_output):
            q = torch.sub(teacher_output, shift)
        else:  # a CPU upcasts half precision faster on its own
            q = teacher_output.to(dtype).sub_(shift)
        q.div_(teacher_temp).exp_()
        n_prototypes = q.shape[1]
        sample_mass: torch.Tensor | None = None
        for _ in range(n_iterations):
            # each prototype gets total mass 1/K (v), then each sample total mass 1/B (u = 1 / (B * sample_mass))
            if sample_mass is None:
                prototype_mass = q.sum(dim=0)
            else:
                prototype_mass = torch.mv(q.t(), 1.0 / (sample_mass * n_samples))
            if _dist_ready():
                dist.all_reduce(prototype_mass)
            v = 1.0 / (prototype_mass * n_prototypes)
            sample_mass = torch.mv(q, v)
        return q.mul_(v).div_(sample_mass.unsqueeze(1))


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


class DINOLoss(SoftmaxCentering):
    """Cross-entropy between the sharpened, centred teacher distribution and the student on class tokens."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__((1, out_dim), center_momentum)
        self.student_temp = student_temp
        self.cross_entropy = SoftCrossEntropy()

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self, teacher_output: torch.Tensor, teacher_temp: float, n_iterations: int = 3
    ) -> torch.Tensor:
        """Sinkhorn-Knopp targets for (B, K) teacher logits; B is summed over all processes.

        DINOv2 takes ``B * world_size``, which equals the sum while every process holds as many rows; ours may
        not (a process drops the unreadable images of its batch), so the count is all-reduced, as iBOT's is.
        """
        n_samples = torch.full((), teacher_output.shape[0], dtype=torch.long, device=teacher_output.device)
        if _dist_ready():
            dist.all_reduce(n_samples)
        return sinkhorn_knopp(teacher_output, teacher_temp, n_samples, n_iterations)

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
