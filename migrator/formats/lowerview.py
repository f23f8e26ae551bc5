"""What a layer's ancestors show below one of its directories: the directories overlayfs will merge it with,
and whether aufs merged more there.  Read-only.

Why it matters, twice:

* overlayfs hides a 0/0 whiteout device only when it reads a *merged* directory.  A directory that exists in
  one layer alone (nothing below it, or opaque, or over a non-directory) is read as it is on disk, so a
  whiteout device in it is listed as an entry that ``stat`` cannot find (``ls`` prints ``c?????????``).
  aufs shows nothing there.  Such a whiteout whites out nothing, so it is not made
  (``aufs.whiteout_actions`` with ``merged=False``).
* aufs merges directories further than overlayfs (``fs/aufs/dentry.c``, ``au_lkup_dentry``, and the real aufs
  in the test VM agrees): looking a directory up, it *skips* a lower entry of another type and merges the
  directories below it, and it does not stop at an opaque directory on a first lookup (the dentry is still
  negative, so its ``isdir`` test is false): every opaque directory it meets overwrites ``di_bdiropq``, and
  the merge ends at the lowest one.  overlayfs (and every engine that applies the layers' tars) stops at the
  non-directory or at the first opaque directory.  The migration keeps overlayfs's view, which is the layers'
  own, and names each such directory (``Merge.differs``: the finding kind).

The merge is followed top-down, one directory at a time (``root``, ``Merge.child``), by the walks that visit
every directory of a layer anyway, or reached for one path (``at``).  An ancestor is read in aufs form:
``.wh.<name>`` hides ``<name>`` in the layers below it, ``.wh..wh..opq`` makes its directory opaque,
``trusted.overlay.*`` xattrs in layer data mean nothing.  The in-place strategy converts layers where they
stand, so an ancestor it has journaled may be partly converted: its journal names the aufs entries it moved
away and the devices it made (``JournaledDir``), and the reading puts those back.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple

from migrator.formats import aufs
from migrator.fs import fsio

WH = aufs.WH_PREFIX.encode()
OPQ = aufs.OPAQUE_MARKER.encode()
THROUGH_NON_DIRECTORY = "aufs-merged-through-non-directory"
BELOW_OPAQUE = "aufs-merged-below-opaque"


@dataclass
class JournaledDir:
    """A directory of a journaled layer: the aufs entries its journal moves out, the devices it makes."""

    moved: Set[bytes] = field(default_factory=set)
    made: Set[bytes] = field(default_factory=set)


@dataclass
class Lower:
    """An ancestor: where its data is, and for a journaled one, its journal by directory."""

    path: str
    journal: Optional[Dict[bytes, JournaledDir]] = None


def _kind(fd: int, lower: Lower, rel: bytes, name: bytes) -> Optional[bool]:
    """What ``name`` is in the directory ``fd`` (``rel`` in ``lower``) as aufs had it: True a directory, False
    anything else, None absent."""
    journaled = lower.journal.get(rel) if lower.journal else None
    if journaled:
        if name in journaled.moved:
            return False
        if name in journaled.made:
            return None
    return _entry(fd, name)


def _entry(fd: int, name: bytes) -> Optional[bool]:
    """``name`` in the directory ``fd``: True a directory, False anything else, None absent.  One ``lstat``:
    directories can be large, and only a few names are asked."""
    try:
        st = os.lstat(name, dir_fd=fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:  # ".wh." of a name of more than 251 bytes cannot exist
            return None
        raise
    return stat.S_ISDIR(st.st_mode)


def _open(parent_fd: int, name: bytes) -> Optional[int]:
    try:
        return fsio.open_dir(os.fsdecode(name), parent_fd, noatime=True)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None
        raise


class Merge:
    """The ancestors' directories a layer's directory ``rel`` merges with in overlayfs (``dirs``: open
    descriptors with their ``Lower``, nearest first), and ``differs``: the finding kind when aufs merged
    more there (None when it merged the same, or when a directory above it was found to differ already:
    ``covered``).  Close it when done."""

    def __init__(self, rel: bytes, dirs: List[Tuple[int, Lower]], differs: Optional[str] = None,
                 covered: bool = False) -> None:
        self.rel = rel
        self.dirs = dirs
        self.differs = differs
        self.covered = covered or differs is not None

    @property
    def merged(self) -> bool:
        return bool(self.dirs)

    def child(self, name: bytes, whited: bool = False, opaque: bool = False) -> "Merge":
        """The merge of the subdirectory ``name``.  ``whited``: the layer has ``.wh.<name>`` beside it, and
        ``opaque``: ``.wh..wh..opq`` in it; either way overlayfs merges it with nothing (aufs hides a
        directory whited out beside itself: the whiteout's own finding names it)."""
        rel = self.rel + b"/" + name  # as the walks spell it (``tree.walk_pair``): the journal is keyed so
        overlay: List[Tuple[int, Lower]] = []
        open_ = not (whited or opaque)  # overlayfs still merges
        stop = BELOW_OPAQUE
        found = 0  # the directories aufs meets (a non-directory skipped), down to a whiteout
        lowest_opaque = 0 if opaque else None  # aufs's merge ends after that many
        try:
            for fd, lower in self.dirs:
                # .wh.<name> ends aufs's lookup in its layer, hiding even <name> beside it; the migration keeps
                # such a <name> (made opaque, if a directory), so overlayfs stops after it
                whited_here = _kind(fd, lower, self.rel, WH + name) is not None
                kind = _kind(fd, lower, self.rel, name)
                sub = _open(fd, name) if kind else None
                if sub is None:
                    if kind is False and open_:
                        open_, stop = False, THROUGH_NON_DIRECTORY
                    if whited_here:
                        break
                    continue
                if not whited_here:
                    found += 1
                opaque = _kind(sub, lower, rel, OPQ) is not None
                if opaque and not whited_here:
                    lowest_opaque = found
                if open_:
                    overlay.append((sub, lower))
                    open_ = not (opaque or whited_here)
                else:
                    os.close(sub)
                if whited_here:
                    break
        except BaseException:
            _close(overlay)
            raise
        aufs_merges = found if lowest_opaque is None else lowest_opaque
        differs = stop if aufs_merges > len(overlay) and not (whited or self.covered) else None
        return Merge(rel, overlay, differs, self.covered or whited)

    def close(self) -> None:
        _close(self.dirs)
        self.dirs = []


def _close(dirs: List[Tuple[int, Lower]]) -> None:
    for fd, _lower in dirs:
        os.close(fd)


def root(lowers: Sequence[Lower]) -> Merge:
    """The merge of a layer's root: every ancestor's root (one without data shows nothing).  aufs never looks
    a branch's root up, so no opaque marker counts there (in the layer or below)."""
    dirs: List[Tuple[int, Lower]] = []
    try:
        for lower in lowers:
            fd, _ = fsio.open_dir_found(lower.path)
            if fd is not None:
                dirs.append((fd, lower))
    except BaseException:
        _close(dirs)
        raise
    return Merge(b"", dirs)


def layer_marks(parent_fd: int, name: bytes, sub_fd: Optional[int] = None) -> Tuple[bool, bool]:
    """How the layer itself marks its subdirectory ``name`` of ``parent_fd`` (``sub_fd``: that directory,
    open): whited out beside it (``.wh.<name>``), and opaque (``.wh..wh..opq`` in it)."""
    whited = _entry(parent_fd, WH + name) is not None
    if sub_fd is not None:
        return whited, _entry(sub_fd, OPQ) is not None
    fd = _open(parent_fd, name)
    if fd is None:
        return whited, True  # not a directory: nothing of this layer is merged below it
    try:
        return whited, _entry(fd, OPQ) is not None
    finally:
        os.close(fd)


def at(layer_dir: str, lowers: Sequence[Lower], rel: bytes) -> Merge:
    """The merge of the directory ``rel`` of the layer at ``layer_dir`` (aufs form), followed from the root."""
    merge = root(lowers)
    fd: Optional[int] = fsio.open_dir(layer_dir, noatime=True)
    try:
        for part in (p for p in rel.split(b"/") if p):
            sub = _open(fd, part)
            if sub is None:  # gone, or not a directory: nothing of the layer is merged below it
                merge.close()
                return Merge(rel, [])
            child = merge.child(part, *layer_marks(fd, part, sub))
            merge.close()
            merge = child
            os.close(fd)
            fd = sub
        return merge
    except BaseException:
        merge.close()
        raise
    finally:
        if fd is not None:
            os.close(fd)


def is_merged(layer_dir: str, lowers: Sequence[Lower], rel: bytes) -> bool:
    """Whether the directory ``rel`` of the layer at ``layer_dir`` is merged with a directory of ``lowers``
    (its ancestors, nearest first) in overlayfs: the layer's root is whenever it has an ancestor."""
    if not rel.strip(b"/"):
        return bool(lowers)
    merge = at(layer_dir, lowers, rel)
    try:
        return merge.merged
    finally:
        merge.close()


class Tracker:
    """The merges of a layer's directories, followed by a walk that visits them top-down from ``start`` (the
    layer's root, or a subtree another walk left): ``enter`` each directory as it is visited, ``leave`` it
    when the walk is done below it.  What ``enter`` returns says whether aufs showed it otherwise."""

    def __init__(self, layer_dir: str, lowers: Sequence[Lower], start: bytes = b"") -> None:
        self.layer_dir = layer_dir
        self.lowers = lowers
        self.start = start
        self.merges: Dict[bytes, Merge] = {}
        self.whited: Dict[bytes, Set[bytes]] = {}

    def enter(self, rel: bytes, opaque: bool, whiteouts: Set[bytes]) -> Merge:
        """The merge of ``rel``, whose entries the walk just read: ``opaque`` (it holds ``.wh..wh..opq``),
        ``whiteouts`` (the names its ``.wh.<name>`` entries white out, for its subdirectories)."""
        if rel == self.start:
            merge = root(self.lowers) if not rel else at(self.layer_dir, self.lowers, rel)
        else:
            parent, _, name = rel.rpartition(b"/")
            merge = self.merges[parent].child(name, name in self.whited[parent], opaque)
        self.merges[rel] = merge
        self.whited[rel] = whiteouts
        return merge

    def leave(self, rel: bytes) -> None:
        self.whited.pop(rel, None)
        merge = self.merges.pop(rel, None)
        if merge is not None:
            merge.close()

    def close(self) -> None:
        for merge in self.merges.values():
            merge.close()
        self.merges.clear()
