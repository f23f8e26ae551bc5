"""One reading of an engine root's facts: the layers, the layer store and the containers, read once.

Every check before a migration (the storage check, discovery, the containers to switch, the plan's counts) and
a rollback without the state database is a function of this snapshot, so each fact has one reader and one set
of rules (``-removing`` is ``aufs.is_removing``).  Each small file is read by ``fsio.read_small``: a FIFO, socket,
directory, symlink or oversized file where a small file belongs is listed in ``unreadable``, never opened to
block or read without bound, and a migration refuses such a root naming the file.

What it reads::

    aufs/diff/<id>                  lstat of each entry: kind, device, inode, ctime, times
    aufs/layers/<id>                the ancestors (each file but those being removed)
    image/aufs/layerdb/sha256/*/    cache-id read; diff, size, parent checked (type and size)
    image/aufs/layerdb/mounts/*/    mount-id, init-id read; parent checked
    image/aufs/imagedb/             whether it is there, and how many images it holds
    containers/<id>/config.v2.json  the bytes and stat, the Driver, whether the container was dying
    overlay2*/ image/overlay2*/ .aufs2overlay/staging/
                                    which of the trees a migration builds are there, the layers the staging
                                    area holds, and the layers an in-place run moved out of aufs/diff

Records are frozen, and two snapshots of the same root can be compared (``changes``): what appeared, what went,
what changed.  Nothing here writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Dict, FrozenSet, List, Mapping, Optional, Tuple

from migrator.formats import aufs, containers, images, overlay2
from migrator.formats.aufs import DiffEntry, LayersFile
from migrator.formats.containers import ContainerFacts
from migrator.formats.images import LayerStore
from migrator.fs import fsio
from migrator.paths import AUFS, BUILT_TREES, IMAGE_AUFS, ORIGINALS, STAGING_AREA, TEMP_TREE, TREE, Paths


@dataclass(frozen=True)
class RootSnapshot:
    root: str
    dev: int  # the root's filesystem
    aufs_present: bool  # ROOT/aufs exists (whatever it holds)
    image_aufs_present: bool  # ROOT/image/aufs exists
    diff_state: str  # aufs/diff/ is "present", "missing" or "not a directory"
    diff: Mapping[str, DiffEntry] = field(default_factory=dict)  # every entry of aufs/diff/, by name
    layers: Mapping[str, LayersFile] = field(default_factory=dict)  # aufs/layers/<id>, by id
    store: LayerStore = field(default_factory=LayerStore)  # image/aufs/
    containers: Mapping[str, ContainerFacts] = field(default_factory=dict)
    unreadable: Tuple[Tuple[str, str], ...] = ()  # (path below the root, why) of small files that are not
    kept: Mapping[str, Tuple[bytes, os.stat_result]] = field(default_factory=dict)  # containers on overlay2 whose
    #                                  original (aufs) config an earlier attempt kept: (bytes, stat) by id
    built: FrozenSet[str] = frozenset()  # the trees a migration builds that are there (``paths.BUILT_TREES``)
    staged: FrozenSet[str] = frozenset()  # the layer directories of the staging area
    moved: Tuple[Tuple[str, str], ...] = ()  # (id, diff below the root) of layers moved out of aufs/diff
    #                                          (``overlay2.moved_below``)

    @property
    def present(self) -> FrozenSet[str]:
        """Names in ``aufs/diff/`` that are not being removed (of any kind: discovery judges the kind)."""
        return frozenset(name for name in self.diff if not aufs.is_removing(name))

    @property
    def being_removed(self) -> FrozenSet[str]:
        """Layer ids whose ``aufs/diff/<id>-removing`` is there."""
        return frozenset(aufs.removed_id(name) for name in self.diff if aufs.is_removing(name))

    def trees_built(self) -> List[str]:
        """The trees a migration builds that are there, below the root, in ``BUILT_TREES`` order."""
        return [tree for tree in BUILT_TREES if tree in self.built]

    def unreadable_refusal(self) -> Optional[str]:
        """The one line that refuses a root with a small file that is not one, naming the first."""
        if not self.unreadable:
            return None
        path, why = self.unreadable[0]
        more = f" (and {len(self.unreadable) - 1} more)" if len(self.unreadable) > 1 else ""
        return (f"{path} is unreadable ({why}){more}; the engine writes a small regular file there: move it "
                "away or restore it (nothing was changed)")

    def nothing_to_migrate(self) -> bool:
        """No aufs/, no image/aufs/ and no container on aufs: a root that never used aufs, or one cleaned up.
        ``aufs/`` alone gone while the rest still names aufs is missing storage, which the check refuses."""
        return (not self.aufs_present and not self.image_aufs_present
                and not any(c.on_aufs for c in self.containers.values()))

    def facts(self) -> Dict[str, object]:
        """Every fact by the path it was read from: what ``changes`` compares."""
        found: Dict[str, object] = {"aufs/diff": self.diff_state}
        found.update((f"aufs/diff/{name}", entry) for name, entry in self.diff.items())
        found.update((f"aufs/layers/{name}", entry) for name, entry in self.layers.items())
        db = "image/aufs/layerdb"
        found.update((f"{db}/sha256/{chain}", entry) for chain, entry in self.store.layers.items())
        found.update((f"{db}/sha256/{name}", "removing") for name in self.store.removing)
        found.update((f"{db}/mounts/{cid}", entry) for cid, entry in self.store.mounts.items())
        found.update((f"containers/{cid}", entry) for cid, entry in self.containers.items())
        found.update((path, f"unreadable: {why}") for path, why in self.unreadable)
        return found


@dataclass(frozen=True)
class Changes:
    """What differs between two snapshots of one root, by path below it."""

    added: Tuple[str, ...] = ()
    removed: Tuple[str, ...] = ()
    changed: Tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)


def changes(before: RootSnapshot, after: RootSnapshot) -> Changes:
    """What appeared, went or changed from ``before`` to ``after`` (access times are not compared)."""
    old, new = before.facts(), after.facts()
    return Changes(tuple(sorted(new.keys() - old.keys())), tuple(sorted(old.keys() - new.keys())),
                   tuple(sorted(p for p in old.keys() & new.keys() if old[p] != new[p])))


def read_root(paths: Paths) -> RootSnapshot:
    """Read every fact of the root that a migration depends on, once, each below one descriptor of the root
    (a root renamed, or a directory in it replaced by a symlink, while it is read is not read in two places)."""
    root_fd = fsio.open_dir(paths.root, noatime=True)  # ``Paths.checked``: the root is no symlink
    try:
        return _read_below(paths.root, root_fd)
    finally:
        os.close(root_fd)


def _read_below(root: str, root_fd: int) -> RootSnapshot:
    unreadable: List[Tuple[str, str]] = []
    diff_state, diff = aufs.read_diff_dir(root_fd)
    layers = aufs.read_layers_files(root_fd, unreadable)
    store = images.read_layer_store(root_fd, IMAGE_AUFS, unreadable)
    found = containers.read_containers(root_fd, unreadable)
    kept = {cid: k for cid, k in ((cid, containers.kept_original(ORIGINALS, cid, root_fd))
                                  for cid, c in found.items() if c.driver == "overlay2") if k is not None}
    built = frozenset(t for t in BUILT_TREES if fsio.lexists(t, root_fd))
    staged = frozenset(overlay2.layer_ids(STAGING_AREA, root_fd)) if STAGING_AREA in built else frozenset()
    moved = tuple(overlay2.moved_below(root_fd)) if TEMP_TREE in built or TREE in built else ()
    return RootSnapshot(root=root, dev=os.fstat(root_fd).st_dev, aufs_present=fsio.lexists(AUFS, root_fd),
                        image_aufs_present=fsio.lexists(IMAGE_AUFS, root_fd), diff_state=diff_state,
                        diff=MappingProxyType(diff), layers=MappingProxyType(layers), store=store,
                        containers=MappingProxyType(found), unreadable=tuple(unreadable),
                        kept=MappingProxyType(kept), built=built, staged=staged, moved=moved)
