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
from migrator.formats import aufs, lowerview
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
    converting: List[Tuple[str, str]] = field(default_factory=list)  # what the whiteout step will find (plan)
    lowers: Tuple[str, ...] = ()  # the ancestors' data the walk read (``lowerview``), nearest first
    writable: bool = False  # walked as a container's own layer
    seen: Set[Tuple[int, int]] = field(default_factory=set, repr=False)


def scan_layer(diff_dir: str, writable: bool = False, lowers: Sequence[lowerview.Lower] = ()) -> LayerSurvey:
    """Walk one layer read-only (``O_NOATIME``, ``O_NOFOLLOW``, directory descriptors) and count it.

    ``.wh.`` directories are not entered (but an internal an image layer keeps: ``aufs.keeps_for_tar_split``);
    directories holding ``.wh.`` entries or carrying ``trusted.overlay.*`` xattrs are listed in
    ``whiteout_dirs``.  ``lowers``, the layer's ancestors (nearest first), are read to name each directory
    aufs merged further than overlayfs will (``lowerview.Merge``).
    """
    result = LayerSurvey(lowers=tuple(lower.path for lower in lowers), writable=writable)
    merges = lowerview.Tracker(diff_dir, lowers)

    def visit(fd: int, _none: None, rel: bytes) -> List[str]:
        st = os.fstat(fd)
        result.directories += 1
        result.directory_bytes += st.st_blocks * 512
        subdirs = []
        marked = any(n.startswith(tree.OVERLAY_XATTR_PREFIX) for n in tree.list_xattrs(fd))
        marks = result.marks(rel, not writable)
        with os.scandir(fd) as it:
            for entry in it:
                result.entries += 1
                if not marks.ordinary(fd, entry):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append(entry.name)
                else:
                    result.note_zero_device(entry, rel)
                    if writable:
                        _count_copy(entry, rel, result)
        merge = merges.enter(rel, marks.opaque, marks.whited)
        if merge.differs:
            result.note(merge.differs, rel)
        if marks.whiteouts:  # few directories: these are listed once more, for the conversion's own decision
            marked = True
            merged = merge.merged if rel else bool(lowers)  # as the conversion decides (lowerview.is_merged)
            _count_actions(aufs.whiteout_actions(tree.entry_kinds(fd), merged), rel, result)
        if marked:
            result.whiteout_dirs.append(rel)
        return subdirs

    fd = fsio.open_dir(diff_dir, noatime=True)
    try:
        if writable:
            result.plinks = aufs.pseudo_link_inodes(fd)
        tree.walk_pair(fd, None, visit, lambda _fd, _none, rel: merges.leave(rel))
    finally:
        os.close(fd)
        merges.close()
    result.seen = set()
    result.plinks = set()
    return result


def _count_actions(actions: List[aufs.WhiteoutAction], rel: bytes, result: LayerSurvey) -> None:
    """Count what the conversion will make, and keep what its step will find, for ``plan`` to show (the walk
    noted aufs's internals)."""
    found_by_step = StepResult()
    for found in actions:
        if found.action == aufs.MAKE_WHITEOUT:
            result.whiteouts += 1
        elif found.action in (aufs.SET_OPAQUE, aufs.OPAQUE_CHILD):
            result.opaque += 1
        if found.finding and found.action != aufs.DROP_INTERNAL:
            found_by_step.note(found.finding, rel, os.fsdecode(found.named))
    result.converting.extend(found_by_step.findings)


def scan_layers(where: Sequence[str], writable: Sequence[bool], lowers: Sequence[Sequence[lowerview.Lower]],
                jobs: int, close_in_workers: Sequence[int] = ()) -> List[LayerSurvey]:
    """``scan_layer`` of each directory, in ``jobs`` forked processes (the walk is system calls: processes,
    not threads, see docs/performance.md).  The caller must hold no database connection across the fork."""
    if jobs <= 1 or len(where) <= 1:
        return list(map(scan_layer, where, writable, lowers))
    with procs.pool(jobs, close_in_workers) as pool:
        return list(pool.map(scan_layer, where, writable, lowers))


def _count_copy(entry: os.DirEntry, rel: bytes, result: LayerSurvey) -> None:
    st = entry.stat(follow_symlinks=False)
    result.note_pseudo_link(st, rel, entry.name)
    if st.st_nlink > 1:
        key = (st.st_dev, st.st_ino)
        if key in result.seen:
            return
        result.seen.add(key)
    result.copy_inodes += 1
    if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
        result.copy_bytes += st.st_blocks * 512


