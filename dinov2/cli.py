"""Running a command-line entry point: a mistake in the user's input ends in one clear line, not a traceback."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

from dinov2.hub.loader import CheckpointError

#: What a mistake in a CLI's input raises (a missing file, a bad value, a checkpoint of the wrong model).
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, CheckpointError)


def run_cli(main: Callable[[], object], errors: tuple[type[BaseException], ...] = USER_ERRORS) -> None:
    """Run ``main``; one of ``errors`` ends in one ``error:`` line on stderr and exit status 2, Ctrl-C in one
    ``interrupted`` line and status 130 (what a shell reports for SIGINT).

    ``DINOBLOOM_TRACEBACK=1`` in the environment shows the traceback instead.
    """
    try:
        main()
    except errors as err:
        if os.environ.get("DINOBLOOM_TRACEBACK"):
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        if os.environ.get("DINOBLOOM_TRACEBACK"):
            raise
        print("interrupted", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
