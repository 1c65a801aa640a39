"""Writing files so that a kill, a full disk or a crash never leaves one half-written, nor its temporary copy; and
checking, before any work, that an output can be written at all."""

from __future__ import annotations

import errno
import glob
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
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


#: What :func:`atomic_write` puts between a file's name and the writer's process id in its temporary's name.
_TEMPORARY_MARKER = ".tmp-"


def remove_stale_temporaries(path: str | os.PathLike[str], sole_writer: bool = False) -> None:
    """Delete the temporary copies of ``path`` (``.<name>.tmp-<pid>...`` beside it) that processes killed
    before their rename left, those of processes still running excepted; with ``sole_writer`` (the caller holds a
    lock that keeps other writers away) every copy, whatever its process id (a requeued job may hold the killed
    writer's id again)."""
    path = Path(path)
    prefix = f".{path.name}{_TEMPORARY_MARKER}"
    for stale in path.parent.glob(glob.escape(prefix) + "*"):
        pid = stale.name[len(prefix) :].split(".", 1)[0]
        if pid.isdigit() and (sole_writer or _process_is_gone(int(pid))):
            stale.unlink(missing_ok=True)


@contextmanager
def naming_the_file(path: str | os.PathLike[str]) -> Iterator[None]:
    """Give an OSError raised inside that names no file (a failed write: a full disk) the name of ``path``."""
    try:
        yield
    except OSError as err:
        if err.filename is None and err.strerror is not None:
            err.filename = str(path)
        raise


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None], *, sole_writer: bool = False) -> Path:
    """Call ``write(tmp)`` to write a temporary file beside ``path``, flush it to disk and rename it over ``path``:
    a reader finds the old content or the new, never a part of either; returns ``path``. An OSError that names no
    file (a full disk) is given ``path``'s name.

    The temporary, ``.<name>.tmp-<pid><suffix>``, keeps ``path``'s suffix (``np.savez`` would append ``.npz`` to a
    name without it) and is removed if ``write`` fails; copies that killed writers left are removed first
    (:func:`remove_stale_temporaries`, ``sole_writer`` as there).
    """
    path = Path(path)
    remove_stale_temporaries(path, sole_writer=sole_writer)
    tmp = path.with_name(f".{path.name}{_TEMPORARY_MARKER}{os.getpid()}{path.suffix}")
    try:
        with naming_the_file(path):
            write(tmp)
            with open(tmp, "rb+") as f:  # (writable: Windows cannot flush a read-only handle)
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def file_in_the_way(folder: Path) -> Path | None:
    """The file (not a folder) at ``folder`` or at one of its parents, which keeps ``folder`` from being made; None
    when there is none."""
    # (os.path's tests answer False where a parent cannot be searched; Path.exists raises there before Python 3.12)
    return next((path for path in (folder, *folder.parents) if os.path.exists(path) and not os.path.isdir(path)), None)


def _nearest_existing(folder: Path) -> Path | None:
    """``folder`` or its nearest parent that exists; None when none does."""
    # (os.path's tests answer False where a folder cannot be searched; Path's raise there before Python 3.12)
    return next((path for path in (folder, *folder.parents) if os.path.exists(path)), None)


def shown_name(text: str) -> str:
    """``text`` with the bytes of a file name that is not UTF-8 (read with ``surrogateescape``, as Python reads such
    names) shown as ``\\xNN`` escapes: what a figure or a message can display."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_write`; returns ``path``. A file name in ``text`` that
    is not UTF-8 (read with ``surrogateescape``, as Python reads such names) is written as its own bytes."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8", errors="surrogateescape"))


def check_folder_writable(folder: str | os.PathLike[str], subject: str, *, subject_names_it: bool = True) -> None:
    """Raise a ValueError starting with ``subject``, before any work, unless ``folder`` can be made and written in:
    a file in the way, no permission, or a folder that cannot be made or takes no new file (a read-only or special
    file system such as /proc, which permissions do not show: a file is written and removed to find out). The
    folders made for the test are removed again (the writers make them when they write), so a command that fails
    later leaves none behind. ``subject_names_it``: the subject names ``folder``, which the message then calls "it"
    (else by its path)."""
    folder = Path(folder).absolute()

    def shown(path: Path) -> str:
        return "it" if subject_names_it and path == folder else str(path)

    blocking = file_in_the_way(folder)
    if blocking is not None:
        raise ValueError(f"{subject}: {shown(blocking)} is a file, not a folder")
    existing = _nearest_existing(folder)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{subject}: no permission to write in {shown(existing)}")
    made = [path for path in (folder, *folder.parents) if not os.path.lexists(path)]  # deepest first
    try:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"{subject}: the folder {folder} cannot be made ({err.strerror or err})") from None
        try:
            handle, probe = tempfile.mkstemp(dir=folder, prefix=".write-test.", suffix=".probe")
            os.close(handle)
            os.unlink(probe)
        except OSError as err:
            raise ValueError(f"{subject}: {folder} takes no new files ({err.strerror or err})") from None
    finally:
        for path in made:
            with suppress(OSError):
                path.rmdir()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's bytes, read in 16 MiB pieces (about a second per GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while piece := handle.read(16 << 20):
            digest.update(piece)
    return digest.hexdigest()


#: Where a file system has this little room left, a write that failed there most likely failed for want of room.
_NEARLY_FULL_BYTES = 64 << 20
_OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT)
# (libraries that wrap the system's error in one of their own, as HDF5 does, keep its words)
_OUT_OF_SPACE_WORDS = ("No space left on device", "Disk quota exceeded")


def out_of_space(err: BaseException) -> str | None:
    """When ``err`` (an OSError or a library's RuntimeError), or an error it was raised from, is a full disk or a
    used-up quota: its message (``"/runs/a/config.yaml: No space left on device"`` for a system error); else None.
    Any other kind of error (a bug raised while a full disk was handled, say) is None: it keeps its traceback."""
    if not isinstance(err, (OSError, RuntimeError)):
        return None
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _OUT_OF_SPACE:
            where = f"{current.filename}: " if current.filename else ""
            return f"{where}{os.strerror(current.errno)}" if current.strerror else str(current)
        if any(words in str(current) for words in _OUT_OF_SPACE_WORDS):
            return str(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return None


def nearly_full_note(folder: str | os.PathLike[str]) -> str:
    """``"its file system is full (<n> MB free); "`` when the file system holding ``folder`` has under 64 MiB free
    (or under 2 % of a smaller one), else ``""``: a prefix for the message of a write that failed there without
    saying why (PyTorch's archive writer reports a full disk as an "unexpected pos")."""
    existing = _nearest_existing(Path(folder))
    if existing is None:
        return ""
    try:
        usage = shutil.disk_usage(existing)
    except OSError:
        return ""
    nearly_full = min(_NEARLY_FULL_BYTES, usage.total // 50)
    return f"its file system is full ({usage.free / 1e6:.1f} MB free); " if usage.free < nearly_full else ""
