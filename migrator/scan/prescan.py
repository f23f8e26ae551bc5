"""The in-place run's walk, started before the heavy imports.

A new ``run --strategy inplace`` spends most of its time in two things that do not depend on each other: the
read-only walk of every layer (the kernel reading every directory) and importing SQLAlchemy.  So the CLI forks
the walkers first, and the plan takes their results when it gets there (``take``).  A result is only a hint:
it is used for a layer the plan also finds in ``aufs/diff``, and only when its walker finished without error;
anything missing is walked again.  ``start`` returns the walk, which the CLI hands to the command as an
argument.  A walk of a layer still in ``aufs/diff`` is valid whenever it ran: the
migration changes a layer's content only after the layer has left ``aufs/diff`` and its move is recorded.
"""

from __future__ import annotations

import os
import pickle
import time
from typing import Dict, List, Optional, Tuple

from migrator import interrupts, procs
from migrator.formats import aufs, lowerview
from migrator.fs import fsio
from migrator.scan import survey

COLD_WALKERS_PER_JOB = 4
COLD_READ_SECONDS = 25e-6  # a directory read from memory takes a few microseconds, from a disk 50 and more


class EarlyWalk:
    """The walkers started by ``start``: (pid, read end of its pipe) each."""

    def __init__(self, children: List[Tuple[int, int]]) -> None:
        self.children = children

    def take(self) -> Dict[str, survey.LayerSurvey]:
        """What the walkers found; empty when they failed.  Reaps them: a second call finds nothing."""
        found: Dict[str, survey.LayerSurvey] = {}
        while self.children:
            pid, r = self.children.pop()
            with os.fdopen(r, "rb") as f:
                data = f.read()
            _, status = os.waitpid(pid, 0)
            if os.waitstatus_to_exitcode(status) == 0 and data:
                found.update(pickle.loads(data))
        return found


def start(aufs_diff: str, jobs: int) -> Optional[EarlyWalk]:
    """Fork the walkers over the directories of ``aufs_diff``, each taking every n-th one: ``jobs`` of them,
    or ``COLD_WALKERS_PER_JOB`` times as many when the layers are not in the page cache (``_cold``)."""
    try:
        names = sorted(os.listdir(aufs_diff))
    except OSError:
        return None
    children = []
    n = max(1, jobs) * (COLD_WALKERS_PER_JOB if _cold(aufs_diff, names) else 1)
    for k in range(n):
        share = names[k::n]
        if not share:
            continue
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the walker: never returns
            os.close(r)
            _walk(aufs_diff, share, w)
        os.close(w)
        children.append((pid, r))
    return EarlyWalk(children)


def _cold(aufs_diff: str, names: List[str]) -> bool:
    """Whether the layers' directories come from the disk (as at boot, when the migration usually runs).

    A cold walk waits on the disk, not the CPU, and more readers at once make it faster (1.7 s with 2, 1.2 s
    with 8 on the benchmark tree); a walk from memory is CPU-bound, and more processes than cores only add
    their own cost (docs/performance.md).  Reading the first layers' top directories tells the two apart; the
    walkers would read them anyway."""
    sample = names[:16]
    started = time.monotonic()
    for name in sample:
        try:
            os.listdir(os.path.join(aufs_diff, name))
        except OSError:
            pass
    return time.monotonic() - started > COLD_READ_SECONDS * max(1, len(sample))


def _ancestors(aufs_diff: str, name: str) -> List[lowerview.Lower]:
    """The layer's ancestors as its layers file names them (the plan walks it again if discovery finds
    otherwise, or the file cannot be read)."""
    try:
        data = fsio.read_small(os.path.join(os.path.dirname(aufs_diff), "layers", name), aufs.LAYERS_FILE_MAX)[0]
        return [lowerview.Lower(os.path.join(aufs_diff, a)) for a in aufs.parse_layers_file(data)]
    except (OSError, ValueError, fsio.NotSmallFile):
        return []


def _walk(aufs_diff: str, names: List[str], w: int) -> None:
    code = 1
    try:
        procs.die_with_parent()
        interrupts.ignore_in_worker()
        found = {}
        for name in names:
            path = os.path.join(aufs_diff, name)
            if os.path.isdir(path) and not os.path.islink(path):
                found[name] = survey.scan_layer(path, False, _ancestors(aufs_diff, name))
        with os.fdopen(w, "wb") as out:
            pickle.dump(found, out)
        code = 0
    finally:
        os._exit(code)
