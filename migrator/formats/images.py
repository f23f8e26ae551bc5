"""The image and layer store: ``image/aufs/`` staged as ``image/overlay2/`` (nothing in it names the driver), and
its layer store entries read.

    image/<driver>/imagedb/                   images, by content address
    image/<driver>/layerdb/sha256/<chain>/    an image layer: cache-id (the driver's layer id), diff (the sha256
                                              of its tar), size, parent, tar-split.json.gz
    image/<driver>/layerdb/mounts/<cid>/      a container's layers: mount-id, init-id, parent
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
import stat
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Dict, FrozenSet, Iterator, List, Mapping, Optional, Set, Tuple

import xattr

from migrator.formats import aufs
from migrator.fs import fsio, tree

LINKED_PARTS = (b"layerdb/sha256/", b"imagedb/", b"distribution/", b"repositories.json")
"""The parts of ``image/<driver>/`` whose files the engine never rewrites in place (moby, ``layer/filestore.go``:
a layer store entry is written whole in ``layerdb/tmp/`` and renamed in; ``image/fs.go``,
``reference/store.go`` and ``distribution/metadata/metadata.go`` replace a file by ``ioutils.AtomicWriteFile``,
a write to a temporary file and a rename; removal is ``os.RemoveAll``).  A file there can be shared by a hardlink:
whatever the engine does to ``image/overlay2/`` after the switch leaves the inode that ``image/aufs/`` names as
it was.  Everything else is copied: ``layerdb/mounts/`` is written by ``ioutil.WriteFile`` (truncate in place),
and a file this list does not name is one whose writer was not checked."""


def copy_store(src: str, dst: str) -> Tuple[int, int]:
    """Build a fresh ``dst`` from ``src``: directories made with the source's modes, owners, times and xattrs,
    the files of ``LINKED_PARTS`` hardlinked, every other entry copied; return (entries linked, entries copied).

    A partial ``dst`` from a cut-off attempt is removed first.  Nothing is synced per file: one ``syncfs`` at
    the end makes the whole tree durable (the caller records it staged only after).  Nothing in ``src`` is
    changed (a link adds a name to its inode, not a byte or an attribute).
    """
    fsio.remove_tree(dst)
    counts = [0, 0]

    def visit(s_fd: int, d_fd: int, rel: bytes) -> List[str]:
        tree.copy_dir_meta(s_fd, d_fd)
        linked = _linked_in(rel)
        subdirs = []
        with os.scandir(s_fd) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append(entry.name)
                elif entry.is_file(follow_symlinks=False) and linked(entry.name):
                    counts[_link_or_copy(s_fd, d_fd, entry.name)] += 1
                else:
                    tree.copy_entry(s_fd, d_fd, entry.name)
                    counts[1] += 1
        for sub in subdirs:
            os.mkdir(sub, 0o700, dir_fd=d_fd)
        return subdirs

    _walk_into(src, dst, visit, tree.copy_dir_times, "image copy")
    return counts[0], counts[1]


def update_store(src: str, dst: str) -> Tuple[int, int]:
    """Bring ``dst``, an earlier ``copy_store`` or ``update_store`` of ``src`` cut off anywhere or made while
    the engine wrote ``src``, to what ``copy_store`` would build now; return (files linked anew, entries copied
    anew).  Only what changed costs: the engine replaces a file of ``LINKED_PARTS`` by a rename, so a linked
    file whose inode is the source's is the source's file, known from the two directory listings with no
    ``stat``.  Every other entry is copied again (``layerdb/mounts/``: a few small files per container), an
    entry ``src`` no longer has is removed, a directory's metadata and times are set where they differ.

    Nothing is synced per entry: one ``syncfs`` at the end, as ``copy_store``.  Nothing in ``src`` is changed.
    """
    counts = [0, 0]

    def visit(s_fd: int, d_fd: int, rel: bytes) -> List[str]:
        _same_dir_meta(s_fd, d_fd)
        linked = _linked_in(rel)
        with os.scandir(d_fd) as it:
            present = {e.name: (e.inode(), e.is_dir(follow_symlinks=False)) for e in it}
        subdirs = []
        with os.scandir(s_fd) as it:
            for entry in it:
                there = present.pop(entry.name, None)
                if entry.is_dir(follow_symlinks=False):
                    if there is not None and not there[1]:
                        os.unlink(entry.name, dir_fd=d_fd)
                    if there is None or not there[1]:
                        os.mkdir(entry.name, 0o700, dir_fd=d_fd)
                    subdirs.append(entry.name)
                    continue
                is_linked = entry.is_file(follow_symlinks=False) and linked(entry.name)
                if is_linked and there is not None and there[0] == entry.inode():
                    continue
                if there is not None:
                    _remove_at(d_fd, entry.name, there[1])
                if is_linked:
                    counts[_link_or_copy(s_fd, d_fd, entry.name)] += 1
                else:
                    tree.copy_entry(s_fd, d_fd, entry.name)
                    counts[1] += 1
        for gone, (_ino, was_dir) in present.items():
            _remove_at(d_fd, gone, was_dir)
        return subdirs

    _walk_into(src, dst, visit, _same_dir_times, "image update")
    return counts[0], counts[1]


def _walk_into(src: str, dst: str, visit: tree.Visit, leave: tree.Leave, label: str) -> None:
    """``tree.walk_pair`` of ``src`` and ``dst`` (made if absent), then one ``syncfs`` for all it wrote."""
    parent, name = os.path.split(dst)
    pfd = fsio.open_dir(parent)
    try:
        fsio.make_dir(name, 0o700, dir_fd=pfd)
        src_fd = fsio.open_dir(src, noatime=True)
        try:
            dst_fd = fsio.open_dir(name, pfd)
            try:
                tree.walk_pair(src_fd, dst_fd, visit, leave, label=label)
            finally:
                os.close(dst_fd)
        finally:
            os.close(src_fd)
        fsio.syncfs(pfd)
    finally:
        os.close(pfd)


def _same_dir_meta(src_fd: int, dst_fd: int) -> None:
    """``tree.copy_dir_meta`` where the owner or mode differ, and the xattrs made the source's exactly."""
    s, d = os.fstat(src_fd), os.fstat(dst_fd)
    if (s.st_uid, s.st_gid) != (d.st_uid, d.st_gid):
        os.fchown(dst_fd, s.st_uid, s.st_gid)
    if stat.S_IMODE(s.st_mode) != stat.S_IMODE(d.st_mode):
        os.fchmod(dst_fd, stat.S_IMODE(s.st_mode))
    wanted = {n for n in tree.list_xattrs(src_fd) if not n.startswith(tree.OVERLAY_XATTR_PREFIX)}
    for extra in set(tree.list_xattrs(dst_fd)) - wanted:
        xattr.remove(dst_fd, extra)
    for name in wanted:
        xattr.set(dst_fd, name, xattr.get(src_fd, name))


def _same_dir_times(src_fd: int, dst_fd: int, _rel: bytes = b"") -> None:
    s, d = os.fstat(src_fd), os.fstat(dst_fd)
    if (s.st_atime_ns, s.st_mtime_ns) != (d.st_atime_ns, d.st_mtime_ns):
        os.utime(dst_fd, ns=(s.st_atime_ns, s.st_mtime_ns))


def _remove_at(dir_fd: int, name: str, is_dir: bool) -> None:
    if is_dir:
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


_LINKED_DIRS = tuple(part for part in LINKED_PARTS if part.endswith(b"/"))
_LINKED_FILES = {os.fsdecode(part) for part in LINKED_PARTS if not part.endswith(b"/")}


def _linked_in(rel: bytes) -> Callable[[str], bool]:
    """Whether a regular file named so in the directory ``rel`` (below ``image/<driver>/``) is hardlinked."""
    if (rel.lstrip(b"/") + b"/").startswith(_LINKED_DIRS):
        return lambda _name: True
    if not rel.strip(b"/"):
        return _LINKED_FILES.__contains__
    return lambda _name: False


def copy_need(top: str) -> Tuple[int, int]:
    """(inodes, bytes) that copying ``top`` (``copy_store``) adds to the filesystem: each directory, and each
    entry it copies; a hardlinked file adds only its name.  A linked file is known by its directory entry's
    type, with no ``lstat``: the image store holds a few files for each of thousands of layers."""
    try:
        fd = fsio.open_dir(top, noatime=True)
    except OSError:
        return 0, 0
    counts = [1, 0]
    try:
        counts[1] += os.fstat(fd).st_blocks * 512
        _count_copy(fd, b"", counts)
    finally:
        os.close(fd)
    return counts[0], counts[1]


def _count_copy(fd: int, rel: bytes, counts: List[int]) -> None:
    linked = _linked_in(rel)
    subdirs = []
    with os.scandir(fd) as it:
        for entry in it:
            if entry.is_file(follow_symlinks=False) and linked(entry.name):
                continue
            counts[0] += 1
            counts[1] += entry.stat(follow_symlinks=False).st_blocks * 512
            if entry.is_dir(follow_symlinks=False):
                subdirs.append(entry.name)
    for name in subdirs:
        sub = fsio.open_dir(name, fd, noatime=True)
        try:
            _count_copy(sub, rel + b"/" + os.fsencode(name), counts)
        finally:
            os.close(sub)


def _link_or_copy(s_fd: int, d_fd: int, name: str) -> int:
    """Hardlink (0), or copy (1) where the filesystem refuses the link (a mount point in between, the link
    limit)."""
    try:
        os.link(name, name, src_dir_fd=s_fd, dst_dir_fd=d_fd, follow_symlinks=False)
        return 0
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EMLINK, errno.EPERM):
            raise
    tree.copy_entry(s_fd, d_fd, name)
    return 1


def is_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


TAR_SPLIT = "tar-split.json.gz"
ID_MAX = 4096  # cache-id, diff, size, parent, mount-id, init-id: one id or number each


@dataclass(frozen=True)
class StoreLayer:
    """``layerdb/sha256/<chain>/``: the driver's layer id (``cache-id``), and, when asked for (the content proof
    does), the digest of its tar (``diff``) and the bytes its files hold (``size``); None where a file is
    missing, not asked for, or not ASCII."""

    chain: str
    cache_id: Optional[str]
    diff_id: Optional[str] = None
    size: Optional[str] = None


@dataclass(frozen=True)
class StoreMount:
    """``layerdb/mounts/<cid>/``: a container's writable layer (``mount-id``) and its init layer."""

    cid: str
    mount_id: Optional[str]
    init_id: Optional[str]


@dataclass(frozen=True)
class LayerStore:
    """What the layer store of one driver (``image/<driver>/``) holds, read once (``read_layer_store``)."""

    layerdb: bool = False  # layerdb/ is a directory
    imagedb: bool = False  # imagedb/ is a directory
    images: int = 0  # entries of imagedb/content/sha256/
    layers: Mapping[str, StoreLayer] = field(default_factory=dict)  # by chain (entries being removed left out)
    removing: Tuple[str, ...] = ()  # sha256/ entries being removed
    mounts: Mapping[str, StoreMount] = field(default_factory=dict)  # by container id

    # Each index below is built once, on first use: discovery asks for them per layer (thousands).

    @functools.cached_property
    def chain_by_cache_id(self) -> Mapping[str, str]:
        """The layer store entry (chain) of each image layer, by the driver's layer id."""
        return MappingProxyType({layer.cache_id: chain for chain, layer in self.layers.items() if layer.cache_id})

    @functools.cached_property
    def cache_ids(self) -> FrozenSet[str]:
        """The driver's ids of the image layers."""
        return frozenset(self.chain_by_cache_id)

    def mount_ids(self) -> Set[str]:
        """Containers' writable layers."""
        return {m.mount_id for m in self.mounts.values() if m.mount_id}

    @functools.cached_property
    def references(self) -> FrozenSet[str]:
        """Every layer id the store names: image layers, containers' writable and init layers."""
        return self.cache_ids | self.mount_ids() | {m.init_id for m in self.mounts.values() if m.init_id}


LAYER_FILES = ("cache-id", "diff", "size", "parent")  # the small files of a layerdb/sha256/ entry
MOUNT_FILES = ("mount-id", "init-id", "parent")  # and of a layerdb/mounts/ entry


def read_layer_store(base_fd: int, rel: str, unreadable: List[Tuple[str, str]],
                     contents: Tuple[str, ...] = ("cache-id",)) -> LayerStore:
    """The layer store at ``rel`` below the directory open as ``base_fd`` (``rel`` names it in messages too).
    Every small file of every entry is checked (its type and size, from the entry's listing); those in
    ``contents`` (and a container's ``mount-id`` and ``init-id``) are read, through ``fsio.read_small``.  One
    that is not a small regular file is added to ``unreadable`` (its path, why)."""
    layerdb = os.path.join(rel, "layerdb")
    layers: Dict[str, StoreLayer] = {}
    removing: List[str] = []
    for chain, ids in _entries(base_fd, os.path.join(layerdb, "sha256"), LAYER_FILES, contents, unreadable,
                               removing):
        layers[chain] = StoreLayer(chain, ids["cache-id"], ids["diff"], ids["size"])
    mounts = {cid: StoreMount(cid, ids["mount-id"], ids["init-id"]) for cid, ids in _entries(
        base_fd, os.path.join(layerdb, "mounts"), MOUNT_FILES, ("mount-id", "init-id"), unreadable)}
    fd, _state = fsio.open_dir_found(os.path.join(rel, "imagedb", "content", "sha256"), base_fd)
    images = 0
    if fd is not None:
        try:
            images = len(os.listdir(fd))
        finally:
            os.close(fd)
    return LayerStore(_is_dir_at(base_fd, layerdb), _is_dir_at(base_fd, os.path.join(rel, "imagedb")), images,
                      MappingProxyType(layers), tuple(removing), MappingProxyType(mounts))


def _is_dir_at(base_fd: int, rel: str) -> bool:
    fd, _state = fsio.open_dir_found(rel, base_fd)
    if fd is None:
        return False
    os.close(fd)
    return True


def _entries(base_fd: int, rel: str, files: Tuple[str, ...], contents: Tuple[str, ...],
             unreadable: List[Tuple[str, str]], removing: "List[str] | None" = None
             ) -> Iterator[Tuple[str, Dict[str, Optional[str]]]]:
    """Each directory entry of ``rel`` (below ``base_fd``) with its ``files`` checked and its ``contents`` read;
    entries being removed go to ``removing``."""
    top, _state = fsio.open_dir_found(rel, base_fd)
    if top is None:
        return
    try:
        names = sorted(os.listdir(top))
        for name in names:
            if aufs.is_removing(name):
                if removing is not None:
                    removing.append(name)
                continue
            fd, _state = fsio.open_dir_found(name, top)
            if fd is None:
                continue
            try:
                yield name, _read_entry(fd, f"{rel}/{name}", files, contents, unreadable)
            finally:
                os.close(fd)
    finally:
        os.close(top)


def _read_entry(fd: int, rel: str, files: Tuple[str, ...], contents: Tuple[str, ...],
                unreadable: List[Tuple[str, str]]) -> Dict[str, Optional[str]]:
    with os.scandir(fd) as it:
        listed = {e.name: e for e in it if e.name in files}
    ids: Dict[str, Optional[str]] = dict.fromkeys(files)
    for name, entry in listed.items():
        try:
            if name in contents:
                data = fsio.read_small(name, ID_MAX, dir_fd=fd, regular=entry.is_file(follow_symlinks=False))[0]
                ids[name] = data.decode("ascii").strip() or None
            else:
                fsio.check_small(entry.stat(follow_symlinks=False), ID_MAX)
        except FileNotFoundError:
            continue
        except fsio.NotSmallFile as exc:
            unreadable.append((f"{rel}/{name}", str(exc)))
        except UnicodeDecodeError:
            continue
    return ids


def store_ancestry(image_dir: str, store: LayerStore, layer_id: str) -> List[str]:
    """The ancestors of the layer ``layer_id`` (nearest first) as the layer store records them, which it writes
    atomically: an image layer's chain by its ``parent`` files, a container's ``-init`` layer on its image, its
    writable layer on the ``-init``.  Empty when the store names no parent (or does not name the layer).

    What for: moby's aufs driver writes ``aufs/layers/<id>`` with no fsync (``aufs.go``, ``Create``), so a
    power cut can leave it empty, and the layer would look like a base layer.  Read only for such layers."""
    by_cache = store.chain_by_cache_id
    ancestors: List[str] = []
    chain: Optional[str] = None
    for cid, mount in store.mounts.items():
        if layer_id in (mount.mount_id, mount.init_id):
            if layer_id == mount.mount_id and mount.init_id:
                ancestors.append(mount.init_id)
            chain = _small(os.path.join(image_dir, "layerdb", "mounts", cid, "parent"))
            break
    else:
        if layer_id in by_cache:
            chain = _small(os.path.join(image_dir, "layerdb", "sha256", by_cache[layer_id], "parent"))
    seen = set()
    while chain and chain not in seen:
        seen.add(chain)
        hex_id = chain.split(":", 1)[-1]
        entry = store.layers.get(hex_id)
        if entry is None or not entry.cache_id:
            return []  # a chain the store cannot follow: no better than the layers file
        ancestors.append(entry.cache_id)
        chain = _small(os.path.join(image_dir, "layerdb", "sha256", hex_id, "parent"))
    return ancestors


def _small(path: str) -> Optional[str]:
    try:
        return fsio.read_small(path, ID_MAX)[0].decode("ascii").strip() or None
    except (OSError, fsio.NotSmallFile, UnicodeDecodeError):
        return None


@dataclass
class ImageLayer:
    """One entry of the layer store, as the content proof takes it: its chain id, the driver's layer id
    (``cache-id``), its ``diff``, the bytes its ``size`` file records (0: unknown) and its tar-split's path."""

    chain_id: str
    cache_id: str
    diff_id: str
    tar_split: str  # path of tar-split.json.gz (may not exist)
    size: int = 0


def image_layers(image_dir: str) -> List[ImageLayer]:
    """Every layer of ``image_dir/layerdb/sha256/`` (entries being removed left out), by chain id."""
    fd = fsio.open_dir(os.path.dirname(image_dir) or ".")
    try:
        store = read_layer_store(fd, os.path.basename(image_dir), [], contents=("cache-id", "diff", "size"))
    finally:
        os.close(fd)
    return [ImageLayer(f"sha256:{chain}", layer.cache_id or "", layer.diff_id or "",
                       os.path.join(image_dir, "layerdb", "sha256", chain, TAR_SPLIT), _number(layer.size))
            for chain, layer in store.layers.items()]


def _number(text: Optional[str]) -> int:
    try:
        return int(text or 0)
    except ValueError:
        return 0
