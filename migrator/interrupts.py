"""SIGINT, SIGTERM and SIGHUP: a request to stop, honoured at the next safe point.

A handler that raises where the signal lands can cut a lock's release or a pool's bookkeeping in half (a ^C
once ended in ``RuntimeError: release unlocked lock`` inside ``concurrent.futures``, and a traceback).  So the
handler only notes the signal, and ``check`` raises ``Stopped`` where stopping is as safe as a power cut is:
at every checkpoint (``checkpoints.reached``: a state recorded, a rename, fsync or walked directory done), at
each progress line, and between the pool's results.  The migrator then unwinds normally (the pool lets its
running chunks finish and cancels the rest), says so in one line and in the log, and exits ``128 + signal``.

Worker processes ignore the three signals (``ignore_in_worker``): a terminal's ^C, and a stop sent to the
whole process group, reach them too, and their work ends with the migrator's (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import signal
from typing import Optional

STOPPING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

_pending: Optional[int] = None


class Stopped(KeyboardInterrupt):
    """Raised at a safe point after a stop signal (a ``KeyboardInterrupt``, so no ``except Exception`` keeps it)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def install() -> None:
    """In the migrator's main process, before any work."""
    for signum in STOPPING:
        signal.signal(signum, _note)


def _note(signum: int, _frame: object) -> None:
    global _pending
    if _pending is None:
        _pending = signum


def check() -> None:
    """Raise ``Stopped`` if a stop was asked for."""
    if _pending is not None:
        raise Stopped(_pending)


def ignore_in_worker() -> None:
    for signum in STOPPING:
        signal.signal(signum, signal.SIG_IGN)
