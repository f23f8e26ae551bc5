"""The hardlink strategy's two heavy layer steps: rebuild a layer's tree beside aufs by hardlinking every
entry, then turn its aufs whiteouts into overlay2's.  aufs data is only read here.

Each step is idempotent (re-running it after a cut-off converges to the same result) and leaves the
durability to its caller, which syncs the filesystem once for a wave of layers before it records them.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Dict, List, Optional, Sequence, Tuple

import xattr

from migrator import checkpoints
from migrator.formats import aufs, lowerview, overlay2
from migrator.fs import fsio, tree
from migrator.scan.findings import StepResult


def build_layer_tree(src_dir: str, tree_root: str, layer_id: str, copy: bool = False,
                     lower_dirs: Sequence[str] = ()) -> StepResult:
    """Step ``discovered → linked``: rebuild ``<tree>/<id>/diff`` from scratch, hardlinking every entry
    (``copy``: copying it with its metadata, for a container's writable layer, which overlay2 changes in place).

    Whiteouts and aufs internals are left out here (but an internal below an image layer's root that holds
    data: ``aufs.keeps_for_tar_split``); the directories holding whiteouts or opaque markers are listed in the
    result, for the next step to convert (and to give their times, which a new whiteout device changes).
    Every other directory gets its times here, bottom-up.  A partial tree from an earlier, cut-off attempt is
    removed first, which is what makes the step idempotent.  ``lower_dirs``, the ancestors' aufs data
    (nearest first), are read to name each directory aufs merged further than overlayfs will
    (``lowerview.Merge``).
    """
    return start_layer(src_dir, tree_root, layer_id, copy=copy, lower_dirs=lower_dirs)[0]


def start_layer(src_dir: str, tree_root: str, layer_id: str, copy: bool = False,
                budget: Optional[int] = None, lower_dirs: Sequence[str] = ()) -> Tuple[StepResult, List[bytes]]:
    """The link step, or with a ``budget`` of entries its first part: remove a partial tree, make
    ``<id>/diff``, and link the layer until about ``budget`` entries are done; the subtrees it did not enter
    are left to ``link_part`` (each one's directory made, empty), so that several workers share a big layer.
    What it found, and the parts left.

    A part touches nothing outside its own directory, so every directory this walk entered gets its times
    here, as in a whole walk; each part sets its own root's."""
    tfd = fsio.open_dir(tree_root)
    try:
        fsio.remove_tree(os.path.join(tree_root, layer_id))
        os.mkdir(layer_id, 0o700, dir_fd=tfd)
        os.chmod(layer_id, overlay2.LAYER_DIR_MODE, dir_fd=tfd)
        lfd = fsio.open_dir(layer_id, tfd)
        try:
            os.mkdir(overlay2.DIFF, 0o700, dir_fd=lfd)
        finally:
            os.close(lfd)
    finally:
        os.close(tfd)
    return _link_walk(src_dir, tree_root, layer_id, b"", copy, budget, lower_dirs)


def link_part(src_dir: str, tree_root: str, layer_id: str, rel: bytes, budget: Optional[int] = None,
              lower_dirs: Sequence[str] = ()) -> Tuple[StepResult, List[bytes]]:
    """Link the subtree ``rel`` that an earlier walk left (its directory exists, empty), within ``budget``."""
    return _link_walk(src_dir, tree_root, layer_id, rel, False, budget, lower_dirs)


def merge(result: StepResult, part_results: Sequence[StepResult]) -> StepResult:
    """A layer's result with its parts' added."""
    for found in part_results:
        result.entries += found.entries
        result.findings.extend(found.findings)
        result.whiteout_dirs.extend(found.whiteout_dirs)
    return result


def _link_walk(src_dir: str, tree_root: str, layer_id: str, rel: bytes, copy: bool,
               budget: Optional[int], lower_dirs: Sequence[str]) -> Tuple[StepResult, List[bytes]]:
    result = StepResult()
    merges = lowerview.Tracker(src_dir, [lowerview.Lower(d) for d in lower_dirs], rel)
    parts: List[bytes] = []
    src_root = fsio.open_dir(src_dir, noatime=True)
    try:
        src_fd = tree.open_path(src_root, rel, noatime=True)
    finally:
        os.close(src_root)
    try:
        dst_root = fsio.open_dir(overlay2.diff_dir(tree_root, layer_id))
        try:
            dst_fd = tree.open_path(dst_root, rel)
        finally:
            os.close(dst_root)
        try:
            carry = _Copier(dst_fd, src_fd, result) if copy else _link_entry
            visit, leave = _linker(result, carry, rel, merges, image=not copy)
            cut = (lambda: result.entries >= budget) if budget is not None and not copy else None
            tree.walk_pair(src_fd, dst_fd, visit, leave, label=f"link {layer_id}", root_rel=rel, cut=cut,
                           left=parts)
            if copy:
                carry.note_links_outside(result)
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)
        merges.close()
    return result, parts


def _linker(result: StepResult, carry, root_rel: bytes, merges: lowerview.Tracker, image: bool):
    """The link walk's two callbacks.  A directory is made with mode 0755 and owned by the migrator (root),
    so its owner and mode are set only where the source's differ (most are root's and 0755): the source's
    own ``fstat``, taken once on the way in, also gives its times on the way out."""
    converting = set()  # directories left for the whiteout step, which sets their times
    made = {}  # rel: (uid, gid, mode) a new subdirectory of it gets
    times = {}  # rel: the source's times, for ``leave``
    made_mode = 0o755 & ~fsio.process_umask()

    def visit(s_fd: int, d_fd: int, rel: bytes) -> List[str]:
        st = os.fstat(s_fd)
        mode = stat.S_IMODE(st.st_mode)
        expected = made.get(rel.rpartition(b"/")[0]) if rel != root_rel else None
        if expected is None or (st.st_uid, st.st_gid) != expected[:2]:
            os.fchown(d_fd, st.st_uid, st.st_gid)
        if expected is None or mode != expected[2] or (st.st_uid, st.st_gid) != expected[:2]:
            os.fchmod(d_fd, mode)  # after fchown, which clears setuid and setgid bits
        setgid = bool(mode & stat.S_ISGID)  # a new subdirectory inherits the group and the bit
        made[rel] = (os.geteuid(), st.st_gid if setgid else os.getegid(), made_mode | (stat.S_ISGID if setgid else 0))
        times[rel] = (st.st_atime_ns, st.st_mtime_ns)
        for dropped in tree.copy_xattrs(s_fd, d_fd):
            result.note("dropped-overlay-xattr", rel, dropped.decode("ascii", "replace"))
        subdirs = []
        marks = result.marks(rel, image)
        with os.scandir(s_fd) as it:
            for entry in it:
                name = entry.name
                if not marks.ordinary(s_fd, entry):
                    continue
                result.entries += 1
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append(name)
                    continue
                result.note_zero_device(entry, rel)
                carry(s_fd, d_fd, name, rel, result)
        differs = merges.enter(rel, marks.opaque, marks.whited).differs
        if differs:
            result.note(differs, rel)
        for name in subdirs:
            os.mkdir(name, 0o755, dir_fd=d_fd)
        if marks.whiteouts:
            result.whiteout_dirs.append(rel)
            converting.add(rel)
        return subdirs

    def leave(s_fd: int, d_fd: int, rel: bytes) -> None:
        merges.leave(rel)
        made.pop(rel, None)
        dir_times = times.pop(rel)
        if rel not in converting:
            os.utime(d_fd, ns=dir_times)

    return visit, leave


def _link_entry(s_fd: int, d_fd: int, name: str, rel: bytes, result: StepResult) -> None:
    """Hardlink without following a symlink (``follow_symlinks=False``: linkat without AT_SYMLINK_FOLLOW)."""
    try:
        os.link(name, name, src_dir_fd=s_fd, dst_dir_fd=d_fd, follow_symlinks=False)
    except OSError as exc:
        if exc.errno != errno.EMLINK:
            raise
        tree.copy_entry(s_fd, d_fd, name)
        result.note("copied-link-limit", rel, name)


class _Copier:
    """Copies entries of a writable layer, keeping its hardlink groups: the second name of an inode is
    linked to the first copy (by its path below the layer root, through directories this step created)."""

    def __init__(self, root_fd: int, src_root_fd: int, result: StepResult) -> None:
        self.root_fd = root_fd
        self.first_copy: Dict[Tuple[int, int], bytes] = {}
        self.names: Dict[Tuple[int, int], List[bytes]] = {}  # names of each linked inode found in the layer
        self.links: Dict[Tuple[int, int], int] = {}  # and its link count
        result.note("copied-writable-layer", b"")
        result.plinks = aufs.pseudo_link_inodes(src_root_fd)

    def __call__(self, s_fd: int, d_fd: int, name: str, rel: bytes, result: StepResult) -> None:
        st = os.stat(name, dir_fd=s_fd, follow_symlinks=False)
        result.note_pseudo_link(st, rel, name)
        key = (st.st_dev, st.st_ino)
        here = (rel + b"/" + os.fsencode(name)).lstrip(b"/")
        if st.st_nlink > 1:
            self.names.setdefault(key, []).append(here)
            self.links[key] = st.st_nlink
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode) and key in self.first_copy:
            os.link(self.first_copy[key], name, src_dir_fd=self.root_fd, dst_dir_fd=d_fd, follow_symlinks=False)
            return
        tree.copy_entry(s_fd, d_fd, name)
        if st.st_nlink > 1:
            self.first_copy[key] = here

    def note_links_outside(self, result: StepResult) -> None:
        """A file of the layer that is also a name outside it (a hardlink into another layer: aufs showed both
        names as one inode) is copied like the rest, since overlay2 writes this layer in place: the copy is
        another inode.  Its pseudo-link (``.wh..wh.plnk``) is the one name outside that is not counted."""
        for key, names in self.names.items():
            if self.links[key] - len(names) - (1 if key[1] in result.plinks else 0) > 0:
                for here in names:
                    result.note("hardlink-into-another-layer-copied", b"/" + here)


def convert_whiteouts(src_dir: str, tree_root: str, layer_id: str, whiteout_dirs: Sequence[bytes],
                      lower_dirs: Sequence[str] = ()) -> StepResult:
    """Step ``linked → whiteouts-converted``: in each directory the link step listed, aufs whiteouts become 0/0
    character devices (where the directory is merged with one of ``lower_dirs``, the ancestors' aufs data:
    ``lowerview``) and an opaque marker becomes ``trusted.overlay.opaque=y``; then the directory gets its
    times (creating a device changed its mtime).  Existing devices and xattrs are accepted, so a re-run
    converges.  Directories are reached component by component with ``O_NOFOLLOW``.
    """
    lowers = [lowerview.Lower(d) for d in lower_dirs]
    result = StepResult()
    if not whiteout_dirs:
        return result
    src_root = fsio.open_dir(src_dir, noatime=True)
    try:
        dst_root = fsio.open_dir(overlay2.diff_dir(tree_root, layer_id))
        try:
            for rel in whiteout_dirs:
                s_fd = tree.open_path(src_root, rel, noatime=True)
                try:
                    d_fd = tree.open_path(dst_root, rel)
                    try:
                        merged = lowerview.is_merged(src_dir, lowers, rel)
                        _convert_dir(s_fd, d_fd, rel, result, merged)
                        tree.copy_dir_times(s_fd, d_fd)
                    finally:
                        os.close(d_fd)
                finally:
                    os.close(s_fd)
                checkpoints.reached(f"converted whiteouts {layer_id}")
        finally:
            os.close(dst_root)
    finally:
        os.close(src_root)
    return result


def _convert_dir(s_fd: int, d_fd: int, rel: bytes, result: StepResult, merged: bool) -> None:
    """Apply ``aufs.whiteout_actions`` of one directory in the new tree (aufs internals were left out by the
    link walk, which reported them)."""
    for found in aufs.whiteout_actions(tree.entry_kinds(s_fd), merged):
        if found.action == aufs.DROP_INTERNAL:  # reported by the link walk, which also linked those it kept
            continue
        if found.action == aufs.SET_OPAQUE:
            xattr.set(d_fd, overlay2.OPAQUE_XATTR, b"y")
        elif found.action == aufs.OPAQUE_CHILD:
            overlay2.set_opaque_child(d_fd, found.target)
        elif found.action == aufs.MAKE_WHITEOUT:
            st = os.stat(found.name, dir_fd=s_fd, follow_symlinks=False)
            overlay2.make_whiteout_device(d_fd, found.target, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                                          (st.st_atime_ns, st.st_mtime_ns))
        if found.finding:
            result.note(found.finding, rel, found.named)
        result.entries += 1
