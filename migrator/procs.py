"""Worker processes: forked, dying with the migrator, never holding its lock.

Layers are walked and converted in processes, not threads: the work is one system call per entry, and two
threads handing the GIL back and forth around each of them spent more time in the kernel than they saved
(docs/performance.md).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import TYPE_CHECKING, Iterator, Sequence

from migrator import interrupts

if TYPE_CHECKING:
    import concurrent.futures

PR_SET_PDEATHSIG = 1
# Worker processes at once: the work is system calls that wait on the disk as much as on a core; measured on
# 2 cores, 2 beat 1 by a quarter and 4 or 8 lose again to contention (docs/performance.md).
DEFAULT_JOBS = max(2, min(4, os.cpu_count() or 1))


def die_with_parent() -> None:
    """In a forked child: a SIGKILL of the migrator must stop all of it (no orphan goes on writing)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before the prctl
        os._exit(1)


def _start_worker(close_fds: Sequence[int]) -> None:
    die_with_parent()
    interrupts.ignore_in_worker()
    for fd in close_fds:  # the root's flock belongs to the migrator: it must end with the migrator
        os.close(fd)


@contextlib.contextmanager
def pool(jobs: int, close_fds: Sequence[int] = ()) -> Iterator[concurrent.futures.ProcessPoolExecutor]:
    """``jobs`` forked workers, which close ``close_fds`` (the lock) at start.  On an error in the caller the
    running tasks finish and the queued ones are cancelled before it propagates, so no worker writes after it."""
    import concurrent.futures  # here: ``status`` imports this module for DEFAULT_JOBS alone
    import multiprocessing

    context = multiprocessing.get_context("fork")
    executor = concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context,
                                                      initializer=_start_worker, initargs=(tuple(close_fds),))
    try:
        yield executor
    except BaseException:
        executor.shutdown(wait=True, cancel_futures=True)
        raise
    executor.shutdown(wait=True)


IOPRIO_WHO_PROCESS = 1
IOPRIO_CLASS_IDLE = 3
IOPRIO_CLASS_SHIFT = 13
# ioprio_set's number, by machine (Linux's syscall tables; the generic table of aarch64 and riscv64 says 30).
SYS_IOPRIO_SET = {"x86_64": 251, "i386": 289, "i686": 289, "aarch64": 30, "riscv64": 30, "armv7l": 314,
                  "armv6l": 314, "armv8l": 314}


def lower_priority() -> str:
    """Nice 19 and the idle I/O class for this process (the workers forked later inherit both), so the host's
    applications keep the disk and the cores (``stage``, with the engine serving); what it set, in words."""
    os.setpriority(os.PRIO_PROCESS, 0, 19)
    number = SYS_IOPRIO_SET.get(os.uname().machine)
    if number is None:
        return f"nice 19; I/O priority left as it was (no ioprio_set number known for {os.uname().machine})"
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(number, IOPRIO_WHO_PROCESS, 0, IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT) != 0:
        return f"nice 19; I/O priority left as it was ({os.strerror(ctypes.get_errno())})"
    return "nice 19, idle I/O class"


def io_priority_class(pid: int = 0) -> int:
    """The I/O scheduling class of ``pid`` (0: this process), from ioprio_get, for the tests; -1 where unknown."""
    number = SYS_IOPRIO_SET.get(os.uname().machine)
    if number is None:
        return -1
    import ctypes

    value = ctypes.CDLL(None, use_errno=True).syscall(number + 1, IOPRIO_WHO_PROCESS, pid)
    return value >> IOPRIO_CLASS_SHIFT if value >= 0 else -1


_IMPORTED = time.monotonic()


def seconds_since_start() -> float:
    """How long ago this process started (from /proc: the interpreter's own start-up included); without
    /proc, since this module was imported."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        with open("/proc/uptime", "rb") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, IndexError, ValueError):
        return time.monotonic() - _IMPORTED
