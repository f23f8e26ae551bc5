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
from typing import Dict, List, Optional, Sequence, Tuple

import xattr

from migrations_state.schema import ChangedDirRecord, ChangeRecord
from migrator.formats import aufs, lowerview, overlay2
from migrator.fs import fsio, tree
from migrator.scan.findings import StepResult

JOURNAL_FILE = "journal.json"
JOURNAL_MAX = 1 << 30  # a layer's journal copy: about 400 bytes a change

# What a journaled change does besides moving the aufs entry (if any) into the stash: the action of
# ``aufs.whiteout_actions`` it makes, or one of the journal's own two.
MAKE_WHITEOUT = aufs.MAKE_WHITEOUT  # make a 0/0 character device named ``target``
SET_OPAQUE = aufs.SET_OPAQUE  # set trusted.overlay.opaque=y on the directory
OPAQUE_CHILD = aufs.OPAQUE_CHILD  # set it on the child directory ``target`` (a whiteout beside its own entry)
STASH = "stash"  # nothing more: an aufs internal, or a whiteout that whites out nothing
DROP_XATTR = "drop-xattr"  # remove the directory's trusted.overlay.* xattr ``target`` (it would steer overlayfs)
# The names the journal stored them under until 0.1.0's third schema: a journal a migration started with an
# earlier release recorded is read with them (``stored_action``).
EARLIER_NAMES = {"whiteout": MAKE_WHITEOUT, "opaque": SET_OPAQUE}


def stored_action(name: str) -> str:
    """A journal's action as this release names it, from what a row or a journal copy holds."""
    return EARLIER_NAMES.get(name, name)


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
    xattr_before: Optional[bytes] = None  # SET_OPAQUE, OPAQUE_CHILD, DROP_XATTR: the value before (None: absent)
    xattrs: Optional[bytes] = None  # the moved entry's own xattrs, as found (JSON of hex pairs)


@dataclass
class DirTimes:
    dir: bytes
    atime_ns: int
    mtime_ns: int


def plan_changes(diff_dir: str, dirs: Sequence[bytes], lowers: Sequence[lowerview.Lower] = (),
                 image: bool = True) -> Tuple[List[Change], List[DirTimes], StepResult]:
    """Read the directories the link step listed and decide every change, before any is made; ``lowers`` are
    the ancestors, for whether each directory is merged with one below it (``lowerview``); ``image``: an
    image's layer, which keeps the aufs internals below its root that hold data (``aufs.keeps_for_tar_split``)."""
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
                _plan_dir(fd, rel, changes, result, lowerview.is_merged(diff_dir, lowers, rel), image)
            finally:
                os.close(fd)
    finally:
        os.close(root_fd)
    for n, change in enumerate(c for c in changes if c.name is not None):
        change.stash = str(n)
    return changes, times, result


def _plan_dir(fd: int, rel: bytes, changes: List[Change], result: StepResult, merged: bool, image: bool) -> None:
    for name in tree.list_xattrs(fd):
        if name.startswith(tree.OVERLAY_XATTR_PREFIX):
            changes.append(Change(rel, None, DROP_XATTR, name, None, xattr_before=xattr.get(fd, name)))
            result.note("dropped-overlay-xattr", rel, name.decode("ascii", "replace"))
    entries = tree.entry_kinds(fd, as_bytes=True)
    kept = {n for n in entries if image and rel and aufs.whiteout_kind(n) == aufs.INTERNAL
            and aufs.keeps_for_tar_split(fd, n)}
    for found in aufs.whiteout_actions(entries, merged, kept):
        name, target = found.name, found.target
        if found.action == aufs.KEEP_INTERNAL:  # an entry of the layer now: the walk reported it
            continue
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        entry = dict(kind=stat.S_IFMT(st.st_mode), xattrs=_entry_xattrs(fd, name),
                     mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid, atime_ns=st.st_atime_ns,
                     mtime_ns=st.st_mtime_ns)
        if found.action == aufs.SET_OPAQUE:
            changes.append(Change(rel, name, SET_OPAQUE, None, None, xattr_before=get_xattr(fd, overlay2.OPAQUE_XATTR),
                                  **entry))
        elif found.action == aufs.OPAQUE_CHILD:
            child = fsio.open_dir(os.fsdecode(target), fd, noatime=True)
            try:
                before = get_xattr(child, overlay2.OPAQUE_XATTR)
            finally:
                os.close(child)
            changes.append(Change(rel, name, OPAQUE_CHILD, target, None, xattr_before=before, **entry))
        elif found.action == aufs.MAKE_WHITEOUT:
            changes.append(Change(rel, name, MAKE_WHITEOUT, target, None, **entry))
        else:  # kept entry, bad whiteout, aufs internal: the aufs entry is only moved to the stash
            changes.append(Change(rel, name, STASH, None, None, **entry))
        if found.finding and found.action != aufs.DROP_INTERNAL:  # the walk noted the internals
            result.note(found.finding, rel, os.fsdecode(found.named))
        if found.action not in (aufs.DROP_INTERNAL, aufs.DROP_BAD, aufs.DROP_UNNEEDED):
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


def aufs_entries_by_dir(changes: Sequence[Change]) -> Dict[bytes, lowerview.JournaledDir]:
    """A journal as ``lowerview`` reads a journaled ancestor: by directory, the aufs entries it moves into the
    stash and the whiteout devices it makes."""
    out: Dict[bytes, lowerview.JournaledDir] = {}
    for change in changes:
        d = out.setdefault(change.dir, lowerview.JournaledDir())
        if change.name is not None:
            d.moved.add(change.name)
        if change.action == MAKE_WHITEOUT and change.target is not None:
            d.made.add(change.target)
    return out


def read_journal_copy(stash_dir: str) -> Optional[Tuple[List[Change], List[DirTimes]]]:
    try:
        doc = json.loads(fsio.read_small(os.path.join(stash_dir, JOURNAL_FILE), JOURNAL_MAX)[0])
    except FileNotFoundError:
        return None
    changes = [Change(**_decode(c)) for c in doc["changes"]]
    for change in changes:
        change.action = stored_action(change.action)
    return changes, [DirTimes(**_decode(t)) for t in doc["dirs"]]


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


def get_xattr(fd: int, name: bytes) -> Optional[bytes]:
    try:
        return xattr.get(fd, name)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return None
        raise


def _encode(d: dict) -> dict:
    return {k: ({"hex": v.hex()} if isinstance(v, bytes) else v) for k, v in d.items()}


def _decode(d: dict) -> dict:
    return {k: (bytes.fromhex(v["hex"]) if isinstance(v, dict) else v) for k, v in d.items()}


def changes_from_rows(rows: List[ChangeRecord], dirs: List[ChangedDirRecord]) -> Tuple[List[Change], List[DirTimes]]:
    """A journal as the state database holds it, back as the changes it records."""
    fields = Change.__dataclass_fields__
    return ([Change(**{f: stored_action(r.action) if f == "action" else getattr(r, f) for f in fields}) for r in rows],
            [DirTimes(d.dir, d.atime_ns, d.mtime_ns) for d in dirs])


def rows_from_changes(layer_id: str, changes: Sequence[Change], times: Sequence[DirTimes]
                      ) -> Tuple[List[ChangeRecord], List[ChangedDirRecord]]:
    return ([ChangeRecord(layer_id=layer_id, seq=i, **vars(c)) for i, c in enumerate(changes)],
            [ChangedDirRecord(layer_id=layer_id, **vars(t)) for t in times])
