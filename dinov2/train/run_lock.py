"""One training at a time per output folder: an exclusive lock on ``<output_dir>/.lock``.

Two processes training into one folder (a job submitted twice, a requeued job racing a manual resubmit) would
resume from the same checkpoint, interleave their metrics, overwrite each other's exports and prune each other's
checkpoints. The lock is the kernel's (``flock``): it goes with the process that holds it, also one that is killed,
so a stale lock file never blocks a resume. A ``flock`` belongs to the open file, which a forked child (a data-loader
worker) shares: each child closes its copy as it starts, so that workers outliving a killed trainer by a few
seconds, or stuck on unreadable storage, do not keep its folder locked.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import weakref
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # Windows: no flock; training there runs without the lock
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class RunLockedError(RuntimeError):
    """Another process holds the output folder's lock; the message names it."""


#: The locks this process holds; a forked child lets go of its copies at once (see :func:`_release_in_child`).
_HELD: weakref.WeakSet[RunLock] = weakref.WeakSet()


class RunLock:
    """Hold the lock of ``output_dir`` from :meth:`acquire` until :meth:`release` (or the process ends)."""

    def __init__(self, output_dir: Path) -> None:
        self.path = Path(output_dir) / LOCK_NAME
        self._handle: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock, or raise ``RunLockedError`` naming the process that holds it.

        A file system without locks (some network mounts) gives a warning and no lock.
        """
        if fcntl is None:
            return
        handle = self.path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "a process that did not say which"
            handle.close()
            raise RunLockedError(
                f"{self.path.parent} is in use by another training ({holder}); wait for it to end, stop it, or "
                "choose another --output-dir"
            ) from None
        except OSError as err:
            handle.close()
            logger.warning("cannot lock %s (%s): make sure no other training writes to this folder", self.path, err)
            return
        handle.seek(0)
        handle.truncate()
        started = datetime.datetime.now().isoformat(timespec="seconds")
        handle.write(f"process {os.getpid()} on {socket.gethostname()}, since {started}\n")
        handle.flush()
        self._handle = handle
        _HELD.add(self)

    def release(self) -> None:
        """Let the lock go (closing the file releases it)."""
        _HELD.discard(self)
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _release_in_child() -> None:
    """In a forked child: close the copies of the parent's lock files, which the parent alone holds."""
    for lock in list(_HELD):
        lock.release()  # closes the child's descriptor only; the parent's lock stays


if hasattr(os, "register_at_fork"):  # (not on Windows, which has no fork)
    os.register_at_fork(after_in_child=_release_in_child)
