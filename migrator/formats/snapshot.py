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

Records are frozen, and two snapshots of the same root can be compared (``changes``): what appeared, what went,
what changed.  Nothing here writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Dict, FrozenSet, List, Mapping, Optional, Tuple

from migrator.formats import aufs, containers, images
from migrator.formats.aufs import DiffEntry, LayersFile
from migrator.formats.containers import ContainerFacts
from migrator.formats.images import LayerStore
from migrator.fs import fsio


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

    @property
    def present(self) -> FrozenSet[str]:
        """Names in ``aufs/diff/`` that are not being removed (of any kind: discovery judges the kind)."""
        return frozenset(name for name in self.diff if not aufs.is_removing(name))

    @property
    def being_removed(self) -> FrozenSet[str]:
        """Layer ids whose ``aufs/diff/<id>-removing`` is there."""
        return frozenset(aufs.removed_id(name) for name in self.diff if aufs.is_removing(name))

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


def read_root(root: str) -> RootSnapshot:
    """Read every fact of ``root`` that a migration depends on, once."""
    unreadable: List[Tuple[str, str]] = []
    diff_state, diff = aufs.read_diff_dir(root)
    layers = aufs.read_layers_files(root, unreadable)
    store = images.read_layer_store(os.path.join(root, "image", "aufs"), "image/aufs", unreadable)
    found = containers.read_containers(root, unreadable)
    return RootSnapshot(root=root, dev=os.lstat(root).st_dev, aufs_present=fsio.lexists(os.path.join(root, "aufs")),
                        image_aufs_present=fsio.lexists(os.path.join(root, "image", "aufs")), diff_state=diff_state,
                        diff=MappingProxyType(diff), layers=MappingProxyType(layers), store=store,
                        containers=MappingProxyType(found), unreadable=tuple(unreadable))

