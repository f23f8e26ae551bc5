"""The image and layer store: ``image/aufs/`` copied to ``image/overlay2/`` (nothing in it names the driver)."""

from __future__ import annotations

import os
import stat
from typing import List

from migrator.fs import fsio, tree


def stage_copy(src: str, dst: str) -> int:
    """Copy ``src`` to a fresh ``dst`` keeping modes, owners, times and xattrs; return the entries copied.

    A partial ``dst`` from a cut-off attempt is removed first.  The caller makes the copy durable (syncfs).
    """
    fsio.remove_tree(dst)
    parent, name = os.path.split(dst)
    pfd = fsio.open_dir(parent)
    count = 0
    try:
        os.mkdir(name, 0o700, dir_fd=pfd)
        src_fd = fsio.open_dir(src, noatime=True)
        try:
            dst_fd = fsio.open_dir(name, pfd)
            try:
                def visit(s_fd: int, d_fd: int, _rel: bytes) -> List[str]:
                    nonlocal count
                    tree.copy_dir_meta(s_fd, d_fd)
                    subdirs = []
                    with os.scandir(s_fd) as it:
                        for entry in it:
                            count += 1
                            if entry.is_dir(follow_symlinks=False):
                                subdirs.append(entry.name)
                            else:
                                tree.copy_entry(s_fd, d_fd, entry.name)
                    for sub in subdirs:
                        os.mkdir(sub, 0o700, dir_fd=d_fd)
                    return subdirs

                tree.walk_pair(src_fd, dst_fd, visit, tree.copy_dir_times, label="image copy")
            finally:
                os.close(dst_fd)
        finally:
            os.close(src_fd)
        fsio.syncfs(pfd)
    finally:
        os.close(pfd)
    return count


def is_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False
