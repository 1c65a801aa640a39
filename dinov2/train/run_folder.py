"""The run folder: claimed by one run at a time, an earlier run's outputs set aside when a run starts over, and the
marker that keeps a requeued start-over from resuming the run it replaces."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from dinov2 import distributed
from dinov2.configs import ConfigError
from dinov2.files import file_in_the_way
from dinov2.train.run_lock import RunLock, RunLockedError
from dinov2.train.trackers import TENSORBOARD_DIR, WANDB_RUN_ID_FILE

logger = logging.getLogger("dinov2")

PREVIOUS_RUN_OUTPUTS = (
    "checkpoints", "eval", "training_metrics.json", "knn_monitor.json", TENSORBOARD_DIR, WANDB_RUN_ID_FILE,
)


#: Written when a run is told to start over in a folder that holds an earlier run, removed once that run is moved
#: aside (or when the run fails): a requeued job, told to resume after a preemption, that finds it starts over too
#: rather than resume the earlier run.
START_OVER_MARKER = ".starting_over"


def mark_start_over(output_dir: Path) -> None:
    """Leave :data:`START_OVER_MARKER` in ``output_dir`` when it holds an earlier run's outputs."""
    if any((output_dir / name).exists() for name in PREVIOUS_RUN_OUTPUTS):
        (output_dir / START_OVER_MARKER).touch()


def set_aside_previous_run(output_dir: Path, previous_config: str | None = None) -> Path | None:
    """Move an earlier run's outputs in ``output_dir`` into ``previous_runs/<date-time>/``; return that folder.

    A run that starts over (``--no-resume``, or a folder without checkpoints) must not resume from, prune, or mix its
    records with another run's checkpoints, exports and metrics later on; they are kept, not deleted, with the
    earlier run's ``config.yaml`` (``previous_config``), from which its exports take their architecture.
    """
    found = [output_dir / name for name in PREVIOUS_RUN_OUTPUTS if (output_dir / name).exists()]
    if not found:
        return None
    base = output_dir / "previous_runs" / time.strftime("%Y%m%d-%H%M%S")
    target, n = base, 1
    while target.exists():
        target, n = base.with_name(f"{base.name}-{n}"), n + 1
    target.mkdir(parents=True)
    for path in found:
        os.replace(path, target / path.name)
    if previous_config is not None:
        (target / "config.yaml").write_text(previous_config)
    logger.warning("starting over: moved the earlier run's %s to %s", ", ".join(p.name for p in found), target)
    return target


def may_resume(output_dir: Path, resume: bool) -> bool:
    """``resume``, unless a start-over in ``output_dir`` stopped before it set the earlier run aside (its marker is
    there): the requeued job finishes that start-over instead."""
    if resume and (output_dir / START_OVER_MARKER).exists():
        logger.warning("%s: a run told to start over (--no-resume) stopped before it moved the earlier run aside; "
                       "starting over, as it was told", output_dir)  # fmt: skip
        return False
    return resume


def start_over(output_dir: Path, previous_config: str | None, is_main: bool) -> None:
    """Set the earlier run aside (rank 0) and drop :data:`START_OVER_MARKER`; every rank calls it."""
    distributed.barrier()  # every rank has read the checkpoint it starts from (MODEL.WEIGHTS) before they are moved
    if is_main:
        set_aside_previous_run(output_dir, previous_config)
        (output_dir / START_OVER_MARKER).unlink(missing_ok=True)
    distributed.barrier()


def output_dir_error(output_dir: Path, err: OSError) -> str:
    """Why ``output_dir`` cannot be used, naming the file in the way when it is another."""
    blocking = file_in_the_way(output_dir)
    if blocking is not None:
        where = "it" if blocking == output_dir else str(blocking)
        return f"--output-dir (train.output_dir) {output_dir}: {where} is a file, not a folder; name a folder"
    where = f": {err.filename}" if err.filename and Path(err.filename) != output_dir else ""
    return f"--output-dir (train.output_dir) {output_dir}: {err.strerror or err}{where}"


def claim_output_folder(output_dir: Path, lock: RunLock, is_main: bool, device: torch.device) -> None:
    """Rank 0 makes ``output_dir`` and takes its lock; every rank raises :class:`ConfigError` when it could not.

    Every rank calls it: they learn whether rank 0 could take the folder (a collective: it also waits for the folder
    to exist), so that all of them stop with the error instead of waiting for rank 0 at the next collective.
    """
    refused = ""
    if is_main:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        except RunLockedError as err:
            refused = str(err)
        except OSError as err:  # a file in the way, a read-only folder
            refused = output_dir_error(output_dir, err)
    if distributed.all_reduce_mean(torch.tensor([float(bool(refused))], device=device)).item() > 0:
        raise ConfigError(refused or f"--output-dir {output_dir} cannot be used (rank 0 says why)")
