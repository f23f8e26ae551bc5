"""The overlay2 driver's format, exactly as dockerd 20.10 lays it out (moby ``daemon/graphdriver/overlay2``),
and the writes that make a layer's files in it.

The layout::

    overlay2/                     mode 0710
      l/                          mode 0700; l/<LINKID> -> ../<id>/diff (short names that keep mount options
                                  under a page)
      <id>/                       mode 0710
        diff/                     the layer's content; a whiteout is a 0/0 character device, an opaque
                                  directory carries trusted.overlay.opaque=y
        link                      <LINKID>, no newline
        lower                     l/<P1>:l/<P2>:…, nearest parent first, no newline (only with a parent)
        work/                     mode 0700 (only with a parent)
        committed                 empty (every layer that has a child)

Each write is idempotent (re-running it after a cut-off converges to the same result).  A layer's files leave
the durability to the caller, which syncs the filesystem once for a batch of layers before it records them.
"""

from __future__ import annotations

import os
import stat
from typing import List, Optional, Sequence, Tuple

import xattr

from migrator.fs import fsio
from migrator.paths import AUFS, AUFS_DIFF, TEMP_TREE, TREE, Paths

DIFF = "diff"
LINK = "link"
LOWER = "lower"
WORK = "work"
COMMITTED = "committed"
LINKS_DIR = "l"
MAX_LOWERS = 128  # overlay2's maxDepth: a layer may have at most this many ancestors
OPAQUE_XATTR = b"trusted.overlay.opaque"

LAYER_DIR_MODE = 0o710
TREE_MODE = 0o710
LINKS_DIR_MODE = 0o700
WORK_MODE = 0o700


def layer_files(has_parent: bool, has_child: bool) -> int:
    """The inodes a layer's own files take beside its content: ``<id>/``, ``link`` and ``l/<LINKID>``; with a
    parent ``lower`` and ``work/``; with a child ``committed``.  (``diff/`` is the content's root.)"""
    return 3 + (2 if has_parent else 0) + (1 if has_child else 0)


def diff_dir(tree_root: str, layer_id: str) -> str:
    return os.path.join(tree_root, layer_id, DIFF)


def layer_ids(tree_root: str, dir_fd: Optional[int] = None) -> List[str]:
    """The layers of a tree (its entries but ``l/``); ``tree_root`` below ``dir_fd`` when it is given."""
    fd, _state = fsio.open_dir_found(tree_root, dir_fd)
    if fd is None:
        return []
    try:
        return sorted(n for n in os.listdir(fd) if n != LINKS_DIR)
    finally:
        os.close(fd)


def moved_below(root_fd: int) -> List[Tuple[str, str]]:
    """``(id, diff)`` of each layer of ``overlay2.temp/`` or ``overlay2/`` (``diff`` below the root open as
    ``root_fd``) whose ``diff/`` is aufs data that left ``aufs/diff/<id>`` while ``aufs/layers/<id>`` stayed: what
    only the in-place strategy does, and what no tree may be removed with (a rollback without its state
    database moves them back)."""
    found = []
    for tree_root in (TEMP_TREE, TREE):
        for layer_id in layer_ids(tree_root, root_fd):
            diff = diff_dir(tree_root, layer_id)
            if (fsio.lexists(diff, root_fd) and not fsio.lexists(os.path.join(AUFS_DIFF, layer_id), root_fd)
                    and fsio.lexists(os.path.join(AUFS, "layers", layer_id), root_fd)):
                found.append((layer_id, diff))
    return found


def moved_from_aufs(paths: Paths) -> List[Tuple[str, str]]:
    """``moved_below`` the root, each ``diff`` a full path."""
    fd = fsio.open_dir(paths.root)
    try:
        return [(layer_id, os.path.join(paths.root, diff)) for layer_id, diff in moved_below(fd)]
    finally:
        os.close(fd)


def reads_as_whiteout(st: os.stat_result) -> bool:
    """A 0/0 character device: overlayfs reads it as a whiteout, whatever it was meant to be."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def prepare_tree(tree_root: str) -> None:
    """Create ``overlay2.temp/`` and its ``l/`` directory, durably (the layer steps assume both exist)."""
    parent, name = os.path.split(tree_root)
    pfd = fsio.open_dir(parent)
    try:
        fsio.make_dir(name, TREE_MODE, dir_fd=pfd)
        tfd = fsio.open_dir(name, pfd)
        try:
            fsio.make_dir(LINKS_DIR, LINKS_DIR_MODE, dir_fd=tfd)
            os.fsync(tfd)
        finally:
            os.close(tfd)
        os.fsync(pfd)
    finally:
        os.close(pfd)


def set_opaque_child(d_fd: int, name) -> None:
    """``trusted.overlay.opaque=y`` on the directory ``name`` in ``d_fd`` (opened without following a symlink)."""
    fd = fsio.open_dir(os.fsdecode(name), d_fd)
    try:
        xattr.set(fd, OPAQUE_XATTR, b"y")
    finally:
        os.close(fd)


def is_whiteout_device(d_fd: int, name) -> bool:
    try:
        st = os.stat(name, dir_fd=d_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return reads_as_whiteout(st)


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
    return ":".join(f"{LINKS_DIR}/{link}" for link in ancestor_link_ids).encode("ascii")


def write_layer_files(tree_root: str, layer_id: str, link_id: str, ancestor_link_ids: Sequence[str]) -> None:
    """``link``, ``lower``, ``work/`` and ``l/<LINKID>`` (each made in place when absent, replaced atomically
    when a cut-off attempt left one: ``fsio.create_file``); the caller's one ``syncfs`` for the batch makes them
    durable."""
    lfd = fsio.open_dir(os.path.join(tree_root, layer_id))
    try:
        fsio.create_file(lfd, LINK, link_id.encode("ascii"), 0o644)
        if ancestor_link_ids:
            fsio.create_file(lfd, LOWER, lower_value(ancestor_link_ids), 0o644)
            fsio.make_dir(WORK, WORK_MODE, dir_fd=lfd)
        links_fd = fsio.open_dir(os.path.join(tree_root, LINKS_DIR))
        try:
            fsio.create_symlink(links_fd, link_id, f"../{layer_id}/{DIFF}")
        finally:
            os.close(links_fd)
    finally:
        os.close(lfd)


def write_committed_marker(tree_root: str, layer_id: str, has_child: bool) -> None:
    """dockerd 20.10 marks every layer that has a child ``committed``."""
    if not has_child:
        return
    lfd = fsio.open_dir(os.path.join(tree_root, layer_id))
    try:
        fsio.create_file(lfd, COMMITTED, b"", 0o600)
    finally:
        os.close(lfd)
