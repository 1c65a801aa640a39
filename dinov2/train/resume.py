"""Resuming: a training checkpoint loaded strictly, with what makes the continued run differ from the one that
wrote it said (or refused, where the tensors would load but compute something else)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from omegaconf import DictConfig, OmegaConf

from dinov2 import distributed
from dinov2.checkpoint import CheckpointDamagedError, load_checkpoint
from dinov2.configs import ConfigError, config_differences
from dinov2.hub.loader import CheckpointError
from dinov2.train.data import anchor_data_paths
from dinov2.train.schedules import total_iterations
from dinov2.train.ssl_meta_arch import SSLMetaArch

logger = logging.getLogger("dinov2")


class Progress(NamedTuple):
    """Where a run stands: the next iteration, the images read so far, how many of them were unreadable, and the
    part of a RankMe window seen before the checkpoint (see :meth:`dinov2.train.rankme.RankMeMonitor.window_state`)."""

    iteration: int = 0
    images_seen: int = 0
    bad_images: int = 0
    rankme_window: dict[str, Any] | None = None


def resume_from_checkpoint(
    checkpoint: Path,
    model: SSLMetaArch,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    cfg: DictConfig,
    previous_config: str | None,
    global_batch: int,
    dataset_size: int,
    augmentation: dict[str, Any],
) -> Progress:
    """Load a training checkpoint strictly into the model, the optimiser and the loss scaler; return its progress.

    ``previous_config``: the text of the config.yaml of the run being resumed (None when starting from
    ``MODEL.WEIGHTS``). The settings that differ from it are named when the checkpoint does not fit, and in a
    warning when it does; so is any other way in which this run will differ from the one that wrote the checkpoint.
    """
    previous = OmegaConf.create(previous_config) if previous_config else None
    if previous is not None:  # a config.yaml of an earlier version holds relative data paths, taken from here
        anchor_data_paths(previous)
    # (a run folder moved or copied, or a requeued job told to resume, is not a changed setting)
    unchanged = ("train.output_dir", "train.resume")
    run_changes = config_differences(previous, cfg, ignore=unchanged) if previous is not None else []
    try:
        state = load_checkpoint(checkpoint, model, optimizer)
    except CheckpointError as err:  # a setting that renames or reshapes tensors (block_chunks, ffn_layer, ...)
        if not run_changes or isinstance(err, CheckpointDamagedError):  # (no setting damages a file)
            raise
        raise CheckpointError(
            f"{err}\nSettings that differ from the checkpointed run's config.yaml: {'; '.join(run_changes[:12])}. "
            "Resume with that run's settings, or start a new run (another --output-dir, or --no-resume)"
        ) from None
    start_iter = state["iteration"] + 1
    check_same_network(checkpoint, state.get("network"), network_record(model.student.backbone))
    if scaler is not None and state.get("grad_scaler"):
        scaler.load_state_dict(state["grad_scaler"])
    previous_recipe = OmegaConf.select(previous, "train.augmentation") if previous is not None else None
    warn_about_changes(
        checkpoint, state, start_iter, global_batch, dataset_size, augmentation, run_changes, previous_recipe
    )
    logger.info("resuming at iteration %d from %s", start_iter, checkpoint)
    return Progress(start_iter, state["images_seen"], state["bad_images"], state.get("rankme_window"))



def check_within_schedule(checkpoint: Path, start_iter: int, cfg: DictConfig, resuming: bool) -> None:
    """Refuse a checkpoint that has trained more iterations than ``cfg``'s run has; ``resuming`` this run's own
    checkpoint rather than one of ``MODEL.WEIGHTS`` (each has its own remedy)."""
    max_iter = total_iterations(cfg)
    if start_iter <= max_iter:
        return
    remedy = (
        "keep the run's epochs (its config.yaml) or raise them to train on, or start a new run (another "
        "--output-dir, or --no-resume)" if resuming
        else "MODEL.WEIGHTS continues the checkpoint's iteration count: raise optim.epochs past it, or start a "
        "fresh schedule from a trained teacher with student.pretrained_weights=<eval/training_N/"
        "teacher_checkpoint.pth>"
    )
    raise ConfigError(
        f"the checkpoint {checkpoint} has trained {start_iter} iterations, more than this config's run of {max_iter} "
        f"(optim.epochs={cfg.optim.epochs} x train.OFFICIAL_EPOCH_LENGTH={cfg.train.OFFICIAL_EPOCH_LENGTH}): "
        f"{remedy}"
    )

def warn_about_changes(
    checkpoint: Path,
    state: dict[str, Any],
    start_iter: int,
    global_batch: int,
    dataset_size: int,
    augmentation: dict[str, Any],
    config_changes: Sequence[str],
    previous_recipe: str | None = None,
) -> None:
    """Warn where a run continued from ``checkpoint`` will differ from the run that wrote it (on rank 0: every rank
    would say the same).

    ``previous_recipe``: ``train.augmentation`` of the run's earlier config.yaml, when there is one.
    """
    if not distributed.is_main_process():
        return
    trained_batch = state.get("global_batch")  # (earlier versions' checkpoints lack it: inferred from the images seen)
    if trained_batch is not None and trained_batch != global_batch:
        logger.warning(
            "%s was trained with %d images per step; this run takes %d: it goes on with the next images of the "
            "data order, but its steps and learning rate differ from those of an uninterrupted run", checkpoint,
            trained_batch, global_batch,
        )
    elif trained_batch is None and state["images_seen"] != start_iter * global_batch:
        logger.warning(
            "%s saw %d images in %d steps; this run takes %d per step: it goes on with the next images of the data "
            "order, but its steps and learning rate differ from those of an uninterrupted run", checkpoint,
            state["images_seen"], start_iter, global_batch,
        )
    if state.get("dataset_size", dataset_size) != dataset_size:
        logger.warning(
            "%s was trained on %d images, the lists now hold %d: from here the sample order differs from that of "
            "an uninterrupted run (this epoch may repeat or skip some images)", checkpoint, state["dataset_size"],
            dataset_size,
        )
    recorded = state.get("augmentation")
    if recorded is None:  # checkpoints before 2026-11-27 recorded the blur alone, and older ones nothing
        recorded = {"blur": state["blur"]} if "blur" in state else {}
        if previous_recipe != "dinov2":
            logger.warning(
                "%s records no augmentation recipe: if it trained the hematology recipe, that was an earlier "
                "version's, without grayscale or solarisation, which no setting restores; this run continues with "
                "DinoBloom's final recipe", checkpoint,
            )
    changed = [
        f"{name} {recorded[name]} -> {value}"
        for name, value in augmentation.items()
        if name in recorded and recorded[name] != value
    ]
    if changed:
        logger.warning(
            "%s was trained with another augmentation; this run continues with the new one (probabilities per view: "
            "global 1, global 2, local): %s; crops.blur_probabilities and train.augmentation set these",
            checkpoint, "; ".join(changed),
        )
    if config_changes:
        logger.warning(
            "resuming with settings that differ from the checkpointed run's config.yaml; they apply from "
            "iteration %d on: %s", start_iter, "; ".join(config_changes),
        )


#: Backbone settings that change what the network computes but not the shape of any tensor, with their config keys.
SHAPE_PRESERVING_SETTINGS = {
    "num_heads": "student.num_heads",
    "interpolate_antialias": "student.interpolate_antialias",
    "interpolate_offset": "student.interpolate_offset",
}


def network_record(backbone: torch.nn.Module) -> dict[str, Any]:
    """The backbone's :data:`SHAPE_PRESERVING_SETTINGS`, stored with each checkpoint."""
    return {name: getattr(backbone, name) for name in SHAPE_PRESERVING_SETTINGS}


def check_same_network(
    checkpoint: Path,
    saved: dict[str, Any] | None,
    current: dict[str, Any],
    remedy: str = "continue with the settings of its run (its config.yaml), or start a new run (another --output-dir, "
    "or --no-resume)",
) -> None:
    """Refuse to continue ``checkpoint``'s training with a network that differs from its own in a setting that the
    strict load cannot catch (the tensors fit); ``remedy`` ends the error. Checkpoints saved before the record was
    kept are not checked."""
    if saved is None:
        return
    changed = [
        f"{key}={saved[name]} in the checkpoint, {current[name]} in this config"
        for name, key in SHAPE_PRESERVING_SETTINGS.items()
        if name in saved and saved[name] != current[name]
    ]
    if changed:
        raise ConfigError(
            f"{checkpoint} was trained with another network: {'; '.join(changed)}. Its tensors would load but "
            f"compute something else: {remedy}"
        )
