"""Writing files so that a kill, a full disk or a crash never leaves one half-written, nor its temporary copy."""

from __future__ import annotations

import glob
import os
from pathlib import Path


def _process_is_gone(pid: int) -> bool:
    """Whether no process of this id runs on this machine (False where that cannot be told)."""
    if os.name != "posix" or pid == os.getpid():  # (os.kill would end a process on Windows)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # another user's process
        return False
    return False


def remove_stale_temporaries(path: str | os.PathLike[str], marker: str = ".tmp") -> None:
    """Delete the temporary copies of ``path`` (``.<name><marker><pid>...`` beside it) that processes killed
    before their rename left, those of processes still running excepted."""
    path = Path(path)
    prefix = f".{path.name}{marker}"
    for stale in path.parent.glob(glob.escape(prefix) + "*"):
        pid = stale.name[len(prefix) :].lstrip("-").split(".", 1)[0]
        if pid.isdigit() and _process_is_gone(int(pid)):
            stale.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it, flushed to disk and then renamed over
    ``path``: a reader finds the old content or the new, never a part of either. Copies that killed writers left
    are removed first."""
    path = Path(path)
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
