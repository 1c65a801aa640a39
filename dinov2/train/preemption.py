"""Preemption: a stop signal becomes "checkpoint at the next iteration, then stop", agreed on by every rank."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger("dinov2")


class PreemptionHandler:
    """Turns SIGTERM, SIGUSR1, SIGHUP (a closed terminal or SSH session, which torchrun passes on) and a first Ctrl-C
    (SIGINT) into "checkpoint at the next iteration, then stop".

    The previously installed handler (for example submitit's requeue handler) is remembered and called
    after the checkpoint is written; after Ctrl-C the run exits with status 130 and a one-line message. A
    second Ctrl-C stops at once, without the checkpoint. Data-loader workers ignore the signals
    (``dinov2.data.loaders.init_worker``; a process forked with these handlers ignores them too): a scheduler
    or a terminal that signals every process of the job must neither kill them (the step would fail before the
    checkpoint) nor have them report a checkpoint they do not write. Torchrun turns a second Ctrl-C into SIGTERM,
    which checkpoints as the first did: under it (``offer_second_ctrl_c=False``) the log does not offer one.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)

    def __init__(self, is_main: bool = True, offer_second_ctrl_c: bool = True) -> None:
        # Rank 0 tells the user; other ranks (whose log shows warnings only) say it at INFO, so that a signal to
        # every process of a 64-rank job is one line, not 64.
        self.level = logging.WARNING if is_main else logging.INFO
        self.offer_second_ctrl_c = offer_second_ctrl_c
        self.received: int | None = None
        self.previous: dict[int, Any] = {}
        self._pid = os.getpid()

    def install(self) -> None:
        """Install the handlers (main thread only); SIGHUP is left ignored where it is (a run started with ``nohup``
        keeps running when its terminal closes)."""
        self._pid = os.getpid()
        for sig in self.SIGNALS:
            previous = signal.getsignal(sig)
            if sig == signal.SIGHUP and previous is signal.SIG_IGN:
                continue
            self.previous[sig] = previous
            signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Restore the handlers that were there before."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a forked data-loader worker
            return
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        offer = signum == signal.SIGINT and self.offer_second_ctrl_c
        hint = " (Ctrl-C again to stop at once, without it)" if offer else ""
        logger.log(self.level, "received %s: checkpointing at the end of this iteration%s", signal.Signals(signum).name,
                   hint)  # fmt: skip
        if self.received is None:
            self.received = signum

    def vote(self) -> list[int]:
        """This rank's vote per signal of ``SIGNALS`` (1 if it received it), to be summed over ranks."""
        return [int(self.received == sig) for sig in self.SIGNALS]

    def agree(self, votes: Sequence[int]) -> bool:
        """Whether to stop, from the votes summed over ranks, so that all ranks decide alike.

        The decision rests on the votes only (a signal arriving meanwhile counts at the next step); a rank that
        received nothing adopts the signal of another rank.
        """
        stop = any(votes)
        for sig, count in zip(self.SIGNALS, votes):
            if count and self.received is None:
                self.received = int(sig)
                logger.log(self.level, "%d other process(es) received %s: checkpointing at the end of this iteration",
                           count, signal.Signals(sig).name)  # fmt: skip
        return stop

    def replay_late_signal(self) -> None:
        """After :meth:`uninstall`: a signal that came after the last vote was read (so no rank stopped for it) is
        raised again, for the handler now restored to act on it, as on a signal that comes later."""
        if self.received is not None:
            signal.raise_signal(self.received)

    def forward_signal(self) -> None:
        """Hand the signal to the previous handler, or exit with 128 + signal number."""
        assert self.received is not None
        previous = self.previous.get(self.received)
        self.uninstall()
        if callable(previous) and previous is not signal.default_int_handler:  # Python's raises KeyboardInterrupt
            try:
                previous(self.received, None)
            except Exception as err:  # e.g. submitit's "not requeued: timed-out too many times"
                # Still a SystemExit: every rank leaves through the barrier the agreed stop ends with; `main`
                # raises the handler's error after it, for the launcher to record (submitit's job result).
                logger.warning("the stop ends here: %s: %s", type(err).__name__, err)
                stop = SystemExit(128 + self.received)
                stop.handler_error = err  # type: ignore[attr-defined]
                raise stop from err
        raise SystemExit(128 + self.received)
