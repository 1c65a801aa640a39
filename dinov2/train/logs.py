"""The trainer's logging: rank 0 to the console and log.txt, other ranks' warnings to log_rank<N>.txt, and what the
config says before those handlers exist held back for them."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from dinov2.logs import FORMAT


def _prints_to_console(handler: logging.Handler) -> bool:
    """Whether ``handler`` writes to the process's stdout or stderr."""
    consoles = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    return isinstance(handler, logging.StreamHandler) and any(handler.stream is c for c in consoles)


LOG_FILE_ONLY = {"log_file_only": True}  # `extra` of a record that the console handler leaves out


class _NotPrintedElsewhere(logging.Filter):
    """Drop records that a console handler of their own logger already prints (submitit's logger has one), and
    those meant for log.txt only (``extra=LOG_FILE_ONLY``: the command line prints them itself)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """False for a log-file-only record, or when a logger between the record's and the root has a console
        handler."""
        if getattr(record, "log_file_only", False):
            return False
        current: logging.Logger | None = logging.getLogger(record.name)
        while current is not None and current is not logging.root:
            if any(_prints_to_console(h) for h in current.handlers):
                return False
            current = current.parent if current.propagate else None
        return True


class _RunLogFile(logging.FileHandler):
    """A log file whose failed writes (a full disk) are told once, in one line on stderr, not with a traceback per
    record; later records are still tried, so that the file goes on once there is room again."""

    def __init__(self, path: Path, delay: bool) -> None:
        super().__init__(path, delay=delay)
        self.failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        """Say once that the file cannot be written, and why; another error (a record that cannot be formatted) is
        reported as logging reports it."""
        err = sys.exc_info()[1]
        if isinstance(err, OSError):
            self._tell(err)
        else:
            super().handleError(record)

    def close(self) -> None:
        """Close the file; what could not be written to it is told as a failed record is, not raised."""
        try:
            super().close()
        except OSError as err:
            self._tell(err)

    def _tell(self, err: BaseException | None) -> None:
        if self.failed:
            return
        self.failed = True
        print(f"warning: cannot write {self.baseFilename} ({err}); the run goes on, its records only on the console",
              file=sys.stderr)  # fmt: skip


#: Where a run's warnings are written (named in errors that send the user to them).
LOG_FILES = "log.txt (and log_rank<N>.txt of the other ranks)"


def setup_run_logging(output_dir: Path, is_main: bool, rank: int = 0) -> list[logging.Handler]:
    """Rank 0 logs INFO to stdout and to ``output_dir/log.txt``; other ranks log warnings only, to stdout and to
    ``output_dir/log_rank<rank>.txt`` (made at their first warning: unreadable images of their share, say).

    The stdout handler is left out when the root logger already prints to the console (a launcher configured it),
    and skips records that their own logger prints already, so that no line appears twice. Returns the handlers
    added, for the caller to remove.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_dinov2", False):
            root.removeHandler(handler)
            handler.close()
    handlers: list[logging.Handler] = []
    if not any(_prints_to_console(h) for h in root.handlers):
        console = logging.StreamHandler(sys.stdout)
        console.addFilter(_NotPrintedElsewhere())
        console.setFormatter(logging.Formatter(FORMAT, "%H:%M:%S"))
        handlers.append(console)
    log_file = _RunLogFile(output_dir / ("log.txt" if is_main else f"log_rank{rank}.txt"), delay=not is_main)
    log_file.setFormatter(logging.Formatter(FORMAT, "%Y-%m-%d %H:%M:%S"))  # dated: a resume appends, days later
    handlers.append(log_file)
    for handler in handlers:
        handler._dinov2 = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    return handlers


class HeldRecords(logging.Handler):
    """Holds what the project's loggers say before the run's log handlers exist (the config's warnings and notes),
    to pass it on to them (log.txt) once they do; or, when the run stops before, to Python's last-resort handler
    (stderr), which prints the warnings."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.logger = logging.getLogger("dinov2")
        self.saved = (self.logger.level, self.logger.propagate)
        self.logger.addHandler(self)
        if self.logger.level == logging.NOTSET:  # (a level the user set stays)
            self.logger.setLevel(logging.INFO)
        self.logger.propagate = False

    def emit(self, record: logging.LogRecord) -> None:
        """Keep the record for :meth:`pass_on`."""
        self.records.append(record)

    def pass_on(self, configs: bool = True) -> None:
        """Stop holding; hand the records to the root logger's handlers (those below ``dinov2`` had them already),
        at the levels of the loggers that made them. ``configs=False`` drops the config's records (on the other
        ranks: rank 0 reports them)."""
        if self not in self.logger.handlers:
            return
        self.logger.removeHandler(self)
        self.logger.setLevel(self.saved[0])
        self.logger.propagate = self.saved[1]
        root = logging.getLogger()
        for record in self.records:
            if (configs or not record.name.startswith("dinov2.configs")) and self.logger.propagate and \
                    record.levelno >= logging.getLogger(record.name).getEffectiveLevel():  # fmt: skip
                root.handle(record)
