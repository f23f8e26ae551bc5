"""The read-only walk of a layer: what ``plan`` counts, and what the in-place strategy's link step records.

One walk serves both: ``run`` plans first, and the in-place strategy takes the directories holding whiteouts
from the plan's walk instead of walking again.  Entries are told apart by ``d_type`` alone; only directories
are ``fstat``-ed (for the blocks a copy of them takes), and, in a container's writable layer (which the
hardlink strategy copies), every entry.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import List, Sequence, Set, Tuple

from migrator import procs
from migrator.formats import aufs
from migrator.fs import fsio, tree
from migrator.scan.findings import StepResult


@dataclass
class LayerSurvey(StepResult):
    """``entries`` and ``whiteout_dirs`` as the link step records them, and the counts ``plan`` adds up."""

    directories: int = 0
    directory_bytes: int = 0  # blocks the layer's directories take (a rebuilt directory takes about as many)
    whiteouts: int = 0  # whiteout devices the conversion makes (``aufs.MAKE_WHITEOUT``)
    opaque: int = 0  # directories it makes opaque (``aufs.SET_OPAQUE``, ``aufs.OPAQUE_CHILD``)
    copy_inodes: int = 0  # writable layer: non-directory inodes a copy makes (hardlink groups once)
    copy_bytes: int = 0
    seen: Set[Tuple[int, int]] = field(default_factory=set, repr=False)


def scan_layer(diff_dir: str, writable: bool = False) -> LayerSurvey:
    """Walk one layer read-only (``O_NOATIME``, ``O_NOFOLLOW``, directory descriptors) and count it.

    ``.wh.`` directories are not entered; directories holding ``.wh.`` entries or carrying ``trusted.overlay.*``
    xattrs are listed in ``whiteout_dirs``.
    """
    result = LayerSurvey()

    def visit(fd: int, _none: None, rel: bytes) -> List[str]:
        st = os.fstat(fd)
        result.directories += 1
        result.directory_bytes += st.st_blocks * 512
        subdirs = []
        marked = any(n.startswith(tree.OVERLAY_XATTR_PREFIX) for n in tree.list_xattrs(fd))
        whiteouts = False
        with os.scandir(fd) as it:
            for entry in it:
                name = entry.name
                result.entries += 1
                if aufs.whiteout_kind(name) is not None:
                    whiteouts = True
                elif entry.is_dir(follow_symlinks=False):
                    subdirs.append(name)
                else:
                    result.note_zero_device(entry, rel)
                    if writable:
                        _count_copy(entry, result)
        if whiteouts:  # few directories: these are listed once more, for the conversion's own decision
            marked = True
            _count_actions(aufs.whiteout_actions(tree.entry_kinds(fd)), result)
        if marked:
            result.whiteout_dirs.append(rel)
        return subdirs

    fd = fsio.open_dir(diff_dir, noatime=True)
    try:
        tree.walk_pair(fd, None, visit)
    finally:
        os.close(fd)
    result.seen = set()
    return result


def _count_actions(actions: List[aufs.WhiteoutAction], result: LayerSurvey) -> None:
    for found in actions:
        if found.action == aufs.MAKE_WHITEOUT:
            result.whiteouts += 1
        elif found.action in (aufs.SET_OPAQUE, aufs.OPAQUE_CHILD):
            result.opaque += 1


def scan_layers(where: Sequence[str], writable: Sequence[bool], jobs: int,
                close_in_workers: Sequence[int] = ()) -> List[LayerSurvey]:
    """``scan_layer`` of each directory, in ``jobs`` forked processes (the walk is system calls: processes,
    not threads, see docs/performance.md).  The caller must hold no database connection across the fork."""
    if jobs <= 1 or len(where) <= 1:
        return list(map(scan_layer, where, writable))
    with procs.pool(jobs, close_in_workers) as pool:
        return list(pool.map(scan_layer, where, writable))


def _count_copy(entry: os.DirEntry, result: LayerSurvey) -> None:
    st = entry.stat(follow_symlinks=False)
    if st.st_nlink > 1:
        key = (st.st_dev, st.st_ino)
        if key in result.seen:
            return
        result.seen.add(key)
    result.copy_inodes += 1
    if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
        result.copy_bytes += st.st_blocks * 512


