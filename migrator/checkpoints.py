"""Numbered crash points, for the fault-injection tests.

Every durable step of the migrator (a state recorded, a rename or fsync completed, a directory of a layer
walked) calls ``reached(label)``.  Environment variables turn them into test hooks; ``arm`` reads them, once,
when a command starts, before it forks anything (nothing happens at import); unarmed, ``reached`` only counts:

- ``AUFS2OVERLAY_CHECKPOINT_TRACE=PATH``: append ``N label`` for every checkpoint to PATH (to enumerate them);
- ``AUFS2OVERLAY_KILL_AT=N``: SIGKILL this process at the N-th checkpoint (1-based), a crash at that instant;
- ``AUFS2OVERLAY_STOP_AT=N``: SIGSTOP it there instead, so a test can copy the disk as a power cut would leave it;
- ``AUFS2OVERLAY_STOP_AT_START=1``: SIGSTOP this process (alone) once the command's code is imported, before it
  does any work, so a test can attach a tracer (the syscall fault suite) and send SIGCONT.

Layers are converted in worker processes, so the count lives in shared memory (inherited across fork) and a
kill or stop goes to the migrator's whole process group: with a hook set, ``arm`` makes the migrator a process
group leader, and a test stops or kills it all with ``os.killpg(pid, …)``.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from typing import Any, Mapping, Optional

from migrator import interrupts


class _Hooks:
    """What ``arm`` read (a plain class: ``status`` imports this module, and dataclasses cost it 10 ms)."""

    def __init__(self, kill_at: int = 0, stop_at: int = 0, trace: Optional[str] = None) -> None:
        self.kill_at, self.stop_at, self.trace = kill_at, stop_at, trace
        self.shared: Any = None  # a multiprocessing.Value: the count, shared with the worker processes
        self.count = 0  # unarmed: this process's own count


_hooks = _Hooks()


def arm(environ: Mapping[str, str]) -> None:
    """Read the test hooks from ``environ``; with any set, count in shared memory and lead a process group."""
    global _hooks
    hooks = _Hooks(kill_at=int(environ.get("AUFS2OVERLAY_KILL_AT", "0") or 0),
                   stop_at=int(environ.get("AUFS2OVERLAY_STOP_AT", "0") or 0),
                   trace=environ.get("AUFS2OVERLAY_CHECKPOINT_TRACE") or None)
    if hooks.kill_at or hooks.stop_at or hooks.trace:
        hooks.shared = multiprocessing.get_context("fork").Value("q", 0)
        if os.getpgrp() != os.getpid():
            os.setpgrp()
    _hooks = hooks


def started(environ: Mapping[str, str]) -> None:
    """The command's code is imported and its work begins: stop here if a test asked to attach first."""
    if environ.get("AUFS2OVERLAY_STOP_AT_START") == "1":
        os.kill(os.getpid(), signal.SIGSTOP)


def reached(label: str) -> None:
    """Count one checkpoint; trace it, or kill or stop the whole migrator here, when a test asked for it.
    A checkpoint is a safe point: a stop signal received since is honoured here (``interrupts``)."""
    hooks = _hooks
    if hooks.shared is None:
        hooks.count += 1
        interrupts.check()
        return
    with hooks.shared.get_lock():
        hooks.shared.value += 1
        n = hooks.shared.value
        if hooks.trace:
            with open(hooks.trace, "a", encoding="utf-8", errors="backslashreplace") as f:
                f.write(f"{n} {label}\n")
        if n == hooks.kill_at:
            os.killpg(os.getpgrp(), signal.SIGKILL)
        if n == hooks.stop_at:
            os.killpg(os.getpgrp(), signal.SIGSTOP)
    interrupts.check()
