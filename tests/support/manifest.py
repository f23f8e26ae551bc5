"""A manifest of a tree: every entry's name, type, bytes, mode, owner, mtime, target, device and xattrs.

Test code, independent of the migrator.  atime, ctime and link counts are left out: hardlinking into a new
tree changes a file's link count and ctime without changing the file.
"""

from __future__ import annotations

import hashlib
import os
import stat
from typing import Dict, Optional, Tuple

import xattr

Entry = Tuple


def _xattrs(path: bytes) -> Tuple:
    try:
        names = xattr.list(path, nofollow=True)
    except OSError:
        return ()
    return tuple(sorted((n, xattr.get(path, n, nofollow=True)) for n in names
                        if not n.startswith(b"trusted.overlay.")))


def _digest(path: bytes) -> str:
    """sha256 over the data regions and their offsets (SEEK_DATA): a 1 TiB sparse file hashes in no time."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NOATIME", 0))
    try:
        size = os.fstat(fd).st_size
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            os.lseek(fd, start, os.SEEK_SET)
            pos = start
            while pos < end:
                chunk = os.read(fd, min(1 << 20, end - pos))
                if not chunk:
                    break
                stripped = chunk.rstrip(b"\0")  # zeros hash the same whether stored or a hole
                if stripped:
                    h.update(b"%d:" % pos + stripped)
                pos += len(chunk)
            offset = end
    finally:
        os.close(fd)
    return h.hexdigest()


def describe(path: bytes, with_mtime: bool = True) -> Entry:
    st = os.lstat(path)
    kind = stat.S_IFMT(st.st_mode)
    if stat.S_ISREG(st.st_mode):
        detail: object = (st.st_size, _digest(path))
    elif stat.S_ISLNK(st.st_mode):
        detail = os.readlink(path)
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        detail = (os.major(st.st_rdev), os.minor(st.st_rdev))
    else:
        detail = None
    mtime = st.st_mtime_ns if with_mtime and not stat.S_ISLNK(st.st_mode) else None
    return (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, mtime, detail, _xattrs(path))


def manifest(top: str, skip: Optional[set] = None) -> Dict[bytes, Entry]:
    """``{relative path: entry}`` for ``top`` and everything below it; ``skip`` names top-level entries."""
    top_b = os.fsencode(top)
    out: Dict[bytes, Entry] = {b".": describe(top_b)}
    for dirpath, dirs, files in os.walk(top_b):
        if dirpath == top_b and skip:
            dirs[:] = [d for d in dirs if d not in skip]
            files = [f for f in files if f not in skip]
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, top_b)] = describe(path)
    return out


def diff_manifests(a: Dict[bytes, Entry], b: Dict[bytes, Entry], limit: int = 20) -> list:
    """Readable differences, for assertion messages."""
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            out.append((key, a.get(key), b.get(key)))
            if len(out) >= limit:
                break
    return out


def link_groups(top: str, skip: Optional[set] = None) -> set:
    """The hardlink groups of non-directories below ``top``: a set of frozensets of relative paths (two names
    of one inode are one group).  aufs hardlinks its whiteouts to one another: a rollback must keep that."""
    top_b = os.fsencode(top)
    by_inode: Dict[Tuple[int, int], list] = {}
    for dirpath, dirs, files in os.walk(top_b):
        if dirpath == top_b and skip:
            dirs[:] = [d for d in dirs if d not in skip]
            files = [f for f in files if f not in skip]
        for name in files:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            by_inode.setdefault((st.st_dev, st.st_ino), []).append(os.path.relpath(path, top_b))
    return {frozenset(paths) for paths in by_inode.values() if len(paths) > 1}
