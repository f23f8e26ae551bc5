"""The in-place strategy's moves: a layer from ``aufs/diff/<id>`` into the new tree and back, and each journaled
change to its aufs data, made and undone (the journal itself is ``inplace_journal.py``).

Nothing here syncs: the strategy syncs the filesystem once for a wave of layers before it records them.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Callable, Optional, Sequence, Tuple

import xattr

from migrator import checkpoints
from migrator.errors import MigratorError
from migrator.formats import overlay2
from migrator.fs import fsio, tree
from migrator.paths import Paths
from migrator.strategies.inplace_journal import DROP_XATTR, MAKE_WHITEOUT, OPAQUE_CHILD, SET_OPAQUE, Change, DirTimes


def diff_location(aufs_diff: str, tree_root: str, layer_id: str) -> str:
    """Where the layer's data is now: still in ``aufs/diff`` or already moved into the new tree."""
    src = os.path.join(aufs_diff, layer_id)
    return src if fsio.lexists(src) else overlay2.diff_dir(tree_root, layer_id)


def moved_location(tree_roots: Sequence[str], layer_id: str) -> str:
    """Where a moved layer's data is: in the tree being built, or in the one renamed into place (the first
    of ``tree_roots`` when it is in neither)."""
    for tree_root in tree_roots:
        path = overlay2.diff_dir(tree_root, layer_id)
        if fsio.lexists(path):
            return path
    return overlay2.diff_dir(tree_roots[0], layer_id)


def move_layer(aufs_diff: str, tree_root: str, layer_id: str) -> None:
    """Step ``discovered → linked``: ``aufs/diff/<id>`` becomes ``<tree>/<id>/diff`` (one rename).

    Not synced here: the caller syncs the filesystem once for all the layers it moved before recording them.
    """
    tfd = fsio.open_dir(tree_root)
    try:
        fsio.make_dir(layer_id, overlay2.LAYER_DIR_MODE, dir_fd=tfd)
        lfd = fsio.open_dir(layer_id, tfd)
        try:
            afd = fsio.open_dir(aufs_diff)
            try:
                here = _lexists_at(afd, layer_id)
                there = _lexists_at(lfd, overlay2.DIFF)
                if here and there:
                    raise MigratorError(f"layer {layer_id} is both in {aufs_diff} and in {tree_root}; "
                                        "refusing to guess which is the layer")
                if not here and not there:
                    raise MigratorError(f"layer {layer_id} is neither in {aufs_diff} nor in {tree_root}")
                if here:
                    os.rename(layer_id, overlay2.DIFF, src_dir_fd=afd, dst_dir_fd=lfd)
            finally:
                os.close(afd)
        finally:
            os.close(lfd)
    finally:
        os.close(tfd)
    checkpoints.reached(f"moved layer {layer_id}")


def apply_changes(diff_dir: str, stash_dir: str, layer_id: str, changes: Sequence[Change],
                  times: Sequence[DirTimes]) -> None:
    """Make every journaled change; each is idempotent (a change already made is recognised and kept), so a
    cut-off run re-applies the whole journal.  Not synced here: the caller syncs before recording the state."""
    root_fd = fsio.open_dir(diff_dir)
    stash_fd = fsio.open_dir(stash_dir)
    try:
        for i, change in enumerate(changes):
            fd = tree.open_path(root_fd, change.dir)
            try:
                if change.name is not None:
                    _stash(fd, stash_fd, change)
                _make(fd, change)
            finally:
                os.close(fd)
            checkpoints.reached(f"changed in place {layer_id} {i}")
        _set_times(root_fd, times)
    finally:
        os.close(stash_fd)
        os.close(root_fd)


def _stash(fd: int, stash_fd: int, change: Change) -> None:
    if _lexists_at(fd, change.name):
        if _lexists_at(stash_fd, change.stash):
            raise MigratorError(f"stash entry {change.stash} exists and so does {change.name!r}")
        os.rename(change.name, os.fsencode(change.stash), src_dir_fd=fd, dst_dir_fd=stash_fd)
    elif not _lexists_at(stash_fd, change.stash):
        raise MigratorError(f"journaled entry {(change.dir + b'/' + change.name)!r} is neither in place nor stashed")


def _make(fd: int, change: Change) -> None:
    if change.action == MAKE_WHITEOUT:
        overlay2.make_whiteout_device(fd, change.target, change.mode, change.uid, change.gid,
                             (change.atime_ns, change.mtime_ns))
    elif change.action == SET_OPAQUE:
        xattr.set(fd, overlay2.OPAQUE_XATTR, b"y")
    elif change.action == OPAQUE_CHILD:
        overlay2.set_opaque_child(fd, change.target)
    elif change.action == DROP_XATTR:
        _put_xattr(fd, change.target, None)


def undo_layer(aufs_diff: str, diff_dir: str, stash_dir: str, layer_id: str, changes: Sequence[Change],
               times: Sequence[DirTimes], layer_times: Optional[Tuple[int, int]],
               progress: Callable[[str], None]) -> None:
    """Undo every journaled change in reverse order, give the directories their times, rename the layer back
    to ``aufs/diff/<id>``.  Idempotent: a layer already back is left alone.  Not synced: the caller syncs."""
    afd = fsio.open_dir(aufs_diff)
    try:
        if _lexists_at(afd, layer_id):
            if fsio.lexists(diff_dir):
                raise MigratorError(f"layer {layer_id} is both in {aufs_diff} and at {diff_dir}; "
                                    "refusing to guess which is the layer")
            return
        if not fsio.lexists(diff_dir):
            raise MigratorError(f"layer {layer_id} is gone from {diff_dir} (removed since the migration?); "
                                "its aufs data cannot be given back")
        root_fd = fsio.open_dir(diff_dir)
        try:
            stash_fd = fsio.open_dir(stash_dir) if changes else None
            try:
                for change in reversed(changes):
                    fd = tree.open_path(root_fd, change.dir)
                    try:
                        _unmake(fd, change)
                        if change.name is not None:
                            _unstash(fd, stash_fd, change)
                    finally:
                        os.close(fd)
            finally:
                if stash_fd is not None:
                    os.close(stash_fd)
            _set_times(root_fd, times)
            if layer_times is not None:
                os.utime(root_fd, ns=layer_times)
        finally:
            os.close(root_fd)
        parent = fsio.open_dir(os.path.dirname(diff_dir))
        try:
            os.rename(overlay2.DIFF, layer_id, src_dir_fd=parent, dst_dir_fd=afd)
        finally:
            os.close(parent)
    finally:
        os.close(afd)
    progress(f"layer {layer_id} back in aufs/diff")
    checkpoints.reached(f"moved back layer {layer_id}")


def _unmake(fd: int, change: Change) -> None:
    if change.action == MAKE_WHITEOUT:
        if overlay2.is_whiteout_device(fd, change.target):
            os.unlink(change.target, dir_fd=fd)
    elif change.action == SET_OPAQUE:
        _put_xattr(fd, overlay2.OPAQUE_XATTR, change.xattr_before)
    elif change.action == OPAQUE_CHILD:
        child = fsio.open_dir(os.fsdecode(change.target), fd)
        try:
            _put_xattr(child, overlay2.OPAQUE_XATTR, change.xattr_before)
        finally:
            os.close(child)
    elif change.action == DROP_XATTR:
        _put_xattr(fd, change.target, change.xattr_before)


def _unstash(fd: int, stash_fd: int, change: Change) -> None:
    if _lexists_at(stash_fd, change.stash):
        if _lexists_at(fd, change.name):
            raise MigratorError(f"cannot put back {(change.dir + b'/' + change.name)!r}: the name is taken")
        st = os.stat(change.stash, dir_fd=stash_fd, follow_symlinks=False)
        if change.kind and (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) != (
                change.kind, change.mode, change.uid, change.gid):
            raise MigratorError(f"stash entry {change.stash} is not the {(change.dir + b'/' + change.name)!r} the "
                                "journal recorded (type, mode or owner changed)")
        os.rename(os.fsencode(change.stash), change.name, src_dir_fd=stash_fd, dst_dir_fd=fd)


def _set_times(root_fd: int, times: Sequence[DirTimes]) -> None:
    for t in times:
        fd = tree.open_path(root_fd, t.dir)
        try:
            os.utime(fd, ns=(t.atime_ns, t.mtime_ns))
        finally:
            os.close(fd)


def _lexists_at(dir_fd: int, name) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _put_xattr(fd: int, name: bytes, value: Optional[bytes]) -> None:
    """Set ``name`` to ``value``, or make sure it is absent when ``value`` is None."""
    if value is not None:
        xattr.set(fd, name, value)
        return
    try:
        xattr.remove(fd, name)
    except OSError as exc:
        if exc.errno != errno.ENODATA:
            raise


def sync_moved_back(paths: Paths) -> None:
    """Make the layers' return durable, and make sure none is left in a tree about to be removed."""
    left = overlay2.moved_from_aufs(paths)
    if left:
        raise MigratorError(f"layer {left[0][0]} is still at {left[0][1]}; not removing the tree that holds it")
    fd = fsio.open_dir(paths.root)
    try:
        fsio.syncfs(fd)
    finally:
        os.close(fd)
