"""RankMe, the effective rank DinoBloom logged: the formula against its definition, and the monitor's windows."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pytest
import torch
from torch import nn

from dinov2.train.rankme import RankMeMonitor, rankme_from_singular_values


def _reference_rankme(z: np.ndarray, eps: float = 1e-7) -> float:
    """RankMe as Garrido et al. define it: exp of the entropy of the l1-normalised singular values (+ eps)."""
    s = np.linalg.svd(z.astype(np.float64), compute_uv=False)
    p = s / np.abs(s).sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


def _rankme(z: np.ndarray) -> float:
    """RankMe of a (samples x dim) matrix through the monitor's formula."""
    return rankme_from_singular_values(torch.linalg.svdvals(torch.from_numpy(z).double()))


def test_rankme_matches_its_definition() -> None:
    rng = np.random.default_rng(0)
    z = rng.standard_normal((300, 64)) @ np.diag(np.geomspace(1, 1e-3, 64))  # a spread of singular values
    assert _rankme(z) == pytest.approx(_reference_rankme(z), rel=1e-12)
    assert 1 < _rankme(z) < 64


@pytest.mark.parametrize("rank", [1, 5, 32])
def test_rankme_counts_equal_directions(rank: int) -> None:
    """k orthogonal directions of equal weight give RankMe k (up to eps); a collapsed set gives 1."""
    q, _ = np.linalg.qr(np.random.default_rng(rank).standard_normal((200, 32)))
    z = q[:, :rank] @ np.eye(rank, 32)  # 200 x 32 with `rank` equal singular values, the rest 0
    assert _rankme(z) == pytest.approx(rank, rel=1e-4)


class _Projection(nn.Module):
    """A stand-in backbone: the CLS token is a fixed linear map of the flattened crop."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(12, dim, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor, is_training: bool = False) -> dict[str, torch.Tensor]:
        return {"x_norm_clstoken": x.flatten(1) @ self.weight}


def test_monitor_scores_each_whole_window_from_the_stacked_tokens() -> None:
    """Period 5, 3 batches: windows 0-2, 5-7; the score equals RankMe of every token of the window stacked."""
    backbone, monitor = _Projection(16), RankMeMonitor(period=5, batches=3)
    batches = [torch.randn(6, 3, 2, 2, generator=torch.Generator().manual_seed(i)) for i in range(10)]
    scores = {}
    for iteration, crops in enumerate(batches):
        if monitor.wants(iteration):
            monitor.update(backbone, crops, nullcontext())
            result = monitor.result(iteration, group=None)
            if result is not None:
                scores[iteration] = result
    assert list(scores) == [2, 7]
    for end, (value, n_tokens) in scores.items():
        tokens = torch.cat([backbone(b)["x_norm_clstoken"] for b in batches[end - 2 : end + 1]]).detach()
        assert n_tokens == 18
        # The Gram route puts singular values that are 0 (rank 12 of 16 here) at ~1e-8 of the largest.
        assert value == pytest.approx(_reference_rankme(tokens.double().numpy()), rel=1e-6)


def test_a_window_split_by_a_checkpoint_is_scored_whole_on_any_number_of_ranks() -> None:
    """Window 5-7 with a checkpoint after iteration 5: the resumed run continues the window. On two ranks, rank 0
    takes the sum so far and rank 1 starts from zero, so the all-reduced matrix at the window's end is the whole
    window's. A checkpoint of another window, or of another window length, is not continued."""
    backbone = _Projection(16)
    batches = {i: torch.randn(6, 3, 2, 2, generator=torch.Generator().manual_seed(i)) for i in (5, 6, 7)}
    whole = RankMeMonitor(period=5, batches=3)
    for iteration, crops in batches.items():
        whole.update(backbone, crops, nullcontext())
    expected = whole.result(7, group=None)

    before = RankMeMonitor(period=5, batches=3)
    before.update(backbone, batches[5], nullcontext())
    state = before.window_state(5, group=None)
    assert state is not None and (state["window_end"], state["steps"], state["rows"]) == (7, 1, 6)
    resumed = RankMeMonitor(period=5, batches=3)
    resumed.continue_window(state, 6, rank=0)
    for iteration in (6, 7):
        resumed.update(backbone, batches[iteration], nullcontext())
    assert resumed.result(7, group=None) == expected

    ranks = [RankMeMonitor(period=5, batches=3) for _ in range(2)]  # the rest of the window split between 2 ranks
    for rank, monitor in enumerate(ranks):
        monitor.continue_window(state, 6, rank=rank)
        for iteration in (6, 7):
            monitor.update(backbone, batches[iteration][rank * 3 : rank * 3 + 3], nullcontext())
    ranks[0]._gram += ranks[1]._gram  # what the all-reduce at the window's end does
    ranks[0]._rows += ranks[1]._rows
    value, tokens = ranks[0].result(7, group=None)
    assert tokens == expected[1] and value == pytest.approx(expected[0], rel=1e-6)  # (the zero singular values: ~1e-8)

    for other_window, start in ((RankMeMonitor(period=5, batches=3), 11), (RankMeMonitor(period=5, batches=4), 6)):
        other_window.continue_window(state, start, rank=0)
        assert other_window.window_state(start, group=None) is None  # nothing carried over
    assert RankMeMonitor(period=5, batches=3).window_state(4, group=None) is None  # outside a window: nothing


def test_monitor_skips_a_window_it_did_not_see_from_its_start() -> None:
    """A run resumed at iteration 6 (inside window 5-7) from a checkpoint without the window's part (an earlier
    version's) does not score that window on 2 of its 3 batches."""
    backbone, monitor = _Projection(16), RankMeMonitor(period=5, batches=3)
    for iteration in (6, 7):
        monitor.update(backbone, torch.randn(6, 3, 2, 2), nullcontext())
        assert monitor.result(iteration, group=None) is None
    for iteration in (10, 11, 12):  # the next window is whole again
        monitor.update(backbone, torch.randn(6, 3, 2, 2), nullcontext())
    assert monitor.result(12, group=None) is not None


def test_monitor_does_not_score_tokens_that_are_not_finite(caplog: pytest.LogCaptureFixture) -> None:
    """A run whose loss diverged inside a window: no linear-algebra error (the loss check then names the cause)."""
    backbone, monitor = _Projection(16), RankMeMonitor(period=5, batches=2)
    monitor.update(backbone, torch.randn(6, 3, 2, 2), nullcontext())
    monitor.update(backbone, torch.full((6, 3, 2, 2), float("nan")), nullcontext())
    with caplog.at_level("WARNING", logger="dinov2.train.rankme"):
        assert monitor.result(1, group=None) is None
    assert "not finite in the window ending at iteration 1; not scored" in caplog.text
