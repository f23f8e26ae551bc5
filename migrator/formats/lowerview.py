"""What a layer's ancestors show at one path, under aufs's rules: whether a directory of a layer is *merged*
with a directory below it.  Read-only.

Why it matters: overlayfs hides a 0/0 whiteout device only when it reads a merged directory.  A directory
that exists in one layer alone (nothing below it, or opaque, or over a non-directory) is read as it is on disk,
so a whiteout device in it is listed as an entry that ``stat`` cannot find (``ls`` prints ``c?????????``).
aufs shows nothing there.  Such a whiteout whites out nothing, so it is not made (``aufs.whiteout_actions``
with ``merged=False``); this module answers the question for each directory holding whiteouts.

An ancestor is read in aufs form: ``.wh.<name>`` hides ``<name>`` in the layers below it, ``.wh..wh..opq``
makes its directory opaque, ``trusted.overlay.*`` xattrs in layer data mean nothing.  The in-place strategy
converts layers where they stand, so an ancestor it has journaled may be partly converted: its journal names
the aufs entries it moved away and the devices it made (``JournaledDir``), and the reading puts those back.
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


def is_merged(layer_dir: str, lowers: Sequence[Lower], rel: bytes) -> bool:
    """Whether the directory ``rel`` of the layer at ``layer_dir`` (aufs form) is merged with a directory of
    ``lowers`` (its ancestors, nearest first): no component of it is opaque in the layer, and the ancestors
    show a directory there."""
    parts = [p for p in rel.split(b"/") if p]
    if not parts:
        return bool(lowers)
    if _opaque_in_layer(layer_dir, parts):
        return False
    return _shows_directory(lowers, parts)


def _opaque_in_layer(layer_dir: str, parts: List[bytes]) -> bool:
    """A component of ``parts`` is opaque in the layer itself: it holds ``.wh..wh..opq``, or its parent holds
    ``.wh.<component>`` beside it (aufs's opaque directory made by a whiteout of the same name)."""
    fd = fsio.open_dir(layer_dir, noatime=True)
    try:
        for part in parts:
            if _entry(fd, WH + part) is not None:
                return True
            child = _open(fd, part)
            if child is None:
                return True  # not a directory: nothing of this layer is merged below it
            os.close(fd)
            fd = child
            if _entry(fd, OPQ) is not None:
                return True
        return False
    finally:
        os.close(fd)


def _shows_directory(lowers: Sequence[Lower], parts: List[bytes]) -> bool:
    """aufs's lookup of ``parts`` through ``lowers``: at each component, the layers' directories that merge
    there (nearest first) until a non-directory, a whiteout or an opaque directory ends the merge."""
    current: List[Tuple[int, Lower]] = []
    try:
        for lower in lowers:
            fd, _ = fsio.open_dir_found(lower.path)  # an ancestor without data shows nothing
            if fd is not None:
                current.append((fd, lower))
        rel = b""
        for part in parts:
            merged: List[Tuple[int, Lower]] = []
            child_rel = rel + b"/" + part if rel else part
            try:
                for fd, lower in current:
                    kind = _kind(fd, lower, rel, part)
                    if kind is False:
                        break  # a non-directory hides the name below it
                    if kind:
                        child = _open(fd, part)
                        if child is None:
                            break
                        merged.append((child, lower))
                        if _kind(child, lower, child_rel, OPQ) is not None:
                            break
                    if _kind(fd, lower, rel, WH + part) is not None:
                        break
            finally:
                for fd, _ in current:
                    os.close(fd)
                current = merged
            if not current:
                return False
            rel = child_rel
        return True
    finally:
        for fd, _ in current:
            os.close(fd)
