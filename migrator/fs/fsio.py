"""Durable filesystem primitives.

Every file the migrator writes goes through this module, so "where is a file written" has one answer:
``atomic_write`` (temp, fsync, rename, fsync dir), ``atomic_symlink``, ``make_dir``, ``rename_durable``
and ``syncfs``.  Everything works relative to directory file descriptors opened with ``O_NOFOLLOW``, so a
symlink planted in layer data can never redirect a write.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import shutil
import stat
from typing import List, Optional, Tuple

from migrator import checkpoints

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NOATIME: reading the aufs tree must not even touch its directories' access times.
READ_DIR_FLAGS = DIR_FLAGS | getattr(os, "O_NOATIME", 0)

_libc = ctypes.CDLL(None, use_errno=True)


def raise_fd_limit() -> None:
    """Walks hold two directory descriptors per level of depth: allow as many as the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def open_dir(name: str, dir_fd: Optional[int] = None, noatime: bool = False) -> int:
    """Open a directory without following a symlink in its last component."""
    flags = READ_DIR_FLAGS if noatime else DIR_FLAGS
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except PermissionError:
        if not noatime:
            raise
        return os.open(name, DIR_FLAGS, dir_fd=dir_fd)  # O_NOATIME needs ownership or CAP_FOWNER


class NotSmallFile(ValueError):
    """A file that should be a small regular file and is not: its type, or its size, says why."""


_TYPE_NAMES = ((stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symlink"), (stat.S_ISFIFO, "a FIFO"),
               (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
_SMALL_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def file_type_name(mode: int) -> str:
    return next((name for test, name in _TYPE_NAMES if test(mode)), "not a regular file")


MISSING, NOT_A_DIRECTORY = "missing", "not a directory"


def open_dir_found(path: str, dir_fd: Optional[int] = None) -> Tuple[Optional[int], str]:
    """``open_dir(path, dir_fd, noatime=True)`` for reading what may not be there: (descriptor, "present"), or
    (None, ``MISSING``) when nothing is there, or (None, ``NOT_A_DIRECTORY``) for anything else, a symlink
    included."""
    try:
        return open_dir(path, dir_fd, noatime=True), "present"
    except FileNotFoundError:
        return None, MISSING
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            return None, NOT_A_DIRECTORY
        raise


def read_small(path: str, limit: int, dir_fd: Optional[int] = None,
               regular: bool = False) -> Tuple[bytes, os.stat_result]:
    """A small regular file's bytes and stat: the one reader of the small files of a root (layers files, layer
    store ids, container and engine configs) and of the tool's own.

    Nothing it is given can make it hang, follow a link or read without bound: unless the caller has seen from
    a directory listing that the name is a regular file (``regular``: its ``d_type``), the name is ``lstat``-ed
    first, so a device, FIFO or socket is never opened; the open adds ``O_NOFOLLOW`` and ``O_NONBLOCK`` (a FIFO
    swapped in meanwhile opens without waiting for a writer) and ``O_NOATIME``; the opened file is ``fstat``-ed
    and its size checked against ``limit`` before a byte is read.  FileNotFoundError when there is nothing;
    ``NotSmallFile`` (a ValueError) naming the type or the size otherwise."""
    if not regular:
        check_small(os.stat(path, dir_fd=dir_fd, follow_symlinks=False), limit, size=False)
    try:
        fd = os.open(path, _SMALL_FLAGS | getattr(os, "O_NOATIME", 0), dir_fd=dir_fd)
    except PermissionError:
        fd = os.open(path, _SMALL_FLAGS, dir_fd=dir_fd)  # O_NOATIME needs ownership or CAP_FOWNER
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):  # a symlink or a socket swapped in
            raise NotSmallFile("it is not a regular file") from None
        raise
    try:
        st = os.fstat(fd)
        check_small(st, limit)
        data = os.read(fd, st.st_size + 1)  # one read, unless the file grew since the fstat
        while len(data) > st.st_size:
            if len(data) > limit:
                raise NotSmallFile(f"it is larger than {limit} bytes")
            more = os.read(fd, 1 << 16)
            if not more:
                break
            data += more
    finally:
        os.close(fd)
    return data, st


def check_small(st: os.stat_result, limit: int, size: bool = True) -> None:
    """NotSmallFile unless ``st`` is a regular file (of at most ``limit`` bytes, with ``size``)."""
    if not stat.S_ISREG(st.st_mode):
        raise NotSmallFile(f"it is {file_type_name(st.st_mode)}, not a regular file")
    if size and st.st_size > limit:
        raise NotSmallFile(f"it is larger than {limit} bytes")


def syncfs(fd: int) -> None:
    """Flush the whole filesystem holding ``fd``: one call makes a layer step's thousands of links durable."""
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dir(name: str, mode: int, dir_fd: Optional[int] = None) -> bool:
    """mkdir that tolerates an existing directory (idempotent), then forces the exact mode.

    Returns True when the directory was created.  The parent is not fsynced here: callers fsync or syncfs
    once for many directories.
    """
    created = True
    try:
        os.mkdir(name, 0o700, dir_fd=dir_fd)
    except FileExistsError:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            raise
        created = False
    if not created or mode != 0o700 or process_umask() & 0o700:
        os.chmod(name, mode, dir_fd=dir_fd)
    return created


_umask_cache: List[int] = []


def process_umask() -> int:
    """The process's umask (read once: reading it means setting it)."""
    if not _umask_cache:
        _umask_cache.append(os.umask(0o022))
        os.umask(_umask_cache[0])
    return _umask_cache[0]


def temp_name(name: str) -> str:
    return f".{name}.a2o-tmp"


def discard_temp(dir_fd: int, name: str) -> None:
    """Remove the temp file an interrupted ``atomic_write`` of ``name`` may have left (a kill or power cut
    between its create and its rename)."""
    try:
        os.unlink(temp_name(name), dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def atomic_write(
    dir_fd: int,
    name: str,
    data: bytes,
    mode: int,
    owner: Optional[Tuple[int, int]] = None,
    times_ns: Optional[Tuple[int, int]] = None,
    sync: bool = True,
) -> None:
    """Replace ``name`` in ``dir_fd`` by ``data``: write a temp file, fsync, rename over, fsync the directory.

    A power cut leaves either the old or the new file, never a truncated one.  ``sync=False`` leaves out the
    two fsyncs, for a step that writes several files and then makes them all durable with one ``syncfs``.
    """
    tmp = temp_name(name)
    discard_temp(dir_fd, name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if owner is not None:
                os.fchown(fd, owner[0], owner[1])
            os.fchmod(fd, mode)
            if times_ns is not None:
                os.utime(fd, ns=times_ns)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError:
        discard_temp(dir_fd, name)  # a full disk must not leave a half-written temp file behind
        raise
    if sync:
        os.fsync(dir_fd)
    checkpoints.reached(f"write {name}")


def create_file(dir_fd: int, name: str, data: bytes, mode: int) -> None:
    """Write ``name``, a file of a new layer directory, and leave its durability to the caller's ``syncfs``.

    Created in place when it does not exist (nothing is replaced, so nothing can be lost half-way); when it
    does (the step is done again after a cut), replaced atomically (``atomic_write``), never truncated."""
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode & 0o777,
                     dir_fd=dir_fd)
    except FileExistsError:
        atomic_write(dir_fd, name, data, mode, sync=False)
        return
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if mode & ~0o777 or process_umask() & mode:
            os.fchmod(fd, mode)
    finally:
        os.close(fd)
    checkpoints.reached(f"write {name}")


def create_symlink(dir_fd: int, name: str, target: str) -> None:
    """``create_file`` for a symlink: made in place when absent, else replaced atomically if it differs."""
    try:
        os.symlink(target, name, dir_fd=dir_fd)
    except FileExistsError:
        atomic_symlink(dir_fd, name, target, sync=False)
        return
    checkpoints.reached(f"symlink {name}")


def atomic_symlink(dir_fd: int, name: str, target: str, sync: bool = True) -> None:
    """Create or replace the symlink ``name`` -> ``target`` atomically, then fsync the directory (or leave that
    to the caller's ``syncfs``: ``sync=False``)."""
    try:
        if os.readlink(name, dir_fd=dir_fd) == target:
            return
    except (FileNotFoundError, OSError):
        pass
    tmp = temp_name(name)
    discard_temp(dir_fd, name)
    os.symlink(target, tmp, dir_fd=dir_fd)
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    if sync:
        os.fsync(dir_fd)
    checkpoints.reached(f"symlink {name}")


def rename_durable(parent: str, old: str, new: str) -> None:
    """Rename within ``parent`` and fsync it, so the rename survives a power cut."""
    fd = open_dir(parent)
    try:
        os.rename(old, new, src_dir_fd=fd, dst_dir_fd=fd)
        os.fsync(fd)
    finally:
        os.close(fd)
    checkpoints.reached(f"rename {old} -> {new}")


def lexists(path: str, dir_fd: Optional[int] = None) -> bool:
    try:
        os.lstat(path, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True


def remove_tree(path: str) -> bool:
    """Remove ``path`` whatever it is, never following a symlink (shutil.rmtree walks by fd on Linux).

    Returns True when something was removed.  The caller makes the removal durable (fsync or syncfs).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)
    return True


def ensure_absent_durably(parent: str, name: str) -> None:
    """Remove ``parent/name`` if present and make that durable before returning."""
    path = os.path.join(parent, name)
    if remove_tree(path):
        fd = open_dir(parent)
        try:
            syncfs(fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        checkpoints.reached(f"removed {name}")
