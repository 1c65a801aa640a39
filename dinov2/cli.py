"""Running a command-line entry point: a mistake in the user's input ends in one clear line, not a traceback; the
argparse types and output checks the commands share."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from dinov2.files import check_folder_writable, out_of_space
from dinov2.hub.loader import CheckpointError

#: What a mistake in a CLI's input raises (a missing file, a bad value, a checkpoint of the wrong model, a path that
#: cannot be written).
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError,
    CheckpointError,
)
# The project's own code; a virtual environment inside the checkout (``.venv``, CI's ``.ci-venv``) is not.
_PROJECT_DIRS = (Path(__file__).resolve().parent, Path(__file__).resolve().parents[1] / "scripts")


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (a count, a batch size)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0 (a seed, warm-up steps)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0 (a temperature, a regularisation strength)."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number >= 0 (a tolerance)."""
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def check_file_writable(path: Path) -> None:
    """Raise ValueError unless ``path`` can be written as a file: not a folder, in a folder that can be made and
    written in (see :func:`dinov2.files.check_folder_writable`; the folders it makes are removed again)."""
    if os.path.isdir(path):
        raise ValueError(f"cannot write {path}: it is a folder; name a file")
    check_folder_writable(path.parent, f"cannot write {path}", subject_names_it=False)


def raised_outside_the_project(err: BaseException) -> str | None:
    """The module that raised ``err`` when that is not this project's code (a library's check), else None."""
    tb = err.__traceback__
    if tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    parents = Path(tb.tb_frame.f_code.co_filename).resolve().parents
    if any(directory in parents for directory in _PROJECT_DIRS):
        return None
    return str(tb.tb_frame.f_globals.get("__name__", tb.tb_frame.f_code.co_filename))


def run_cli(main: Callable[[], object], errors: tuple[type[BaseException], ...] = USER_ERRORS) -> None:
    """Run ``main``; one of ``errors``, or a full disk, ends in one ``error:`` line on stderr and exit status 2,
    Ctrl-C in one ``interrupted`` line and status 130 (what a shell reports for SIGINT).

    ``DINOBLOOM_TRACEBACK=1`` in the environment shows the traceback instead; an error that a library raised
    (not this project's own check) says where it came from and how to see the traceback.
    """
    try:
        main()
    except errors as err:
        if os.environ.get("DINOBLOOM_TRACEBACK"):
            raise
        print(f"error: {err}", file=sys.stderr)
        origin = raised_outside_the_project(err)
        if origin is not None:
            print(f"(raised in {origin}; DINOBLOOM_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        if os.environ.get("DINOBLOOM_TRACEBACK"):
            raise
        print("interrupted", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    except Exception as err:
        ran_out = out_of_space(err)
        if os.environ.get("DINOBLOOM_TRACEBACK") or ran_out is None:
            raise
        print(f"error: {ran_out}; free some space and run the command again (training and feature extraction go on "
              "from what they saved)", file=sys.stderr)  # fmt: skip
        raise SystemExit(2) from None
