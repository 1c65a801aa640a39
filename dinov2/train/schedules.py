"""Per-iteration schedules (learning rate, weight decay, teacher momentum and temperature), precomputed as arrays."""

from __future__ import annotations

import logging

import numpy as np
from omegaconf import DictConfig

logger = logging.getLogger(__name__)


class CosineScheduler:
    """A linear warm-up to `base_value`, then a cosine decay towards `final_value`.

    DINOv2's semantics: the warm-up is `linspace(start_warmup_value, base_value, warmup_iters)` (so its last value is
    `base_value`); the cosine part of length n takes `final + (base - final) * (1 + cos(pi * i / n)) / 2` for
    i = 0..n-1; an iteration at or past `total_iters` gets `final_value`.
    """

    def __init__(
        self,
        base_value: float,
        final_value: float,
        total_iters: int,
        warmup_iters: int = 0,
        start_warmup_value: float = 0.0,
    ) -> None:
        if min(total_iters, warmup_iters) < 0 or warmup_iters > total_iters:
            raise ValueError(f"need 0 <= warmup_iters ({warmup_iters}) <= total_iters ({total_iters})")
        self.final_value = float(final_value)
        self.total_iters = int(total_iters)
        n_cosine = total_iters - warmup_iters
        phase = np.pi * np.arange(n_cosine) / max(n_cosine, 1)
        cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(phase))
        self.schedule = np.concatenate((np.linspace(start_warmup_value, base_value, warmup_iters), cosine))

    def __getitem__(self, iteration: int) -> float:
        """The value at `iteration` (`final_value` from `total_iters` on)."""
        if iteration < 0:
            raise IndexError(f"iteration must be >= 0, got {iteration}")
        if iteration >= self.total_iters:
            return self.final_value
        return float(self.schedule[iteration])


def total_iterations(cfg: DictConfig) -> int:
    """Length of the run: `optim.epochs` x `train.OFFICIAL_EPOCH_LENGTH` iterations."""
    return int(cfg.optim.epochs * cfg.train.OFFICIAL_EPOCH_LENGTH)


def build_schedulers(cfg: DictConfig) -> dict[str, CosineScheduler]:
    """DINOv2's schedules: `lr`, `wd`, `momentum`, `teacher_temp` and `last_layer_lr`, indexed by iteration.

    `optim.lr` must already be set from `optim.base_lr` by `apply_scaling_rules_to_cfg`.
    """
    if cfg.optim.lr <= 0:
        raise ValueError("optim.lr is not set: call dinov2.configs.apply_scaling_rules_to_cfg(cfg, world_size) first")
    epoch = cfg.train.OFFICIAL_EPOCH_LENGTH
    total = total_iterations(cfg)
    lr = dict(
        base_value=cfg.optim.lr,
        final_value=cfg.optim.min_lr,
        total_iters=total,
        warmup_iters=int(cfg.optim.warmup_epochs * epoch),
    )
    temp_warmup = int(cfg.teacher.warmup_teacher_temp_epochs * epoch)
    last_layer_lr = CosineScheduler(**lr)
    # The prototypes stay fixed for the first epochs (DINOv2 zeroes the start of the lr schedule).
    last_layer_lr.schedule[: int(cfg.optim.freeze_last_layer_epochs * epoch)] = 0.0
    schedulers = {
        "lr": CosineScheduler(**lr),
        "wd": CosineScheduler(cfg.optim.weight_decay, cfg.optim.weight_decay_end, total),
        "momentum": CosineScheduler(cfg.teacher.momentum_teacher, cfg.teacher.final_momentum_teacher, total),
        # A linear warm-up over warmup_teacher_temp_epochs, then constant (nothing left for the cosine part).
        "teacher_temp": CosineScheduler(
            base_value=cfg.teacher.teacher_temp,
            final_value=cfg.teacher.teacher_temp,
            total_iters=temp_warmup,
            warmup_iters=temp_warmup,
            start_warmup_value=cfg.teacher.warmup_teacher_temp,
        ),
        "last_layer_lr": last_layer_lr,
    }
    logger.info("schedules ready for %d iterations", total)
    return schedulers
