"""Teacher targets shared by the DINO and iBOT losses: softmax with an EMA centre, or Sinkhorn-Knopp."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dinov2.loss.cross_entropy import _at_least_float32, fuses_mixed_dtypes

__all__ = ["TeacherCentering", "compiled_sinkhorn_knopp_pays", "sinkhorn_knopp"]


def _dist_ready() -> bool:
    """True when a process group exists, so collectives may be called."""
    return dist.is_available() and dist.is_initialized()


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


class TeacherCentering(nn.Module):
    """The teacher's targets of a loss: Sinkhorn-Knopp, or ``softmax((t - center) / T)`` with an EMA centre.

    Softmax centering: ``center`` is an EMA of the teacher outputs' mean, updated lazily. ``update_center``
    queues the sum and the count of this step's outputs in one asynchronous all-reduce; the next
    ``softmax_center_teacher`` (or ``apply_center_update``) folds the pooled mean into the centre:
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
        self.compile_sinkhorn_knopp = False  # train.compile: where it pays, see sinkhorn_knopp

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self, teacher_output: torch.Tensor, teacher_temp: float, n_iterations: int = 3
    ) -> torch.Tensor:
        """Sinkhorn-Knopp targets for (N, K) teacher logits; N, the row count, is summed over all processes.

        DINOv2 counts ``B * world_size`` class tokens, which equals the sum while every process holds as many rows;
        ours may not (a process drops the unreadable images of its batch). Its iBOT count, the all-reduced number of
        masked tokens, is this sum.
        """
        n_samples = torch.full((), teacher_output.shape[0], dtype=torch.long, device=teacher_output.device)
        if _dist_ready():
            dist.all_reduce(n_samples)
        compiled = self.compile_sinkhorn_knopp and compiled_sinkhorn_knopp_pays(teacher_output)
        return sinkhorn_knopp(teacher_output, teacher_temp, n_samples, n_iterations, compiled)

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
