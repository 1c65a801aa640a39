"""The student's cross-entropy against teacher probabilities, shared by the DINO and iBOT losses."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = ["SoftCrossEntropy"]


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half precision to float32; float32 and float64 stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def fuses_mixed_dtypes(x: torch.Tensor) -> bool:
    """Whether a binary op on ``x`` and a float32 operand reads ``x`` in its own dtype within one kernel.

    On a GPU it does, so upcasting half-precision ``x`` inside the op spares a float32 copy. A CPU first copies
    ``x`` to the common dtype and then runs a slower non-vectorised loop: a bf16 (2048, 65,536) matrix
    divided by a float32 scalar tensor took 364 ms there, against 215 ms for ``x.float().div_(t)``.
    """
    return x.device.type != "cpu"


def _float32_div(x: torch.Tensor, temp: float) -> torch.Tensor:
    """``x / temp`` computed in (at least) float32, as a new tensor, with as few passes over ``x`` as the device allows.

    Dividing before the upcast would round ``x / temp`` to half precision (bf16 keeps 8 bits). On a GPU the
    divisor is a one-element tensor of the wider dtype, so type promotion upcasts ``x`` inside the division;
    elsewhere the upcast copy is divided in place.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    if x.dtype != dtype and fuses_mixed_dtypes(x):
        return torch.div(x, torch.full((1,), temp, dtype=dtype, device=x.device))
    y = x.to(dtype)
    return y / temp if y is x else y.div_(temp)


class _SoftCrossEntropyFunction(torch.autograd.Function):
    """``sum_k t_k log softmax(s / T)_k`` with a hand-written backward, ``(t - softmax(s / T) sum_k t_k) / T``.

    Autograd's version of the same formula keeps the product ``t * log_probs`` and runs four backward ops
    over the (rows x prototypes) matrix; with the iBOT head's 65,536 prototypes and thousands of masked
    tokens each pass over that matrix costs about a millisecond on a GPU. This one makes fewer passes (see
    ``docs/benchmarks.md``) and writes the gradient straight in the scores' dtype. Teacher probabilities get
    no gradient.
    """

    @staticmethod
    def forward(ctx: Any, student: torch.Tensor, teacher: torch.Tensor, temp: float) -> torch.Tensor:
        # Float32 by design, whatever autocast's operator lists say (CUDA's would also upcast the log-softmax).
        with torch.autocast(device_type=student.device.type, enabled=False):
            log_probs = F.log_softmax(_float32_div(student, temp), dim=-1)
            teacher = _at_least_float32(teacher)
            ctx.save_for_backward(log_probs, teacher)
            ctx.temp, ctx.student_dtype = temp, student.dtype
            return torch.sum(teacher * log_probs, dim=-1)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        log_probs, teacher = ctx.saved_tensors
        scale = grad_output.unsqueeze(-1) / ctx.temp  # (N, 1), or (T, N, 1) for stacked teachers
        probs = log_probs.exp()
        if teacher.dim() == log_probs.dim():  # one teacher: (t - p * sum t) * g / T
            grad = torch.addcmul(teacher, probs, teacher.sum(dim=-1, keepdim=True), value=-1.0, out=probs)
            return _scaled_as(grad, scale, ctx.student_dtype), None, None
        # stacked teachers (T, N, K) sharing one student: sum over T of g_t / T (t_t - p * sum t_t)
        grad = (teacher * scale).sum(dim=0)
        grad.addcmul_(probs, (teacher.sum(dim=-1, keepdim=True) * scale).sum(dim=0), value=-1.0)
        return grad.to(ctx.student_dtype), None, None


def _scaled_as(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x * scale`` as ``dtype``: in place when ``x`` has it, else written straight into a ``dtype`` tensor."""
    if x.dtype == dtype:
        return x.mul_(scale)
    return torch.mul(x, scale, out=torch.empty_like(x, dtype=dtype))


class SoftCrossEntropy(nn.Module):
    """Per row, ``sum_k t_k log softmax(s / temp)_k`` of student scores ``s`` and teacher probabilities ``t``.

    Computed in (at least) float32 whatever the scores' dtype, with the fewer-pass backward of
    ``_SoftCrossEntropyFunction``. It is a module of its own so that ``train.compile`` can compile it (with
    dynamic shapes: the number of masked tokens changes every step); compiled, the division, log-softmax,
    product and sum over the (rows x prototypes) matrix and their backward run as a few fused kernels.
    """

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, temp: float) -> torch.Tensor:
        """(N, K) scores and (N, K) target probabilities -> (N,) float32 sums (the negative cross-entropy).

        ``teacher`` may also stack several targets, (T, N, K) -> (T, N), sharing one log-softmax of the scores.
        """
        if teacher.requires_grad:
            raise ValueError("SoftCrossEntropy: the teacher probabilities are targets and must not require grad")
        return _SoftCrossEntropyFunction.apply(student, teacher, temp)
