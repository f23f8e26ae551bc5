"""Numbered crash points, for the fault-injection tests.

Every durable step of the migrator (a state recorded, a rename or fsync completed, a directory of a layer
walked) calls ``reached(label)``.  Two environment variables, read here and nowhere else, turn them into
test hooks; with neither set, ``reached`` only counts:

- ``AUFS2OVERLAY_CHECKPOINT_TRACE=PATH``: append ``N label`` for every checkpoint to PATH (to enumerate them);
- ``AUFS2OVERLAY_KILL_AT=N``: SIGKILL this process at the N-th checkpoint (1-based), a crash at that instant;
- ``AUFS2OVERLAY_STOP_AT=N``: SIGSTOP it there instead, so a test can copy the disk as a power cut would leave it.
"""

from __future__ import annotations

import os
import signal
import threading

_KILL_AT = int(os.environ.get("AUFS2OVERLAY_KILL_AT", "0") or 0)
_STOP_AT = int(os.environ.get("AUFS2OVERLAY_STOP_AT", "0") or 0)
_TRACE = os.environ.get("AUFS2OVERLAY_CHECKPOINT_TRACE") or None
_count = 0
_lock = threading.Lock()


def reached(label: str) -> None:
    """Count one checkpoint; trace it or die here when a test asked for it (layers run in threads: the
    count is taken under a lock, and a kill or stop takes the whole process at that instant)."""
    global _count
    with _lock:
        _count += 1
        n = _count
        if _TRACE:
            with open(_TRACE, "a", encoding="utf-8", errors="backslashreplace") as f:
                f.write(f"{n} {label}\n")
        if n == _KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)
        if n == _STOP_AT:
            os.kill(os.getpid(), signal.SIGSTOP)
