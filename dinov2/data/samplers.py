"""Infinite, rank-sharded, resumable sampling and the seeds that make each sample's augmentation reproducible.

The protocol
------------
All ranks share one global stream of *draws* ``d = 0, 1, 2, ...``. Draw ``d`` belongs to epoch
``e = d // N`` (N = number of samples) and picks sample ``perm_e[d % N]``, where ``perm_e`` is a
permutation drawn from ``(seed, e)`` (the identity when ``shuffle=False``). The sampler yields
:class:`SampleKey` ``(index, epoch)`` pairs; the dataset seeds the augmentation of that sample from
``(dataset seed, index, epoch)``, a different key for every draw, so the images a run sees depend only on
the draw numbers.

Training step ``i`` with per-rank batch ``B`` on ``W`` ranks consumes draws ``[i*W*B, (i+1)*W*B)``, and
rank ``r`` takes the contiguous block ``[i*W*B + r*B, i*W*B + (r+1)*B)``. Hence the batch of one rank with
batch ``W*B`` at step ``i`` is exactly ``[rank 0's B, rank 1's B, ..., rank W-1's B]`` in this order, and a
run resumed at step ``i`` (``start = i*W*B``) sees exactly what an uninterrupted run would have seen,
also after a change of ``W`` that keeps the global batch ``W*B``: the same samples with the same
augmentations. A run resumed with another global batch starts at the draw after the last one its checkpoint
consumed, so that no image of the data order is skipped or repeated. (The trainer draws iBOT masks per rank
batch, as DINOv2 spreads mask ratios over a batch, so
the masks are the same only when ``W`` and ``B`` are.) All of this holds while N stays the same: the trainer
warns when a run resumes on lists of another length.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
from torch.utils.data import Sampler

__all__ = ["InfiniteSampler", "SampleKey", "derive_seed"]


class SampleKey(NamedTuple):
    """What the sampler yields and the dataset's ``__getitem__`` accepts: a sample index and its epoch."""

    index: int
    epoch: int


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from non-negative integers, e.g. ``derive_seed(seed, index, epoch)``.

    NumPy's ``SeedSequence`` mixes the keys' 32-bit words; so keys that differ only by trailing zeros can give the
    same seed (``derive_seed(0, 7) == derive_seed(0, 7, 0)``), as can a key of 2**32 or more and its words as keys
    (``derive_seed(2**32) == derive_seed(0, 1)``): pass the same number of keys, of the same sizes, every time. Torch's
    CPU generator and NumPy's legacy ``seed`` use the low 32 bits of the seed."""
    if any(int(k) < 0 for k in keys):
        raise ValueError(f"seed keys must be non-negative integers, got {keys}")
    words = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


class InfiniteSampler(Sampler[SampleKey]):
    """Endless stream of :class:`SampleKey` for one rank; see the module docstring for the exact order.

    Args:
        sample_count: number of samples in the dataset (N).
        shuffle: a fresh permutation per epoch from ``(seed, epoch)``; otherwise ``0..N-1`` every epoch.
        seed: seed of the permutations.
        start: global draw position to start from: the draws consumed by all ranks together, e.g. the images a
            resumed run's checkpoint has seen (a multiple of ``world_size * batch_size`` unless the batch changed).
        rank, world_size: this rank and the number of ranks.
        batch_size: per-rank batch size, the length of the contiguous block a rank takes per step. With
            ``batch_size=1`` rank ``r`` takes every ``world_size``-th draw.
    """

    def __init__(
        self,
        sample_count: int,
        shuffle: bool = True,
        seed: int = 0,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 1,
    ) -> None:
        if sample_count <= 0:
            raise ValueError(f"InfiniteSampler needs at least one sample, got sample_count={sample_count}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"InfiniteSampler: need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        if batch_size <= 0:
            raise ValueError(f"InfiniteSampler: batch_size must be positive, got {batch_size}")
        if seed < 0:
            raise ValueError(f"InfiniteSampler: seed must be non-negative, got {seed}")
        self.samples_per_step = world_size * batch_size
        if start < 0:
            raise ValueError(f"InfiniteSampler: start must be non-negative, got {start}")
        super().__init__()
        self.sample_count = int(sample_count)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.start = int(start)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.batch_size = int(batch_size)
        self._cached_epoch = -1
        self._cached_order: list[int] = []

    def _order(self, epoch: int) -> list[int]:
        """Sample indices of one epoch in draw order."""
        if epoch != self._cached_epoch:
            if self.shuffle:
                rng = np.random.default_rng(derive_seed(self.seed, epoch))
                self._cached_order = rng.permutation(self.sample_count).tolist()
            else:
                self._cached_order = list(range(self.sample_count))
            self._cached_epoch = epoch
        return self._cached_order

    def key(self, draw: int) -> SampleKey:
        """The sample key of global draw number ``draw``."""
        epoch, position = divmod(draw, self.sample_count)
        return SampleKey(self._order(epoch)[position], epoch)

    def draws(self) -> Iterator[int]:
        """Global draw numbers of this rank, in order."""
        for step_start in itertools.count(self.start, self.samples_per_step):
            first = step_start + self.rank * self.batch_size
            yield from range(first, first + self.batch_size)

    def __iter__(self) -> Iterator[SampleKey]:
        return (self.key(draw) for draw in self.draws())

    def __repr__(self) -> str:
        return (
            f"InfiniteSampler(N={self.sample_count}, shuffle={self.shuffle}, seed={self.seed}, start={self.start}, "
            f"rank={self.rank}/{self.world_size}, batch_size={self.batch_size})"
        )
