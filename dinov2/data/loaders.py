"""DataLoader construction with reproducible worker seeding; workers leave stop signals to the main process."""

from __future__ import annotations

import atexit
import logging
import random
import signal
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dinov2.data.datasets import DatasetError
from dinov2.data.samplers import derive_seed

__all__ = ["batches", "init_worker", "make_data_loader", "seed_worker", "stop_workers"]

#: Signals that ask a run to stop (a scheduler's SIGTERM or SIGUSR1, a terminal's Ctrl-C or hangup): the main process
#: decides.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)

logger = logging.getLogger(__name__)

#: Loaders with worker processes, shut down at exit by :func:`_shut_down_workers_at_exit`.
_loaders_with_workers: weakref.WeakSet[DataLoader] = weakref.WeakSet()


@atexit.register
def _shut_down_workers_at_exit() -> None:
    """Stop the workers of every loader still alive at interpreter exit, through the loader's own shutdown.

    The workers ignore SIGTERM (:func:`init_worker`), and multiprocessing ends its children at exit with SIGTERM and
    then waits for them: when an uncaught error's traceback still holds a loader, the process would wait for ever.
    Registered after torch's and multiprocessing's own exit routines (imported above), this runs before them.
    """
    for loader in list(_loaders_with_workers):
        stop_workers(loader)


def stop_workers(loader: DataLoader, stuck: bool = False) -> None:
    """Shut down the persistent workers of ``loader`` through its own shutdown; kill any that do not end.

    ``stuck``: kill them first, as workers stuck in a read (a stalled file system) answer neither their queue nor
    SIGTERM, and the shutdown would wait several seconds for each.
    """
    iterator = loader._iterator  # DataLoader keeps its persistent workers' iterator here
    if iterator is None:
        return
    workers = list(iterator._workers)
    if stuck:
        if iterator._worker_pids_set:  # stop watching them first: the SIGCHLD handler would report the kills
            torch.utils.data._utils.signal_handling._remove_worker_pids(id(iterator))
            iterator._worker_pids_set = False
        for worker in workers:
            worker.kill()
            worker.join()
    iterator._shutdown_workers()
    loader._iterator = None
    for worker in workers:
        if worker.is_alive():
            worker.kill()


def seed_worker(worker_id: int) -> None:
    """Seed ``random`` and NumPy in a worker from torch's per-worker seed (``base_seed + worker_id``).

    Keyed samples (``SampleKey``) do not need this, their transforms are seeded per sample; it makes
    any other randomness in worker code depend on the loader seed only.
    """
    worker_seed = torch.initial_seed() % 2**63
    random.seed(worker_seed)
    np.random.seed(derive_seed(worker_seed) % 2**32)


def init_worker(worker_id: int) -> None:
    """Seed the worker (:func:`seed_worker`) and leave stop signals to the main process.

    ``timeout``, ``scancel``, torchrun and a terminal's Ctrl-C signal the whole process group. PyTorch's workers
    die of a SIGTERM that does not come from their parent (and end their loop on SIGINT), after which the main
    process fails at the next batch, before the checkpoint it was about to write. Ignoring the stop signals here
    lets the main process finish its iteration and save; the workers still end with it (they watch their parent,
    and the loader shuts them down through its queues).
    """
    seed_worker(worker_id)
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def make_data_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    sampler: Sampler | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    drop_last: bool = True,
    pin_memory: bool = False,
    seed: int = 0,
    timeout_s: float = 0.0,
) -> DataLoader:
    """A DataLoader over ``dataset`` drawing from ``sampler`` (e.g. :class:`InfiniteSampler`).

    Args:
        dataset: a map-style dataset; with an :class:`InfiniteSampler` it receives ``SampleKey`` items.
        batch_size: samples per batch on this rank.
        num_workers: worker processes (0 loads in the main process).
        sampler: order of the samples; ``None`` reads the dataset once in order.
        collate_fn: batch collation, e.g. the trainer's :class:`dinov2.train.data.TrainCollate`, which drops
            unreadable images (``None``); default torch's.
        drop_last: drop a last incomplete batch (irrelevant for infinite samplers).
        pin_memory: page-locked batches, for a faster copy to a CUDA device (only when the run uses one).
        seed: seed of the loader's worker base seeds (see :func:`seed_worker`).
        timeout_s: with workers, the longest wait for one batch (0: no limit); see :func:`batches`.

    Workers persist between iterations.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    logger.info(
        "data loader: batch %d, %d workers, sampler %r, pin_memory=%s", batch_size, num_workers, sampler, pin_memory
    )
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        worker_init_fn=init_worker,
        generator=torch.Generator().manual_seed(seed),
        timeout=timeout_s if num_workers > 0 else 0.0,
    )
    if num_workers > 0:
        _loaders_with_workers.add(loader)
    return loader


def batches(loader: DataLoader, setting: str = "the loader's timeout") -> Iterator[Any]:
    """The batches of ``loader``; workers that deliver none within its ``timeout`` end it with a DatasetError.

    A read that never returns (a stalled network file system, a named pipe in a list) would otherwise hold the run,
    and a cluster job's allocation, until its time limit. ``setting`` names where the timeout is configured.
    """
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except RuntimeError as err:
            if loader.timeout > 0 and "timed out" in str(err):
                stop_workers(loader, stuck=True)  # else at exit they would hold the process, or outlive it
                raise DatasetError(
                    f"no batch came from the {loader.num_workers} data-loader workers within {loader.timeout:g} s "
                    f"({setting}): is the storage of the images stalled, or does a list name a named pipe or a "
                    "device? Checkpoints are intact: run again to resume once the images can be read"
                ) from None
            raise
        yield batch
