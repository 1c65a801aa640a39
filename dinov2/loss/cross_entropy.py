"""The student's cross-entropy against teacher probabilities, shared by the DINO and iBOT losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dinov2.loss.centering import _at_least_float32

__all__ = ["SoftCrossEntropy"]


def _float32_div(x: torch.Tensor, temp: float) -> torch.Tensor:
    """``x / temp`` computed in (at least) float32, as a new tensor; half-precision ``x`` is divided in its copy.

    Dividing before the upcast would round ``x / temp`` to half precision (bf16 keeps 8 bits); dividing the
    upcast copy in place spares the second (B, K) float32 buffer that ``x.float() / temp`` allocates.
    """
    y = _at_least_float32(x)
    return y / temp if y is x else y.div_(temp)


class SoftCrossEntropy(nn.Module):
    """Per row, ``sum_k t_k log softmax(s / temp)_k`` of student scores ``s`` and teacher probabilities ``t``.

    Computed in (at least) float32 whatever the scores' dtype. It is a module of its own so that
    ``train.compile`` can compile it (with dynamic shapes: the number of masked tokens changes every step);
    compiled, the division, log-softmax, product and sum over the (rows x prototypes) matrix and their
    backward run as a few fused kernels instead of seven passes over it.
    """

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, temp: float) -> torch.Tensor:
        """(N, K) scores and (N, K) target probabilities -> (N,) float32 sums (the negative cross-entropy).

        ``teacher`` may also stack several targets, (T, N, K) -> (T, N), sharing one log-softmax of the scores.
        """
        log_probs = F.log_softmax(_float32_div(student, temp), dim=-1)
        return torch.sum(_at_least_float32(teacher) * log_probs, dim=-1)
