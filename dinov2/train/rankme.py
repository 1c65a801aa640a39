"""RankMe (Garrido et al., ICML 2023): the effective rank of the embeddings, a collapse monitor DinoBloom logged.

RankMe(Z) = exp(-sum_k p_k log p_k) with p_k = s_k / sum(s) + eps, where s are the singular values of the
(samples x dim) matrix Z of CLS tokens. It lies between 1 (every sample embedded on one line: collapse) and
min(samples, dim). DinoBloom computed it every 1000 iterations on the student's global-crop CLS tokens (ten
consecutive batches; a later revision of its trainer, 2,500 tokens). We compute it on the teacher's, the network
that is exported and evaluated, from ``evaluation.rankme_batches`` batches.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import Tensor, nn

logger = logging.getLogger(__name__)

EPS = 1e-7  # as RankMe's authors and DinoBloom


def rankme_from_singular_values(singular_values: Tensor, eps: float = EPS) -> float:
    """RankMe of a matrix given its singular values."""
    s = singular_values.double().clamp_min(0)
    p = s / s.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


class RankMeMonitor:
    """RankMe of the teacher's CLS tokens over ``batches`` consecutive steps, every ``period`` iterations.

    The tokens are those the released features are made of (the teacher backbone's normalised CLS token) on the
    step's global crops. Each rank adds ``Z^T Z`` of its tokens to a float64 Gram matrix (dim x dim), so that the
    ranks' shares, whatever their sizes, sum with one all-reduce; the singular values of the stacked tokens are the
    square roots of that matrix's eigenvalues. A checkpoint saved inside a window keeps the part of it seen so far
    (:meth:`window_state`), which a resume continues (:meth:`continue_window`); a window the run did not see from
    its first step otherwise (a checkpoint of an earlier version) is skipped rather than scored on fewer samples.
    """

    def __init__(self, period: int, batches: int) -> None:
        self.period = period
        self.batches = batches
        self._gram: Tensor | None = None
        self._rows = 0
        self._steps = 0

    @classmethod
    def from_config(cls, cfg: DictConfig) -> RankMeMonitor | None:
        """The monitor of ``evaluation.rankme_period_iterations`` (None when it is 0)."""
        period = int(cfg.evaluation.rankme_period_iterations)
        return cls(period, int(cfg.evaluation.rankme_batches)) if period > 0 else None

    def _window_end(self, iteration: int) -> int:
        """The last iteration of the window that ``iteration`` belongs to."""
        return iteration - iteration % self.period + self.batches - 1

    def window_state(self, iteration: int, group: dist.ProcessGroup | None) -> dict[str, Any] | None:
        """The part of the window seen up to ``iteration`` (after its update), summed over the ranks, for a checkpoint;
        None outside a window. Every rank must call it."""
        if not self._steps or self._gram is None:
            return None
        gram, counts = self._gram.clone(), torch.tensor([self._rows], dtype=torch.int64)
        if group is not None:
            dist.all_reduce(gram, group=group)
            dist.all_reduce(counts, group=group)
        return {"window_end": self._window_end(iteration), "steps": self._steps, "rows": int(counts.item()),
                "gram": gram}  # fmt: skip

    def continue_window(self, state: dict[str, Any] | None, start_iter: int, rank: int) -> None:
        """Continue the window a checkpoint was saved inside (its :meth:`window_state`) when the run resumes at
        ``start_iter`` in that very window: rank 0 takes the sum so far, the others start from zero, and the sums at
        the window's end add up to the whole window, whatever the number of ranks."""
        if state is None or not self.wants(start_iter) or state["window_end"] != self._window_end(start_iter):
            return
        if state["steps"] != start_iter % self.period:  # (another rankme_batches or period than the checkpoint's)
            return
        self._steps = int(state["steps"])
        self._gram = state["gram"].clone() if rank == 0 else torch.zeros_like(state["gram"])
        self._rows = int(state["rows"]) if rank == 0 else 0

    def wants(self, iteration: int) -> bool:
        """Whether ``iteration`` belongs to a window."""
        return iteration % self.period < self.batches

    @torch.no_grad()
    def update(self, backbone: nn.Module, crops: Tensor, autocast: AbstractContextManager) -> None:
        """Add the CLS tokens of ``backbone`` on ``crops`` (every rank must call it: the backbone may be sharded)."""
        with autocast:
            tokens = backbone(crops, is_training=True)["x_norm_clstoken"]
        z = tokens.detach().to("cpu", torch.float64)
        if self._gram is None:
            self._gram = torch.zeros(z.shape[1], z.shape[1], dtype=torch.float64)
        self._gram += z.T @ z
        self._rows += z.shape[0]
        self._steps += 1

    def result(self, iteration: int, group: dist.ProcessGroup | None) -> tuple[float, int] | None:
        """(RankMe, number of CLS tokens) at the last iteration of a window that this run saw whole, else None.

        Every rank must call it at each iteration of a window: the Gram matrices are summed over ``group``
        (a gloo group; None for a single process).
        """
        if iteration % self.period != self.batches - 1:
            return None
        gram, rows, steps = self._gram, self._rows, self._steps
        self._gram, self._rows, self._steps = None, 0, 0
        if steps != self.batches or gram is None:
            logger.info("RankMe: skipping the window ending at iteration %d (resumed inside it from a checkpoint "
                        "that does not hold its first part)", iteration)  # fmt: skip
            return None
        if group is not None:
            counts = torch.tensor([rows], dtype=torch.int64)
            dist.all_reduce(gram, group=group)
            dist.all_reduce(counts, group=group)
            rows = int(counts.item())
        if not torch.isfinite(gram).all():  # a diverged run: its loss check names the cause
            logger.warning("RankMe: the teacher's CLS tokens are not finite in the window ending at iteration %d; "
                           "not scored", iteration)  # fmt: skip
            return None
        eigenvalues = torch.linalg.eigvalsh(gram).flip(0)[: min(rows, gram.shape[0])]
        return rankme_from_singular_values(eigenvalues.clamp_min(0).sqrt()), rows
