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


BLOCK = 1 << 16
BIG = 256 << 20  # aufs's llseek knows no SEEK_DATA: a bigger file is read in windows, not whole (its holes)


def _digest(path: bytes, size: int) -> str:
    """sha256 of the data, block by aligned 64 KiB block, each with its offset, an all-zero block left out:
    zeros hash the same whether stored or a hole, and the digest does not depend on where the filesystem
    says data starts (SEEK_DATA skips holes where the filesystem knows them; aufs knows none)."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NOATIME", 0))
    try:
        if size > BIG:  # every GiB's first 64 KiB, and the last: the same through aufs, overlayfs and ext4
            for block in sorted(set(range(0, size, 1 << 30)) | {(size - 1) // BLOCK * BLOCK}):
                chunk = os.pread(fd, BLOCK, block).rstrip(b"\0")
                if chunk:
                    h.update(b"%d:" % block + chunk)
            return "sampled:" + h.hexdigest()
        if size <= BLOCK:  # one block: read it (the same digest, fewer calls: the VM pays dearly for each)
            chunk = os.pread(fd, BLOCK, 0).rstrip(b"\0")
            if chunk:
                h.update(b"0:" + chunk)
            return h.hexdigest()
        offset = 0
        while offset < size:
            try:
                data = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:
                break
            start, end = data // BLOCK * BLOCK, os.lseek(fd, data, os.SEEK_HOLE)
            for block in range(start, end, BLOCK):
                chunk = os.pread(fd, BLOCK, block).rstrip(b"\0")
                if chunk:
                    h.update(b"%d:" % block + chunk)
            offset = max(end, start + BLOCK)
    finally:
        os.close(fd)
    return h.hexdigest()


def describe(path: bytes, with_mtime: bool = True) -> Entry:
    return described(path, os.lstat(path), with_mtime)


def described(path: bytes, st: os.stat_result, with_mtime: bool = True) -> Entry:
    """``describe`` of ``path`` from its ``lstat`` already taken."""
    kind = stat.S_IFMT(st.st_mode)
    if stat.S_ISREG(st.st_mode):
        detail: object = (st.st_size, _digest(path, st.st_size))
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
