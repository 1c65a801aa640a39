"""KoLeo regulariser (Sablayrolles et al. 2019): spread the embeddings of a batch apart."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["KoLeoLoss"]


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko entropy estimator: ``-mean(log(distance to nearest neighbour + eps))``.

    ``pairwise_eps`` is added to every difference vector before its norm, as ``nn.PairwiseDistance``
    does. DinoBloom raised it from DINOv2's 1e-8 to 1e-4 to avoid infinite losses on duplicate embeddings;
    1e-4 is the default here (config ``dino.koleo_pairwise_eps``); 1e-8 gives upstream DINOv2's numbers.
    """

    def __init__(self, pairwise_eps: float = 1e-4) -> None:
        super().__init__()
        self.pairwise_eps = pairwise_eps

    @staticmethod
    @torch.no_grad()
    def nearest_neighbours(x: torch.Tensor) -> torch.Tensor:
        """Index of each row's nearest other row for L2-normalised (B, D) rows (largest inner product)."""
        dots = x @ x.t()
        dots.fill_diagonal_(-1.0)
        return dots.argmax(dim=1)

    def forward(self, student_output: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        """KoLeo loss of (B, D) embeddings, computed in (at least) float32 even under autocast."""
        if student_output.ndim != 2:
            raise ValueError(f"KoLeoLoss expects (batch, dim) embeddings, got shape {tuple(student_output.shape)}")
        with torch.autocast(device_type=student_output.device.type, enabled=False):
            x = student_output.to(torch.promote_types(student_output.dtype, torch.float32))
            x = F.normalize(x, p=2, dim=-1, eps=eps)
            neighbours = self.nearest_neighbours(x)
            distances = torch.linalg.vector_norm(x - x[neighbours] + self.pairwise_eps, dim=-1)
            return -torch.log(distances + eps).mean()
