"""Numbered crash points, for the fault-injection tests.

Every durable step of the migrator (a state recorded, a rename or fsync completed, a directory of a layer
walked) calls ``reached(label)``.  Two environment variables, read here and nowhere else, turn them into
test hooks; with neither set, ``reached`` only counts:

- ``AUFS2OVERLAY_CHECKPOINT_TRACE=PATH``: append ``N label`` for every checkpoint to PATH (to enumerate them);
- ``AUFS2OVERLAY_KILL_AT=N``: SIGKILL this process at the N-th checkpoint (1-based), a crash at that instant;
- ``AUFS2OVERLAY_STOP_AT=N``: SIGSTOP it there instead, so a test can copy the disk as a power cut would leave it;
- ``AUFS2OVERLAY_STOP_AT_START=1``: SIGSTOP this process (alone) once the command's code is imported, before it
  does any work, so a test can attach a tracer (the syscall fault suite) and send SIGCONT.

Layers are converted in worker processes, so the count lives in shared memory (inherited across fork) and a
kill or stop goes to the migrator's whole process group: with a hook set, the migrator makes itself a process
group leader at start, and a test stops or kills it all with ``os.killpg(pid, …)``.
"""

from __future__ import annotations

import multiprocessing
import os
import signal

_KILL_AT = int(os.environ.get("AUFS2OVERLAY_KILL_AT", "0") or 0)
_STOP_AT = int(os.environ.get("AUFS2OVERLAY_STOP_AT", "0") or 0)
_TRACE = os.environ.get("AUFS2OVERLAY_CHECKPOINT_TRACE") or None
_HOOKED = bool(_KILL_AT or _STOP_AT or _TRACE)
_shared = multiprocessing.get_context("fork").Value("q", 0) if _HOOKED else None
_count = 0
if _HOOKED and os.getpgrp() != os.getpid():
    os.setpgrp()


def reached(label: str) -> None:
    """Count one checkpoint; trace it, or kill or stop the whole migrator here, when a test asked for it."""
    global _count
    if _shared is None:
        _count += 1
        return
    with _shared.get_lock():
        _shared.value += 1
        n = _shared.value
        if _TRACE:
            with open(_TRACE, "a", encoding="utf-8", errors="backslashreplace") as f:
                f.write(f"{n} {label}\n")
        if n == _KILL_AT:
            os.killpg(os.getpgrp(), signal.SIGKILL)
        if n == _STOP_AT:
            os.killpg(os.getpgrp(), signal.SIGSTOP)


def started() -> None:
    """The command's code is imported and its work begins: stop here if a test asked to attach first."""
    if os.environ.get("AUFS2OVERLAY_STOP_AT_START") == "1":
        os.kill(os.getpid(), signal.SIGSTOP)
