"""The in-place strategy: each ``aufs/diff/<id>`` is renamed into the new tree and converted where it stands.

No entry is copied or linked, so the cost is one rename per layer plus a read-only walk that finds the
directories holding aufs whiteouts (``d_type`` is enough; nothing is ``stat``-ed).  What this strategy changes
is aufs data, so every change is journaled before it is made, and made so that it can be undone exactly:

- an aufs entry (``.wh.<name>``, ``.wh..wh..opq``, ``.wh..wh.plnk``, …) is never deleted: it is *renamed* into
  the layer's stash in the work area, which keeps its inode, data, owner, times, xattrs and every hardlink
  among aufs whiteouts (aufs links them to one another and to ``.wh..wh.aufs``); rollback renames it back;
- a whiteout device made beside it, or ``trusted.overlay.opaque`` set on a directory, is undone by removing
  it or putting back the xattr value the journal recorded;
- each touched directory gets back the times the journal recorded.

The journal is a list of ``Change`` rows and ``DirTimes`` rows per layer, stored in the state database and,
as a copy for a rollback without the database, as ``journal.json`` in the layer's stash.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import xattr

from migrator import checkpoints, fsio, tree
from migrator.errors import MigratorError
from migrator.overlay import (
    LAYER_DIR_MODE,
    OPAQUE_MARKER,
    OPAQUE_XATTR,
    WH_META_PREFIX,
    WH_PREFIX,
    StepResult,
    is_whiteout_device,
    make_whiteout_device,
    set_opaque_child,
)

JOURNAL_FILE = "journal.json"

# What a journaled change does besides moving the aufs entry (if any) into the stash.
WHITEOUT = "whiteout"  # make a 0/0 character device named ``target``
OPAQUE = "opaque"  # set trusted.overlay.opaque=y on the directory
OPAQUE_CHILD = "opaque-child"  # set it on the child directory ``target`` (a whiteout beside its own entry)
STASH = "stash"  # nothing more: an aufs internal, or a whiteout that whites out nothing
DROP_XATTR = "drop-xattr"  # remove the directory's trusted.overlay.* xattr ``target`` (it would steer overlayfs)


@dataclass
class Change:
    """One change to what was aufs data, with what it changes as it was found."""

    dir: bytes  # relative to the layer root, b"" for the root itself
    name: Optional[bytes]  # the aufs entry moved to the stash (None: nothing is moved)
    action: str
    target: Optional[bytes]
    stash: Optional[str]  # the entry's name in the layer's stash
    kind: int = 0  # the entry's file type (S_IFMT bits), as found
    mode: int = 0
    uid: int = 0
    gid: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    xattr_before: Optional[bytes] = None  # OPAQUE, OPAQUE_CHILD, DROP_XATTR: the value before (None: absent)
    xattrs: Optional[bytes] = None  # the moved entry's own xattrs, as found (JSON of hex pairs)


@dataclass
class DirTimes:
    dir: bytes
    atime_ns: int
    mtime_ns: int


# -- the link step: move the layer in (``survey.scan_layer`` finds its whiteouts) ------------------------------


def diff_location(aufs_diff: str, tree_root: str, layer_id: str) -> str:
    """Where the layer's data is now: still in ``aufs/diff`` or already moved into the new tree."""
    src = os.path.join(aufs_diff, layer_id)
    return src if fsio.lexists(src) else os.path.join(tree_root, layer_id, "diff")


def moved_location(tree_roots: Sequence[str], layer_id: str) -> str:
    """Where a moved layer's data is: in the tree being built, or in the one renamed into place (the first
    of ``tree_roots`` when it is in neither)."""
    for tree_root in tree_roots:
        path = os.path.join(tree_root, layer_id, "diff")
        if fsio.lexists(path):
            return path
    return os.path.join(tree_roots[0], layer_id, "diff")


def move_layer(aufs_diff: str, tree_root: str, layer_id: str) -> None:
    """Step ``discovered → linked``: ``aufs/diff/<id>`` becomes ``<tree>/<id>/diff`` (one rename).

    Not synced here: the caller syncs the filesystem once for all the layers it moved before recording them.
    """
    tfd = fsio.open_dir(tree_root)
    try:
        fsio.make_dir(layer_id, LAYER_DIR_MODE, dir_fd=tfd)
        lfd = fsio.open_dir(layer_id, tfd)
        try:
            afd = fsio.open_dir(aufs_diff)
            try:
                here = _lexists_at(afd, layer_id)
                there = _lexists_at(lfd, "diff")
                if here and there:
                    raise MigratorError(f"layer {layer_id} is both in {aufs_diff} and in {tree_root}; "
                                        "refusing to guess which is the layer")
                if not here and not there:
                    raise MigratorError(f"layer {layer_id} is neither in {aufs_diff} nor in {tree_root}")
                if here:
                    os.rename(layer_id, "diff", src_dir_fd=afd, dst_dir_fd=lfd)
            finally:
                os.close(afd)
        finally:
            os.close(lfd)
    finally:
        os.close(tfd)
    checkpoints.reached(f"moved layer {layer_id}")


# -- the whiteout step: journal, then convert ----------------------------------------------------------------


def plan_changes(diff_dir: str, dirs: Sequence[bytes]) -> Tuple[List[Change], List[DirTimes], StepResult]:
    """Read the directories the link step listed and decide every change, before any is made."""
    changes: List[Change] = []
    times: List[DirTimes] = []
    result = StepResult()
    root_fd = fsio.open_dir(diff_dir, noatime=True)
    try:
        for rel in dirs:
            fd = tree.open_path(root_fd, rel, noatime=True)
            try:
                st = os.fstat(fd)
                times.append(DirTimes(rel, st.st_atime_ns, st.st_mtime_ns))
                _plan_dir(fd, rel, changes, result)
            finally:
                os.close(fd)
    finally:
        os.close(root_fd)
    for n, change in enumerate(c for c in changes if c.name is not None):
        change.stash = str(n)
    return changes, times, result


def _plan_dir(fd: int, rel: bytes, changes: List[Change], result: StepResult) -> None:
    for name in tree.list_xattrs(fd):
        if name.startswith(tree.OVERLAY_XATTR_PREFIX):
            changes.append(Change(rel, None, DROP_XATTR, name, None, xattr_before=xattr.get(fd, name)))
            result.note("dropped-overlay-xattr", rel, name.decode("ascii", "replace"))
    with os.scandir(fd) as it:
        kinds = {os.fsencode(e.name): e.is_dir(follow_symlinks=False) for e in it}
    for name in kinds:
        if not name.startswith(WH_PREFIX.encode()):
            continue
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        found = dict(kind=stat.S_IFMT(st.st_mode), xattrs=_entry_xattrs(fd, name),
                     mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid, atime_ns=st.st_atime_ns,
                     mtime_ns=st.st_mtime_ns)
        target = name[len(WH_PREFIX):]
        if name == OPAQUE_MARKER.encode():
            changes.append(Change(rel, name, OPAQUE, None, None, xattr_before=_get_xattr(fd, OPAQUE_XATTR),
                                  **found))
            result.entries += 1
        elif name.startswith(WH_META_PREFIX.encode()):
            changes.append(Change(rel, name, STASH, None, None, **found))
            result.note("dropped-aufs-internal", rel, os.fsdecode(name))
        elif target in (b"", b".", b".."):
            changes.append(Change(rel, name, STASH, None, None, **found))
            result.note("ignored-bad-whiteout", rel, os.fsdecode(name))
        elif target in kinds:
            if kinds[target]:
                child = fsio.open_dir(os.fsdecode(target), fd, noatime=True)
                try:
                    before = _get_xattr(child, OPAQUE_XATTR)
                finally:
                    os.close(child)
                changes.append(Change(rel, name, OPAQUE_CHILD, target, None, xattr_before=before, **found))
            else:
                changes.append(Change(rel, name, STASH, None, None, **found))
            result.note("whiteout-beside-entry", rel, os.fsdecode(name))
            result.entries += 1
        else:
            changes.append(Change(rel, name, WHITEOUT, target, None, **found))
            result.entries += 1


def write_journal_copy(stash_dir: str, changes: Sequence[Change], times: Sequence[DirTimes]) -> None:
    """The journal in the layer's stash: what ``rollback --force`` uses when the database is lost.  Not synced
    here: the caller syncs the filesystem once for every layer's copy before it records the journals."""
    for path in (os.path.dirname(stash_dir), stash_dir):
        if not fsio.lexists(path):
            os.mkdir(path, 0o700)
    doc = {"changes": [_encode(asdict(c)) for c in changes], "dirs": [_encode(asdict(t)) for t in times]}
    fd = fsio.open_dir(stash_dir)
    try:
        fsio.atomic_write(fd, JOURNAL_FILE, json.dumps(doc).encode("ascii"), 0o600, sync=False)
    finally:
        os.close(fd)


def read_journal_copy(stash_dir: str) -> Optional[Tuple[List[Change], List[DirTimes]]]:
    try:
        with open(os.path.join(stash_dir, JOURNAL_FILE), "rb") as f:
            doc = json.loads(f.read())
    except FileNotFoundError:
        return None
    return ([Change(**_decode(c)) for c in doc["changes"]], [DirTimes(**_decode(t)) for t in doc["dirs"]])


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
    if change.action == WHITEOUT:
        make_whiteout_device(fd, change.target, change.mode, change.uid, change.gid,
                             (change.atime_ns, change.mtime_ns))
    elif change.action == OPAQUE:
        xattr.set(fd, OPAQUE_XATTR, b"y")
    elif change.action == OPAQUE_CHILD:
        set_opaque_child(fd, change.target)
    elif change.action == DROP_XATTR:
        _put_xattr(fd, change.target, None)


# -- rollback ------------------------------------------------------------------------------------------------


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
            os.rename("diff", layer_id, src_dir_fd=parent, dst_dir_fd=afd)
        finally:
            os.close(parent)
    finally:
        os.close(afd)
    progress(f"layer {layer_id} back in aufs/diff")
    checkpoints.reached(f"moved back layer {layer_id}")


def _unmake(fd: int, change: Change) -> None:
    if change.action == WHITEOUT:
        if is_whiteout_device(fd, change.target):
            os.unlink(change.target, dir_fd=fd)
    elif change.action == OPAQUE:
        _put_xattr(fd, OPAQUE_XATTR, change.xattr_before)
    elif change.action == OPAQUE_CHILD:
        child = fsio.open_dir(os.fsdecode(change.target), fd)
        try:
            _put_xattr(child, OPAQUE_XATTR, change.xattr_before)
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


def _entry_xattrs(fd: int, name: bytes) -> Optional[bytes]:
    """An entry's own xattrs (a symlink's are not followed), for the journal; None when it has none."""
    path = b"/proc/self/fd/%d/%s" % (fd, name)
    try:
        pairs = [[n, os.getxattr(path, n, follow_symlinks=False).hex()]
                 for n in sorted(os.listxattr(path, follow_symlinks=False))]
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return None
        raise
    return json.dumps(pairs).encode("ascii") if pairs else None


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


def _get_xattr(fd: int, name: bytes) -> Optional[bytes]:
    try:
        return xattr.get(fd, name)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return None
        raise


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


def _encode(d: dict) -> dict:
    return {k: ({"hex": v.hex()} if isinstance(v, bytes) else v) for k, v in d.items()}


def _decode(d: dict) -> dict:
    return {k: (bytes.fromhex(v["hex"]) if isinstance(v, dict) else v) for k, v in d.items()}
