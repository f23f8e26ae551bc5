"""The in-place run's walk, started before the heavy imports.

A new ``run --strategy inplace`` spends most of its time in two things that do not depend on each other: the
read-only walk of every layer (the kernel reading every directory) and importing SQLAlchemy.  So the CLI forks
the walkers first, and the plan takes their results when it gets there (``take``).  A result is only a hint:
it is used for a layer the plan also finds in ``aufs/diff``, and only when its walker finished without error;
anything missing is walked again.  A walk of a layer still in ``aufs/diff`` is valid whenever it ran: the
migration changes a layer's content only after the layer has left ``aufs/diff`` and its move is recorded.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
from typing import Dict, List, Tuple

from migrator import survey

_children: List[Tuple[int, int]] = []  # (pid, read end of its pipe)


def start(aufs_diff: str, jobs: int) -> None:
    """Fork ``jobs`` walkers over the directories of ``aufs_diff``, each taking every ``jobs``-th one."""
    try:
        names = sorted(os.listdir(aufs_diff))
    except OSError:
        return
    for k in range(max(1, jobs)):
        share = names[k::max(1, jobs)]
        if not share:
            continue
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the walker: never returns
            os.close(r)
            _walk(aufs_diff, share, w)
        os.close(w)
        _children.append((pid, r))


def _walk(aufs_diff: str, names: List[str], w: int) -> None:
    code = 1
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the migrator
        found = {}
        for name in names:
            path = os.path.join(aufs_diff, name)
            if os.path.isdir(path) and not os.path.islink(path):
                found[name] = survey.scan_layer(path)
        with os.fdopen(w, "wb") as out:
            pickle.dump(found, out)
        code = 0
    finally:
        os._exit(code)


def take() -> Dict[str, survey.LayerSurvey]:
    """What the walkers found; empty when none were started or they failed."""
    found: Dict[str, survey.LayerSurvey] = {}
    while _children:
        pid, r = _children.pop()
        with os.fdopen(r, "rb") as f:
            data = f.read()
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) == 0 and data:
            found.update(pickle.loads(data))
    return found
