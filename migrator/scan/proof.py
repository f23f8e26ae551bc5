"""A staged layer's proof: that its aufs data is still what ``stage`` linked, checked at the cutover with one
``open`` and ``fstat`` per directory (the argument is in docs/design.md, "Staging while the engine runs").

``take`` walks the layer's aufs directories *before* any of them is linked and keeps, in walk order, each one's
path and the digest of every (inode, ctime).  Any change to what a directory holds (an entry created, removed,
renamed or replaced) and any change of its own mode, owner or xattrs sets its ctime; a directory replaced is a
new inode.  A file's content or metadata changed in place needs no check: the staged file is the same inode.
So the staged tree is still the aufs layer's conversion exactly when every digest holds, given one more rule:
a directory whose ctime is less than ``RACY_NS`` old when the proof is taken is refused (``take`` says
``None``), because a change within the same clock tick could leave its ctime as it was (git's "racily clean"
index entries).  Committed image layers are not written after their pull, so this refuses only a layer being
changed, which is left for the cutover.

Layer data is untrusted: every directory is opened with ``O_NOFOLLOW`` relative to its parent's descriptor.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

from migrator.fs import fsio

RACY_NS = 2_000_000_000  # a directory changed this recently may change again within the same ctime tick
SEP = b"\0"  # between the paths of ``dirs`` (a name holds any byte but NUL and "/")


@dataclass(frozen=True)
class Proof:
    dirs: bytes  # the directories' paths relative to the layer, NUL-separated, in walk order ("" the layer)
    digest: str  # sha256 of their (inode, ctime) in that order


def _fingerprint(st: os.stat_result) -> bytes:
    return struct.pack("<QQ", st.st_ino, st.st_ctime_ns)


def take(layer_dir: str, now_ns: Optional[int] = None) -> Optional[Proof]:
    """The proof of the aufs layer at ``layer_dir``; None when a directory changed too recently to trust its
    ctime (``RACY_NS``).  Raises OSError when the layer is not there (removed meanwhile)."""
    limit = (time.time_ns() if now_ns is None else now_ns) - RACY_NS
    digest = hashlib.sha256()
    paths: List[bytes] = []
    stack: List[Tuple[bytes, int, Iterator[str]]] = []
    try:
        fd, rel = fsio.open_dir(layer_dir, noatime=True), b""
        while True:
            try:
                st = os.fstat(fd)
                children = _child_dirs(fd) if st.st_ctime_ns <= limit else None
            except BaseException:
                os.close(fd)
                raise
            if children is None:
                os.close(fd)
                return None
            paths.append(rel)
            digest.update(_fingerprint(st))
            stack.append((rel, fd, iter(children)))
            fd = -1
            while stack and fd < 0:
                top_rel, top_fd, children = stack[-1]
                name = next(children, None)
                if name is None:
                    os.close(stack.pop()[1])
                    continue
                fd = fsio.open_dir(name, top_fd, noatime=True)
                rel = top_rel + b"/" + os.fsencode(name) if top_rel else os.fsencode(name)
            if fd < 0:
                return Proof(SEP.join(paths), digest.hexdigest())
    finally:
        for _rel, open_fd, _children in stack:
            os.close(open_fd)


def holds(layer_dir: str, proof: Proof) -> Optional[str]:
    """None when every directory of ``proof`` is the same inode with the same ctime; else what differs.

    A directory with subdirectories in the list is opened (``O_NOFOLLOW``, from its parent's descriptor) to
    reach them; one without is only ``fstatat``-ed from its parent without following a symlink: one system
    call for most directories.  Each ``fstat`` sees a symlink or a replaced directory as another inode."""
    digest = hashlib.sha256()
    paths = proof.dirs.split(SEP)
    if paths[0]:
        return "its proof is malformed"
    stack: List[Tuple[bytes, int]] = []
    rel = b""
    try:
        for i, rel in enumerate(paths):
            has_children = i + 1 < len(paths) and paths[i + 1].startswith(rel + b"/" if rel else b"")
            if not rel:
                fd = fsio.open_dir(layer_dir, noatime=True)
                stack.append((rel, fd))
                digest.update(_fingerprint(os.fstat(fd)))
                continue
            parent, _slash, name = rel.rpartition(b"/")
            while len(stack) > 1 and stack[-1][0] != parent:
                os.close(stack.pop()[1])
            if stack[-1][0] != parent:
                return "its proof is malformed"
            if has_children:
                fd = fsio.open_dir(os.fsdecode(name), stack[-1][1], noatime=True)
                stack.append((rel, fd))
                st = os.fstat(fd)
            else:
                st = os.stat(name, dir_fd=stack[-1][1], follow_symlinks=False)
            digest.update(_fingerprint(st))
    except OSError as exc:
        return f"{os.fsdecode(rel) or 'its directory'} is not there as it was ({exc.strerror})"
    finally:
        for _rel, open_fd in stack:
            os.close(open_fd)
    if digest.hexdigest() != proof.digest:
        return "a directory of it changed since it was staged"
    return None


def _child_dirs(fd: int) -> List[str]:
    """The subdirectories of ``fd``, by name, in a fixed order (the same walk gives the same list)."""
    with os.scandir(fd) as it:
        return sorted((e.name for e in it if e.is_dir(follow_symlinks=False)), key=os.fsencode)
