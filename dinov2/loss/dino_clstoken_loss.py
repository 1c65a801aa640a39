"""DINO loss on the class token: teacher centering (EMA softmax or Sinkhorn-Knopp) and cross-entropy."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

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
    compiled: bool = False,
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

    ``compiled`` (``train.compile`` on CUDA, see :func:`compiled_sinkhorn_knopp_pays`): ``Q`` is not stored
    either. Each pass is a ``torch.compile``d kernel that recomputes ``Q diag(v) = exp(t / T + log v - max / T)``
    from the logits as it reads them (half the bytes of a float32 ``Q`` for bf16 logits) and sums it; the last one
    writes the targets. Besides the maximum, seven reads of the logits and one write, against eleven passes over a
    float32 matrix, five of which write it (see ``docs/benchmarks.md``). The targets agree with the stored
    version's to about 1e-5 relative (float32 rounding of the exponent, ``t / T`` near 25 at ``T = 0.04``).
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
        passes = (_RecomputedPasses if compiled else _StoredPasses)(teacher_output, shift, teacher_temp)
        n_prototypes = teacher_output.shape[1]
        sample_mass: torch.Tensor | None = None
        for _ in range(n_iterations):
            # each prototype gets total mass 1/K (v), then each sample total mass 1/B (u = 1 / (B * sample_mass))
            prototype_mass = passes.column_sums(None if sample_mass is None else 1.0 / (sample_mass * n_samples))
            if _dist_ready():
                dist.all_reduce(prototype_mass)
            v = 1.0 / (prototype_mass * n_prototypes)
            sample_mass = passes.row_sums(v)
        return passes.targets(v, sample_mass)


def compiled_sinkhorn_knopp_pays(logits: torch.Tensor) -> bool:
    """Whether ``sinkhorn_knopp(..., compiled=True)`` pays for ``logits``: on a CUDA GPU it does (9,749 x 65,536
    bf16 logits on an H200: 13.5 ms stored, 7.8 ms compiled; since the passes read one value per prototype, the
    compiled DINO and iBOT passes of a ViT-S step take 3.8 ms together, ``docs/benchmarks.md``); a CPU computes the
    extra ``exp`` more slowly than it reads a stored ``Q`` (2,048 x 65,536 float32 logits: 1.0 s compiled, 0.47 s
    stored). Other devices, unmeasured, keep the stored version."""
    return logits.device.type == "cuda"


class _StoredPasses:
    """Sinkhorn-Knopp's passes over ``Q = exp((t - shift) / T)``, written once to a float32 buffer of our own."""

    def __init__(self, logits: torch.Tensor, shift: torch.Tensor, temp: float) -> None:
        if logits.dtype == shift.dtype or fuses_mixed_dtypes(logits):
            q = torch.sub(logits, shift)
        else:  # a CPU upcasts half precision faster on its own
            q = logits.to(shift.dtype).sub_(shift)
        self.q = q.div_(temp).exp_()

    def column_sums(self, row_weights: torch.Tensor | None) -> torch.Tensor:
        """``sum_i w_i Q_ik`` (all ``w_i = 1`` for None)."""
        return self.q.sum(dim=0) if row_weights is None else torch.mv(self.q.t(), row_weights)

    def row_sums(self, column_weights: torch.Tensor) -> torch.Tensor:
        """``sum_k Q_ik v_k``."""
        return torch.mv(self.q, column_weights)

    def targets(self, column_weights: torch.Tensor, row_sums: torch.Tensor) -> torch.Tensor:
        """``Q_ik v_k / s_i``, in place of ``Q``."""
        return self.q.mul_(column_weights).div_(row_sums.unsqueeze(1))


def _exp_affine(logits: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``exp(scale * logits + offset)`` in the dtype of ``offset`` (float32 for half-precision logits).

    With ``scale = 1 / T`` and a per-prototype ``offset``, one fused multiply-add per element gives ``Q`` times any
    per-prototype factor folded into the offset: ``exp((t - m) / T) * v = exp(t / T + (log v - m / T))``.
    """
    return torch.exp(logits.to(offset.dtype) * scale + offset)


def _weighted_column_sums(
    logits: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, row_weights: torch.Tensor
) -> torch.Tensor:
    """``sum_i w_i exp(scale t_ik + offset_k)``, the matrix never written out once compiled."""
    return (_exp_affine(logits, scale, offset) * row_weights.unsqueeze(1)).sum(dim=0)


def _row_sums(logits: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``sum_k exp(scale t_ik + offset_k)``, the matrix never written out once compiled."""
    return _exp_affine(logits, scale, offset).sum(dim=1)


def _normalised_rows(
    logits: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, row_sums: torch.Tensor
) -> torch.Tensor:
    """``exp(scale t_ik + offset_k) / s_i``: the targets, in one pass once compiled."""
    return _exp_affine(logits, scale, offset) / row_sums.unsqueeze(1)


@functools.cache
def _compiled(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``fn`` compiled once per process, with a dynamic row count (the number of masked tokens changes every step).

    The prototype count stays static (see :class:`_RecomputedPasses`). Dynamo keeps a variant per dtype of the
    logits, per prototype count (the DINO and iBOT heads may differ) and for 0, 1 and more rows (it specialises
    on 0 and 1); training needs at most six, within its limit of 8.
    """
    return torch.compile(fn)


def _rows_dynamic(*tensors: torch.Tensor) -> None:
    """Mark dimension 0 of ``tensors`` dynamic for the compiler (a no-op where it specialises 0 and 1 rows)."""
    for tensor in tensors:
        torch._dynamo.maybe_mark_dynamic(tensor, 0)


class _RecomputedPasses:
    """The same passes as compiled kernels that recompute ``Q`` from the logits instead of storing it.

    Each element costs one fused multiply-add and one ``exp`` of ``scale * t + offset``: ``scale = 1 / T``, and
    the per-prototype offset folds the maximum and the prototype weights ``v`` together
    (``log v_k - m_k / T``), so a pass reads one float32 value per prototype beside the logits, not two or
    three. The row count is dynamic, the prototype count static, which lets the compiler size its reductions.
    The temperature travels as a tensor, so that its warm-up schedule cannot recompile the kernels every step.
    """

    def __init__(self, logits: torch.Tensor, shift: torch.Tensor, temp: float) -> None:
        self.logits = logits
        self.scale = torch.full((), 1.0 / temp, dtype=shift.dtype, device=logits.device)
        self.shift_offset = (shift * -self.scale).flatten()  # -m_k / T
        _rows_dynamic(logits)

    def column_sums(self, row_weights: torch.Tensor | None) -> torch.Tensor:
        """``sum_i w_i Q_ik`` (all ``w_i = 1`` for None: a vector of ones, so that one compiled variant serves both)."""
        if row_weights is None:
            row_weights = torch.ones(self.logits.shape[0], dtype=self.scale.dtype, device=self.logits.device)
        _rows_dynamic(row_weights)
        return _compiled(_weighted_column_sums)(self.logits, self.scale, self.shift_offset, row_weights)

    def row_sums(self, column_weights: torch.Tensor) -> torch.Tensor:
        """``sum_k Q_ik v_k``."""
        return _compiled(_row_sums)(self.logits, self.scale, self._offset(column_weights))

    def targets(self, column_weights: torch.Tensor, row_sums: torch.Tensor) -> torch.Tensor:
        """``Q_ik v_k / s_i``, a new float32 tensor."""
        _rows_dynamic(row_sums)
        return _compiled(_normalised_rows)(self.logits, self.scale, self._offset(column_weights), row_sums)

    def _offset(self, column_weights: torch.Tensor) -> torch.Tensor:
        """``log v_k - m_k / T``: ``Q_ik v_k = exp(t_ik / T + offset_k)``."""
        return self.shift_offset + torch.log(column_weights)


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
        self.compile_sinkhorn_knopp = False  # train.compile: where it pays, see sinkhorn_knopp

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
        compiled = self.compile_sinkhorn_knopp and compiled_sinkhorn_knopp_pays(teacher_output)
        return sinkhorn_knopp(teacher_output, teacher_temp, n_samples, n_iterations, compiled)

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
