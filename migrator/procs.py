"""Worker processes: forked, dying with the migrator, never holding its lock.

Layers are walked and converted in processes, not threads: the work is one system call per entry, and two
threads handing the GIL back and forth around each of them spent more time in the kernel than they saved
(docs/performance.md).
"""

from __future__ import annotations

import contextlib
import os
import signal
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
