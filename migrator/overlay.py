"""Writing the overlay2 tree, one layer step at a time, exactly as dockerd 20.10's overlay2 driver lays it out.

Each public function is one layer step.  It is idempotent (re-running it after a cut-off converges to the same
result) and returns only once its effects are on disk, so the caller may then record the state.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import xattr

from migrator import checkpoints, fsio, tree

WH_PREFIX = ".wh."
WH_META_PREFIX = ".wh..wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = b"trusted.overlay.opaque"

LAYER_DIR_MODE = 0o710
TREE_MODE = 0o710
LINKS_DIR_MODE = 0o700
WORK_MODE = 0o700


@dataclass
class StepResult:
    """What a step did, for the state record: entries carried over, findings worth reporting, and (link step)
    the directories that hold whiteouts or opaque markers, which the next step converts."""

    entries: int = 0
    findings: List[Tuple[str, str]] = field(default_factory=list)
    whiteout_dirs: List[bytes] = field(default_factory=list)

    def note(self, kind: str, rel: bytes, name: Optional[str] = None) -> None:
        path = rel + (b"/" + os.fsencode(name) if name is not None else b"")
        self.findings.append((kind, (path or b"/").decode("utf-8", "backslashreplace")))


def prepare_tree(tree_root: str) -> None:
    """Create ``overlay2.temp/`` and its ``l/`` directory, durably (the layer steps assume both exist)."""
    parent, name = os.path.split(tree_root)
    pfd = fsio.open_dir(parent)
    try:
        fsio.make_dir(name, TREE_MODE, dir_fd=pfd)
        tfd = fsio.open_dir(name, pfd)
        try:
            fsio.make_dir("l", LINKS_DIR_MODE, dir_fd=tfd)
            os.fsync(tfd)
        finally:
            os.close(tfd)
        os.fsync(pfd)
    finally:
        os.close(pfd)


def build_layer_tree(src_dir: str, tree_root: str, layer_id: str, copy: bool = False) -> StepResult:
    """Step ``discovered → linked``: rebuild ``<tree>/<id>/diff`` from scratch, hardlinking every entry
    (``copy``: copying it with its metadata, for a container's writable layer, which overlay2 changes in place).

    Whiteouts and aufs internals are left out here; the directories holding whiteouts or opaque markers are
    listed in the result, for the next step to convert (and to give their times, which a new whiteout device
    changes).  Every other directory gets its times here, bottom-up.  A partial tree from an earlier, cut-off
    attempt is removed first, which is what makes the step idempotent.
    """
    result = StepResult()
    tfd = fsio.open_dir(tree_root)
    try:
        fsio.remove_tree(os.path.join(tree_root, layer_id))
        os.mkdir(layer_id, 0o700, dir_fd=tfd)
        os.chmod(layer_id, LAYER_DIR_MODE, dir_fd=tfd)
        lfd = fsio.open_dir(layer_id, tfd)
        try:
            os.mkdir("diff", 0o700, dir_fd=lfd)
            src_fd = fsio.open_dir(src_dir, noatime=True)
            try:
                dst_fd = fsio.open_dir("diff", lfd)
                try:
                    carry = _Copier(dst_fd, result) if copy else _link_entry
                    visit, leave = _linker(result, carry)
                    tree.walk_pair(src_fd, dst_fd, visit, leave, label=f"link {layer_id}")
                finally:
                    os.close(dst_fd)
            finally:
                os.close(src_fd)
            fsio.syncfs(lfd)
        finally:
            os.close(lfd)
    finally:
        os.close(tfd)
    return result


def _linker(result: StepResult, carry):
    converting = set()  # directories left for the whiteout step, which sets their times

    def visit(s_fd: int, d_fd: int, rel: bytes) -> List[str]:
        for dropped in tree.copy_dir_meta(s_fd, d_fd):
            result.note("dropped-overlay-xattr", rel, dropped.decode("ascii", "replace"))
        subdirs = []
        has_whiteouts = False
        with os.scandir(s_fd) as it:
            for entry in it:
                name = entry.name
                if name.startswith(WH_PREFIX):
                    if not name.startswith(WH_META_PREFIX) or name == OPAQUE_MARKER:
                        has_whiteouts = True
                    else:
                        result.note("dropped-aufs-internal", rel, name)
                    continue
                result.entries += 1
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append(name)
                    continue
                note_zero_device(entry, rel, result)
                carry(s_fd, d_fd, name, rel, result)
        for name in subdirs:
            os.mkdir(name, 0o700, dir_fd=d_fd)
        if has_whiteouts:
            result.whiteout_dirs.append(rel)
            converting.add(rel)
        return subdirs

    def leave(s_fd: int, d_fd: int, rel: bytes) -> None:
        if rel not in converting:
            tree.copy_dir_times(s_fd, d_fd)

    return visit, leave


def note_zero_device(entry: os.DirEntry, rel: bytes, result: StepResult) -> None:
    """aufs shows a 0/0 character device as a device; overlayfs can only read it as a whiteout: report it.
    (Only entries that are neither files nor symlinks, by ``d_type``, are ``stat``-ed.)"""
    if not entry.is_file(follow_symlinks=False) and not entry.is_symlink():
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            result.note("device-0-0-reads-as-whiteout", rel, entry.name)


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

    def __init__(self, root_fd: int, result: StepResult) -> None:
        self.root_fd = root_fd
        self.first_copy: Dict[Tuple[int, int], bytes] = {}
        result.note("copied-writable-layer", b"")

    def __call__(self, s_fd: int, d_fd: int, name: str, rel: bytes, result: StepResult) -> None:
        st = os.stat(name, dir_fd=s_fd, follow_symlinks=False)
        key = (st.st_dev, st.st_ino)
        here = (rel + b"/" + os.fsencode(name)).lstrip(b"/")
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode) and key in self.first_copy:
            os.link(self.first_copy[key], name, src_dir_fd=self.root_fd, dst_dir_fd=d_fd, follow_symlinks=False)
            return
        tree.copy_entry(s_fd, d_fd, name)
        if st.st_nlink > 1:
            self.first_copy[key] = here


def convert_whiteouts(src_dir: str, tree_root: str, layer_id: str, whiteout_dirs: Sequence[bytes]) -> StepResult:
    """Step ``linked → whiteouts-converted``: in each directory the link step listed, aufs whiteouts become 0/0
    character devices and an opaque marker becomes ``trusted.overlay.opaque=y``; then the directory gets its
    times (creating a device changed its mtime).  Existing devices and xattrs are accepted, so a re-run
    converges.  Directories are reached component by component with ``O_NOFOLLOW``.
    """
    result = StepResult()
    lfd = fsio.open_dir(os.path.join(tree_root, layer_id))
    try:
        src_root = fsio.open_dir(src_dir, noatime=True)
        try:
            dst_root = fsio.open_dir("diff", lfd)
            try:
                for rel in whiteout_dirs:
                    s_fd = tree.open_path(src_root, rel, noatime=True)
                    try:
                        d_fd = tree.open_path(dst_root, rel)
                        try:
                            _convert_dir(s_fd, d_fd, rel, result)
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
        if whiteout_dirs:
            fsio.syncfs(lfd)
    finally:
        os.close(lfd)
    return result


def _convert_dir(s_fd: int, d_fd: int, rel: bytes, result: StepResult) -> None:
    with os.scandir(s_fd) as it:
        kinds = {entry.name: entry.is_dir(follow_symlinks=False) for entry in it}
    for name in kinds:
        if name == OPAQUE_MARKER:
            xattr.set(d_fd, OPAQUE_XATTR, b"y")
            result.entries += 1
        elif name.startswith(WH_META_PREFIX):
            continue
        elif name.startswith(WH_PREFIX):
            target = name[len(WH_PREFIX):]
            if target in ("", ".", ".."):
                result.note("ignored-bad-whiteout", rel, name)
            elif target in kinds:
                # The layer holds both <name> and .wh.<name>: its own entry stays; for a directory that means
                # nothing below shows through, i.e. an opaque directory.
                if kinds[target]:
                    set_opaque_child(d_fd, target)
                result.note("whiteout-beside-entry", rel, name)
            else:
                _make_whiteout(s_fd, d_fd, name, target)
            result.entries += 1


def set_opaque_child(d_fd: int, name) -> None:
    """``trusted.overlay.opaque=y`` on the directory ``name`` in ``d_fd`` (opened without following a symlink)."""
    fd = fsio.open_dir(os.fsdecode(name), d_fd)
    try:
        xattr.set(fd, OPAQUE_XATTR, b"y")
    finally:
        os.close(fd)


def _make_whiteout(s_fd: int, d_fd: int, wh_name: str, target: str) -> None:
    """A whiteout device named ``target`` with the aufs whiteout's owner, mode and times."""
    st = os.stat(wh_name, dir_fd=s_fd, follow_symlinks=False)
    make_whiteout_device(d_fd, target, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                         (st.st_atime_ns, st.st_mtime_ns))


def is_whiteout_device(d_fd: int, name) -> bool:
    try:
        st = os.stat(name, dir_fd=d_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def make_whiteout_device(d_fd: int, name, mode: int, uid: int, gid: int, times_ns: Tuple[int, int]) -> None:
    """A 0/0 character device ``name`` with this owner, mode and times; an existing one is accepted, so a re-run
    converges.  Each whiteout is a new inode: aufs hardlinks its whiteouts to one another, overlay2 must not."""
    try:
        os.mknod(name, stat.S_IFCHR | 0o600, os.makedev(0, 0), dir_fd=d_fd)
    except FileExistsError:
        if not is_whiteout_device(d_fd, name):
            raise
    os.chown(name, uid, gid, dir_fd=d_fd, follow_symlinks=False)
    os.chmod(name, mode, dir_fd=d_fd)
    os.utime(name, ns=times_ns, dir_fd=d_fd, follow_symlinks=False)


def lower_value(ancestor_link_ids: Sequence[str]) -> bytes:
    """``l/<P1>:l/<P2>:…``, nearest parent first, no trailing newline (a newline breaks every mount)."""
    return ":".join(f"l/{link}" for link in ancestor_link_ids).encode("ascii")


def write_layer_files(tree_root: str, layer_id: str, link_id: str, ancestor_link_ids: Sequence[str],
                      sync: bool = True) -> None:
    """Step ``whiteouts-converted → lowers-written``: ``link``, ``lower``, ``work/`` and ``l/<LINKID>``, each
    written atomically (temp and rename), then made durable together by one ``syncfs`` (``sync=False``: the
    caller syncs once for many layers before recording them)."""
    lfd = fsio.open_dir(os.path.join(tree_root, layer_id))
    try:
        fsio.atomic_write(lfd, "link", link_id.encode("ascii"), 0o644, sync=False)
        if ancestor_link_ids:
            fsio.atomic_write(lfd, "lower", lower_value(ancestor_link_ids), 0o644, sync=False)
            fsio.make_dir("work", WORK_MODE, dir_fd=lfd)
        links_fd = fsio.open_dir(os.path.join(tree_root, "l"))
        try:
            fsio.atomic_symlink(links_fd, link_id, f"../{layer_id}/diff", sync=False)
        finally:
            os.close(links_fd)
        if sync:
            fsio.syncfs(lfd)
    finally:
        os.close(lfd)


def write_committed_marker(tree_root: str, layer_id: str, has_child: bool, sync: bool = True) -> None:
    """Step ``lowers-written → committed``: dockerd 20.10 marks every layer that has a child ``committed``."""
    if not has_child:
        return
    lfd = fsio.open_dir(os.path.join(tree_root, layer_id))
    try:
        fsio.atomic_write(lfd, "committed", b"", 0o600, sync=False)
        if sync:
            fsio.syncfs(lfd)
    finally:
        os.close(lfd)
