"""Gated attention-based multiple-instance learning (Ilse et al. 2018) over frozen cell features.

The structure follows CLAM's ``Attn_Net_Gated``: each cell feature is embedded by
``fc(D -> hidden) + ReLU + dropout``; its attention score is ``w(tanh(V h) * sigmoid(U h))``;
scores are softmax-normalised over the cells of a patient, the attention-weighted mean
of the embeddings is the patient's representation, and a linear layer classifies it.
"""

from __future__ import annotations

import torch
from torch import nn


class GatedAttention(nn.Module):
    """Attention score per instance: ``w(tanh(V h) * sigmoid(U h))``."""

    def __init__(self, dim: int = 512, hidden_dim: int = 256, dropout: float = 0.25) -> None:
        super().__init__()
        self.attention_a = nn.Sequential(nn.Linear(dim, hidden_dim), nn.Tanh(), nn.Dropout(dropout))
        self.attention_b = nn.Sequential(nn.Linear(dim, hidden_dim), nn.Sigmoid(), nn.Dropout(dropout))
        self.attention_c = nn.Linear(hidden_dim, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Unnormalised scores (..., n) for embeddings (..., n, dim)."""
        return self.attention_c(self.attention_a(h) * self.attention_b(h)).squeeze(-1)


class AttentionMIL(nn.Module):
    """Bag classifier: instance embedding, gated attention pooling, linear classifier."""

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        hidden_dim: int = 512,
        attention_dim: int = 256,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.attention = GatedAttention(hidden_dim, attention_dim, dropout)
        self.classifier = nn.Linear(hidden_dim, num_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, C) and attention weights (B, n) for bags x (B, n, D); ``mask`` marks real instances."""
        h = self.embed(x)
        scores = self.attention(h)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        attention = torch.softmax(scores, dim=1)
        pooled = torch.einsum("bn,bnd->bd", attention, h)
        return self.classifier(pooled), attention
