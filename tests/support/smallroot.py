"""Engine roots made of metadata only (layer directories, ``aufs/layers``, the layer store, containers), built
without root: for the table-driven tests of the snapshot, the storage check and discovery.  Layers hold one file
each."""

from __future__ import annotations

import json
import os
import socket
from typing import Dict, Iterable, List, Optional, Tuple

CONFIG = "config.v2.json"


def write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def chain_id(n: int) -> str:
    return f"{n:064x}"


class SmallRoot:
    """``layers``: id -> ancestors (nearest first); every layer gets ``aufs/diff/<id>/f`` and its layers file,
    and the image layers (neither ``-init`` nor a container's) a layer store entry."""

    def __init__(self, root: str, layers: Dict[str, List[str]],
                 containers: Iterable[Tuple[str, str, str]] = (), images: bool = True) -> None:
        self.root = root
        os.makedirs(root, exist_ok=True)
        container_layers = {lid for c in containers for lid in (c[1], c[1] + "-init")}
        for lid, ancestors in layers.items():
            write(self.path("aufs", "diff", lid, "f"), b"x")
            write(self.path("aufs", "layers", lid), "".join(a + "\n" for a in ancestors).encode())
        os.makedirs(self.path("image", "aufs", "layerdb", "sha256"), exist_ok=True)
        os.makedirs(self.path("image", "aufs", "imagedb", "content", "sha256"), exist_ok=True)
        image_layers = [lid for lid in layers if lid not in container_layers]
        chains = {lid: chain_id(n) for n, lid in enumerate(image_layers)}
        for lid in image_layers:  # the store's chain follows the aufs ancestry, as an engine's does
            parent = layers[lid][0] if layers[lid] else None
            self.store_entry(chains[lid], cache_id=lid, parent=chains.get(parent))
        if images and image_layers:
            write(self.path("image", "aufs", "imagedb", "content", "sha256", "c" * 64), b"{}")
        for cid, mount_id, driver in containers:
            self.container(cid, driver)
            self.mount_entry(cid, mount_id, mount_id + "-init")

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def store_entry(self, chain: str, cache_id: Optional[str], parent: Optional[str] = None) -> str:
        d = self.path("image", "aufs", "layerdb", "sha256", chain)
        os.makedirs(d, exist_ok=True)
        if cache_id is not None:
            write(os.path.join(d, "cache-id"), cache_id.encode())
        write(os.path.join(d, "diff"), b"sha256:" + chain.encode())
        write(os.path.join(d, "size"), b"1")
        if parent:
            write(os.path.join(d, "parent"), b"sha256:" + parent.encode())
        return d

    def mount_entry(self, cid: str, mount_id: str, init_id: str) -> None:
        d = self.path("image", "aufs", "layerdb", "mounts", cid)
        write(os.path.join(d, "mount-id"), mount_id.encode())
        write(os.path.join(d, "init-id"), init_id.encode())
        write(os.path.join(d, "parent"), b"sha256:" + chain_id(0).encode())

    def container(self, cid: str, driver: str, state: Optional[dict] = None) -> None:
        doc = {"ID": cid, "Driver": driver, "State": state or {"Running": False}}
        write(self.path("containers", cid, CONFIG), json.dumps(doc).encode())


# What can stand where a small file belongs, each made at ``path`` (which must not exist).
def make_fifo(path: str) -> None:
    os.mkfifo(path)


def make_socket(path: str) -> None:
    fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(f"/proc/self/fd/{fd}/{os.path.basename(path)}")  # the full path may pass 108 bytes
    finally:
        s.close()
        os.close(fd)


def make_directory(path: str) -> None:
    os.mkdir(path)


def make_symlink(path: str) -> None:
    os.symlink("/etc/passwd", path)


def make_sparse_gib(path: str) -> None:
    with open(path, "wb") as f:
        f.truncate(1 << 30)


NOT_SMALL_FILES = {"fifo": make_fifo, "socket": make_socket, "directory": make_directory, "symlink": make_symlink,
                   "1 GiB sparse file": make_sparse_gib}


def tree_of(top, paths: Iterable[str]) -> str:
    """A tree of ``paths`` below ``top``: directories end with '/', the rest are empty files."""
    os.makedirs(top, exist_ok=True)
    for p in paths:
        full = os.path.join(top, p)
        if p.endswith("/"):
            os.makedirs(full, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(full), exist_ok=True)
            open(full, "wb").close()
    return str(top)
