"""Walking two trees side by side with directory file descriptors, and copying metadata between them.

The walk never resolves a path: each directory is opened relative to its parent's descriptor with
``O_NOFOLLOW``, so a symlink inside layer data is an entry like any other and is never followed.  It holds
two descriptors per level of depth and one directory's list of subdirectory names per level, never a list of
the whole tree.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import xattr

from migrator import checkpoints
from migrator.fs import fsio

OVERLAY_XATTR_PREFIX = b"trusted.overlay."

# visit(src_fd, dst_fd, rel) handles one directory's entries and returns the names of the subdirectories to
# descend into (each must already exist on both sides).  leave(src_fd, dst_fd, rel) runs after all of them.
Visit = Callable[[int, int, bytes], List[str]]
Leave = Callable[[int, int, bytes], None]


def walk_pair(src_fd: int, dst_fd: Optional[int], visit: Visit, leave: Optional[Leave] = None,
              label: Optional[str] = None, root_rel: bytes = b"", cut: Optional[Callable[[], bool]] = None,
              left: Optional[List[bytes]] = None) -> None:
    """Depth-first walk of two directory trees in lockstep (``dst_fd`` None: of the source alone, read-only).

    The caller keeps ownership of the root fds.  With a ``label``, each directory done is a checkpoint.
    ``root_rel`` is the roots' own path below the layer (``rel`` of the first ``visit``).  Once ``cut()`` says
    so, the walk enters no more directories: the paths of those it has not entered go to ``left`` (for
    another walk to do), and the ones it is in are left as usual, innermost first.
    """
    frames: List[Tuple[int, int, bytes, Iterator[str], bool]] = []
    frames.append((src_fd, dst_fd, root_rel, iter(visit(src_fd, dst_fd, root_rel)), False))
    try:
        while frames:
            s_fd, d_fd, rel, pending, owned = frames[-1]
            name = next(pending, None)
            if name is not None and cut is not None and cut():
                left.extend(rel + b"/" + os.fsencode(n) for n in itertools.chain((name,), pending))
                name = None
            if name is None:
                frames.pop()
                try:
                    if leave is not None:
                        leave(s_fd, d_fd, rel)
                finally:
                    if owned:
                        _close(s_fd, d_fd)
                if label is not None:
                    checkpoints.reached(f"walked {label}")
                continue
            child_s = fsio.open_dir(name, s_fd, noatime=True)
            try:
                child_d = fsio.open_dir(name, d_fd) if d_fd is not None else None
            except BaseException:
                os.close(child_s)
                raise
            child_rel = rel + b"/" + os.fsencode(name)
            frames.append((child_s, child_d, child_rel, iter(()), True))
            subdirs = visit(child_s, child_d, child_rel)
            frames[-1] = (child_s, child_d, child_rel, iter(subdirs), True)
    finally:
        for s_fd, d_fd, _rel, _pending, owned in frames:
            if owned:
                _close(s_fd, d_fd)


def _close(*fds: Optional[int]) -> None:
    for fd in fds:
        if fd is not None:
            os.close(fd)


def open_path(root_fd: int, rel: bytes, noatime: bool = False) -> int:
    """Open the directory ``rel`` below ``root_fd`` one component at a time, never following a symlink."""
    fd = os.dup(root_fd)
    try:
        for part in rel.split(b"/"):
            if not part:
                continue
            child = fsio.open_dir(os.fsdecode(part), fd, noatime=noatime)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def entry_kinds(fd: int, as_bytes: bool = False) -> Dict:
    """Every name in the directory ``fd`` (str, or bytes with ``as_bytes``) and whether it is a directory, by
    ``d_type`` (what ``aufs.whiteout_actions`` decides from)."""
    with os.scandir(fd) as it:
        if as_bytes:
            return {os.fsencode(e.name): e.is_dir(follow_symlinks=False) for e in it}
        return {e.name: e.is_dir(follow_symlinks=False) for e in it}


def list_xattrs(fd: int) -> List[bytes]:
    """The xattr names of an open file; none where the filesystem has no xattrs."""
    try:
        return xattr.list(fd)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return []
        raise


def copy_xattrs(src: object, dst: object, nofollow: bool = False) -> List[bytes]:
    """Copy every xattr but ``trusted.overlay.*`` (those would steer overlayfs); return the names dropped."""
    dropped = []
    try:
        names = xattr.list(src, nofollow=nofollow)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return dropped
        raise
    for name in names:
        if name.startswith(OVERLAY_XATTR_PREFIX):
            dropped.append(name)
            continue
        xattr.set(dst, name, xattr.get(src, name, nofollow=nofollow), nofollow=nofollow)
    return dropped


def copy_dir_meta(src_fd: int, dst_fd: int) -> List[bytes]:
    """Owner, mode (setuid/setgid/sticky included) and xattrs of a directory; times are set last, elsewhere."""
    st = os.fstat(src_fd)
    os.fchown(dst_fd, st.st_uid, st.st_gid)
    os.fchmod(dst_fd, stat.S_IMODE(st.st_mode))
    return copy_xattrs(src_fd, dst_fd)


def copy_dir_times(src_fd: int, dst_fd: int, _rel: bytes = b"") -> None:
    st = os.fstat(src_fd)
    os.utime(dst_fd, ns=(st.st_atime_ns, st.st_mtime_ns))


def copy_entry(src_fd: int, dst_fd: int, name: str) -> None:
    """Copy one non-directory entry with all its metadata (the fallback when it cannot be hardlinked)."""
    st = os.stat(name, dir_fd=src_fd, follow_symlinks=False)
    mode = st.st_mode
    if stat.S_ISREG(mode):
        s = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_fd)
        try:
            d = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                        dir_fd=dst_fd)
            try:
                _copy_data(s, d, st.st_size)
                os.fchown(d, st.st_uid, st.st_gid)
                os.fchmod(d, stat.S_IMODE(mode))
                copy_xattrs(s, d)
                os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(d)
        finally:
            os.close(s)
        return
    if stat.S_ISLNK(mode):
        os.symlink(os.readlink(name, dir_fd=src_fd), name, dir_fd=dst_fd)
        os.chown(name, st.st_uid, st.st_gid, dir_fd=dst_fd, follow_symlinks=False)
    else:  # fifo, socket, character or block device: the mode after chown, which clears set-id bits
        os.mknod(name, stat.S_IFMT(mode) | 0o600, st.st_rdev, dir_fd=dst_fd)
        os.chown(name, st.st_uid, st.st_gid, dir_fd=dst_fd, follow_symlinks=False)
        os.chmod(name, stat.S_IMODE(mode), dir_fd=dst_fd)
    # trusted.* xattrs on a symlink, FIFO, socket or device: by path, not followed (opening a FIFO would block)
    copy_xattrs(_at(src_fd, name), _at(dst_fd, name), nofollow=True)
    os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst_fd, follow_symlinks=False)


def _at(dir_fd: int, name: str) -> bytes:
    """A path naming ``name`` in the open directory ``dir_fd``, for calls that take no directory descriptor."""
    return b"/proc/self/fd/%d/%s" % (dir_fd, os.fsencode(name))


def _copy_data(src: int, dst: int, size: int) -> None:
    """Copy file data, keeping holes: a sparse file stays sparse (SEEK_DATA/SEEK_HOLE)."""
    offset = 0
    while offset < size:
        try:
            data_start = os.lseek(src, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                break
            raise
        hole = os.lseek(src, data_start, os.SEEK_HOLE)
        pos = data_start
        while pos < hole:
            n = os.copy_file_range(src, dst, hole - pos, pos, pos)
            if n == 0:
                break
            pos += n
        offset = hole
    os.ftruncate(dst, size)
