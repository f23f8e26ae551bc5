"""Turn a stopped overlay2 engine root into the root moby's aufs driver would have written for the same images
and containers.  Test code written from the aufs driver's rules, not from the migrator:

- an image layer is its tar (from ``docker save``) untarred into ``aufs/diff/<cache-id>``, ``.wh.`` entries kept
  as plain files (that is how aufs stores whiteouts and opaque markers);
- ``aufs/layers/<id>`` lists the ancestors' ids, nearest first, one a line;
- a container's ``-init`` layer and its own writable layer hold their changes in aufs form: deleted names as
  ``.wh.<name>`` files, opaque directories with ``.wh..wh..opq``; in a writable layer every whiteout is a
  hardlink of ``.wh..wh.aufs``, and aufs keeps ``.wh..wh.plnk/`` and ``.wh..wh.orph/`` beside it;
- ``image/aufs`` is the engine's layer and image store (nothing in it names the driver);
- each ``config.v2.json`` says ``"Driver":"aufs"``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from typing import Dict, List

import xattr

OVERLAY_PREFIX = b"trusted.overlay."


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def chain_ids(diff_ids: List[str]) -> List[str]:
    chains: List[str] = []
    for diff_id in diff_ids:
        if not chains:
            chains.append(diff_id)
        else:
            chains.append("sha256:" + hashlib.sha256(f"{chains[-1]} {diff_id}".encode()).hexdigest())
    return chains


def _untar_layer(data: bytes, dest: str) -> None:
    os.makedirs(dest)
    os.chmod(dest, 0o755)
    subprocess.run(["tar", "-xpf", "-", "--xattrs", "--xattrs-include=*", "--numeric-owner", "--same-owner",
                    "-C", dest], input=data, check=True)


def _overlay_dir_to_aufs(src: str, dest: str, writable: bool) -> None:
    """Copy an overlay2 diff directory, then rewrite its whiteouts and opaque dirs the aufs way."""
    subprocess.run(["cp", "-a", src, dest], check=True)
    base = os.path.join(dest, ".wh..wh.aufs")
    if writable:
        with open(base, "wb"):
            pass
        os.chmod(base, 0o444)
        os.makedirs(os.path.join(dest, ".wh..wh.plnk"), mode=0o700)
        with open(os.path.join(dest, ".wh..wh.plnk", "1234.5678"), "wb") as f:
            f.write(b"an aufs pseudo-link left by a power cut")
        os.makedirs(os.path.join(dest, ".wh..wh.orph"), mode=0o700)
    dir_times = {}
    for top, _dirs, files in os.walk(dest):
        st = os.lstat(top)
        dir_times[top] = (st.st_atime_ns, st.st_mtime_ns)
        for name in xattr.list(top, nofollow=True):
            if name.startswith(OVERLAY_PREFIX):
                if name == b"trusted.overlay.opaque" and xattr.get(top, name, nofollow=True) == b"y":
                    _whiteout_file(os.path.join(top, ".wh..wh..opq"), base if writable else None)
                xattr.remove(top, name, nofollow=True)
        for name in files:
            path = os.path.join(top, name)
            st = os.lstat(path)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                os.unlink(path)
                _whiteout_file(os.path.join(top, ".wh." + name), base if writable else None)
    for top, times in sorted(dir_times.items(), key=lambda kv: -len(kv[0])):
        os.utime(top, ns=times, follow_symlinks=False)


def _whiteout_file(path: str, base) -> None:
    if base is not None:
        os.link(base, path)
    else:
        with open(path, "wb"):
            pass
        os.chmod(path, 0o444)


def build_aufs_root(root: str, saved_images: Dict[str, bytes]) -> None:
    """``root`` is a stopped overlay2 engine root; ``saved_images`` maps an image reference to its
    ``docker save`` tar.  Afterwards the root is an aufs root and holds no overlay2 data."""
    layerdb = os.path.join(root, "image", "overlay2", "layerdb")
    diff_root = os.path.join(root, "aufs", "diff")
    layers_root = os.path.join(root, "aufs", "layers")
    os.makedirs(diff_root)
    os.makedirs(layers_root)
    os.makedirs(os.path.join(root, "aufs", "mnt"))
    ancestry: Dict[str, List[str]] = {}

    def add_layer(layer_id: str, ancestors: List[str]) -> None:
        ancestry[layer_id] = ancestors
        with open(os.path.join(layers_root, layer_id), "w") as f:
            f.write("".join(a + "\n" for a in ancestors))
        os.makedirs(os.path.join(root, "aufs", "mnt", layer_id), exist_ok=True)

    cache_of_chain: Dict[str, str] = {}
    for _ref, tar_bytes in saved_images.items():
        with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
            manifest = json.load(tar.extractfile("manifest.json"))[0]
            config = json.load(tar.extractfile(manifest["Config"]))
            diff_ids = config["rootfs"]["diff_ids"]
            cache_ids: List[str] = []
            for layer_path, chain in zip(manifest["Layers"], chain_ids(diff_ids)):
                cache_id = _read(os.path.join(layerdb, "sha256", chain.split(":")[1], "cache-id"))
                cache_of_chain[chain] = cache_id
                if cache_id not in ancestry:
                    _untar_layer(tar.extractfile(layer_path).read(), os.path.join(diff_root, cache_id))
                    add_layer(cache_id, list(reversed(cache_ids)))
                cache_ids.append(cache_id)

    mounts = os.path.join(layerdb, "mounts")
    for cid in sorted(os.listdir(mounts)) if os.path.isdir(mounts) else []:
        mount_id = _read(os.path.join(mounts, cid, "mount-id"))
        init_id = _read(os.path.join(mounts, cid, "init-id"))
        chain = _read(os.path.join(mounts, cid, "parent"))
        image_layers = []
        while chain:
            image_layers.append(cache_of_chain[chain])
            parent = os.path.join(layerdb, "sha256", chain.split(":")[1], "parent")
            chain = _read(parent) if os.path.exists(parent) else ""
        _overlay_dir_to_aufs(os.path.join(root, "overlay2", init_id, "diff"), os.path.join(diff_root, init_id), False)
        add_layer(init_id, image_layers)
        _overlay_dir_to_aufs(os.path.join(root, "overlay2", mount_id, "diff"), os.path.join(diff_root, mount_id),
                             True)
        add_layer(mount_id, [init_id] + image_layers)

    os.rename(os.path.join(root, "image", "overlay2"), os.path.join(root, "image", "aufs"))
    shutil.rmtree(os.path.join(root, "overlay2"))
    containers = os.path.join(root, "containers")
    for cid in os.listdir(containers) if os.path.isdir(containers) else []:
        cfg = os.path.join(containers, cid, "config.v2.json")
        with open(cfg, "rb") as f:
            data = f.read()
        assert data.count(b'"Driver":"overlay2"') == 1, cfg
        with open(cfg, "wb") as f:
            f.write(data.replace(b'"Driver":"overlay2"', b'"Driver":"aufs"'))
