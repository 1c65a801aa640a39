"""Logging of the command-line tools (training sets up its own: per rank, and to the run's log.txt)."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: int = logging.INFO) -> None:
    """Log ``level`` and above to stderr with timestamps (a command calls this once, first)."""
    logging.basicConfig(level=level, format=FORMAT)
