"""The image and layer store: ``image/aufs/`` copied to ``image/overlay2/`` (nothing in it names the driver), and
its layer store entries read.

    image/<driver>/imagedb/                   images, by content address
    image/<driver>/layerdb/sha256/<chain>/    an image layer: cache-id (the driver's layer id), diff (the sha256
                                              of its tar), size, parent, tar-split.json.gz
    image/<driver>/layerdb/mounts/<cid>/      a container's layers: mount-id, init-id, parent
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import List

from migrator.formats import aufs
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


TAR_SPLIT = "tar-split.json.gz"


@dataclass
class ImageLayer:
    """One entry of the layer store: its chain id, the driver's layer id (``cache-id``) and its ``diff``."""

    chain_id: str
    cache_id: str
    diff_id: str
    tar_split: str  # path of tar-split.json.gz (may not exist)


def read_small(path: str) -> str:
    return fsio.read_regular(path, 4096)[0].decode("ascii").strip()


def image_layers(image_dir: str) -> List[ImageLayer]:
    """Every layer of ``image_dir/layerdb/sha256/`` (entries being removed left out), by chain id."""
    base = os.path.join(image_dir, "layerdb", "sha256")
    try:
        names = sorted(os.listdir(base))
    except (FileNotFoundError, NotADirectoryError):
        return []
    layers = []
    for chain in names:
        if chain.endswith(aufs.REMOVING_SUFFIX):
            continue
        entry = os.path.join(base, chain)
        try:
            cache_id, diff_id = read_small(os.path.join(entry, "cache-id")), read_small(os.path.join(entry, "diff"))
        except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
            cache_id, diff_id = "", ""
        layers.append(ImageLayer(f"sha256:{chain}", cache_id, diff_id, os.path.join(entry, TAR_SPLIT)))
    return layers
