"""What a running engine on aufs does to its root, done on disk in moby's order (no engine can run on aufs here:
this kernel has none).  Written from moby's layer store (``layer/layer_store.go``, ``layer/filestore.go``) and
its aufs driver (``daemon/graphdriver/aufs/aufs.go``), not from the migrator:

- a pull: the driver creates the layer (``aufs/mnt/<id>``, ``aufs/diff/<id>``, then ``aufs/layers/<id>``
  listing the ancestors), ``ApplyDiff`` extracts the tar into ``diff/<id>``, and only then the layer store
  commits it: its files are written in ``layerdb/tmp/write-set-<n>/`` and that directory is renamed to
  ``layerdb/sha256/<chain>``; then the image config goes into ``imagedb`` and the tag into
  ``repositories.json`` (replaced atomically);
- an ``rmi``: the tag and the image config go, then each layer no other image holds: ``sha256/<chain>`` is
  renamed to ``<chain>-<random>-removing``, the driver removes ``layers/<id>``, renames ``diff/<id>`` and
  ``mnt/<id>`` to ``…-removing`` and deletes them, and the renamed layerdb directory is deleted;
- a container writes into its read-write layer, ``aufs/diff/<mount-id>/``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass, field
from typing import Dict, List, Tuple


def image_dir(root: str) -> str:
    return os.path.join(root, "image", "aufs")


def _write_atomically(path: str, data: bytes) -> None:
    tmp = path + ".tmp-" + secrets.token_hex(4)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def _repositories(root: str) -> dict:
    with open(os.path.join(image_dir(root), "repositories.json")) as f:
        return json.load(f)


def set_tags(root: str, repo: str, tags: Dict[str, str]) -> None:
    """``repositories.json`` with ``repo``'s tags replaced (none: the repository goes), atomically."""
    doc = _repositories(root)
    repos = doc.setdefault("Repositories", {})
    if tags:
        repos[repo] = tags
    else:
        repos.pop(repo, None)
    _write_atomically(os.path.join(image_dir(root), "repositories.json"), json.dumps(doc).encode())


@dataclass
class StashedImage:
    """An image taken out of a root (so that it can be pulled into it later): its tags, its config and metadata,
    and its own layers (cache id, chain, ancestors), with their data, bottom first."""

    repo: str
    tags: Dict[str, str]
    image_hex: str
    where: str
    layers: List[Tuple[str, str, List[str]]] = field(default_factory=list)


def take_out_image(root: str, repo: str, image_hex: str, own_layers: List[Tuple[str, str]], where: str
                   ) -> StashedImage:
    """Move an image and its own layers (``(cache id, chain hex)``, bottom first) out of ``root`` into
    ``where``: the root is then as before the image was pulled."""
    os.makedirs(where)
    stash = StashedImage(repo, _repositories(root)["Repositories"][repo], image_hex, where)
    set_tags(root, repo, {})
    img = image_dir(root)
    for sub in ("content", "metadata"):
        src = os.path.join(img, "imagedb", sub, "sha256", image_hex)
        if os.path.lexists(src):
            os.rename(src, os.path.join(where, f"imagedb-{sub}"))
    for cache_id, chain in reversed(own_layers):
        with open(os.path.join(root, "aufs", "layers", cache_id)) as f:
            ancestors = [line for line in f.read().split("\n") if line]
        stash.layers.insert(0, (cache_id, chain, ancestors))
        os.rename(os.path.join(img, "layerdb", "sha256", chain), os.path.join(where, f"layerdb-{chain}"))
        os.rename(os.path.join(root, "aufs", "diff", cache_id), os.path.join(where, f"diff-{cache_id}"))
        os.unlink(os.path.join(root, "aufs", "layers", cache_id))
        os.rmdir(os.path.join(root, "aufs", "mnt", cache_id))
    return stash


def pull(root: str, stash: StashedImage) -> None:
    """Pull the stashed image back in, as moby does: each layer created, extracted, then committed; then the
    image config and the tags."""
    img = image_dir(root)
    for cache_id, chain, ancestors in stash.layers:
        os.mkdir(os.path.join(root, "aufs", "mnt", cache_id), 0o755)
        diff = os.path.join(root, "aufs", "diff", cache_id)
        os.mkdir(diff, 0o755)
        with open(os.path.join(root, "aufs", "layers", cache_id), "w") as f:
            f.write("".join(a + "\n" for a in ancestors))
        extracted = os.path.join(stash.where, f"diff-{cache_id}")
        for name in os.listdir(extracted):
            os.rename(os.path.join(extracted, name), os.path.join(diff, name))
        st = os.lstat(extracted)
        os.chmod(diff, st.st_mode & 0o7777)
        os.utime(diff, ns=(st.st_atime_ns, st.st_mtime_ns))
        tmp = os.path.join(img, "layerdb", "tmp")
        os.makedirs(tmp, exist_ok=True)
        write_set = os.path.join(tmp, f"write-set-{secrets.randbelow(10**9)}")
        shutil.copytree(os.path.join(stash.where, f"layerdb-{chain}"), write_set)
        os.rename(write_set, os.path.join(img, "layerdb", "sha256", chain))
    for sub in ("content", "metadata"):
        src = os.path.join(stash.where, f"imagedb-{sub}")
        if os.path.lexists(src):
            os.rename(src, os.path.join(img, "imagedb", sub, "sha256", stash.image_hex))
    set_tags(root, stash.repo, stash.tags)


def remove_image(root: str, repo: str, image_hex: str, own_layers: List[Tuple[str, str]]) -> None:
    """``docker rmi`` of an image no container uses: tags, config, then its own layers (``(cache id, chain
    hex)``), top first, each the way the layer store and the aufs driver remove it."""
    set_tags(root, repo, {})
    img = image_dir(root)
    for sub in ("content", "metadata"):
        path = os.path.join(img, "imagedb", sub, "sha256", image_hex)
        if os.path.lexists(path):
            shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
    for cache_id, chain in reversed(own_layers):
        remove_layer(root, cache_id, chain)


def remove_layer(root: str, cache_id: str, chain: str) -> None:
    """moby's ``deleteLayer`` with the aufs driver's ``Remove``."""
    sha256 = os.path.join(image_dir(root), "layerdb", "sha256")
    removing = os.path.join(sha256, f"{chain}-{secrets.token_hex(32)}-removing")
    os.rename(os.path.join(sha256, chain), removing)
    os.unlink(os.path.join(root, "aufs", "layers", cache_id))
    for sub in ("diff", "mnt"):
        path = os.path.join(root, "aufs", sub, cache_id)
        os.rename(path, path + "-removing")
        shutil.rmtree(path + "-removing")
    shutil.rmtree(removing)


def write_in_container(root: str, mount_id: str, rel: str, data: bytes) -> None:
    """A container writing a new file into its read-write layer (aufs creates its parent directories there)."""
    path = os.path.join(root, "aufs", "diff", mount_id, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
