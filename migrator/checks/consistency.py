"""Is the storage all there?  What the root's metadata expects, held against what ``aufs/diff/`` holds.

Four things name layers: ``aufs/layers/`` (a file per layer, and the ancestors inside it), the image layer store
``image/aufs/layerdb/sha256/*/cache-id``, the containers' ``image/aufs/layerdb/mounts/*/{mount-id,init-id}``, and
each container on aufs (``containers/*/config.v2.json``) needs its ``mounts/`` entry.  When they name layers that
``aufs/diff/`` does not hold, the likely cause is not the engine: it is a partition that did not mount or a
restore that brought back the metadata without the data.  Migrating such a root "completes" with the layers
missing, and ``cleanup`` then deletes the only metadata that could have found them again, so it is refused.

What the engine itself leaves behind when a removal is cut off is debris, not missing storage (the order of
each removal is moby's, v20.10 ``layer/layer_store.go`` and ``daemon/graphdriver/aufs/aufs.go``):
- the aufs driver removes ``layers/<id>`` first, then renames ``diff/<id>`` to ``<id>-removing`` and deletes it
  (older drivers renamed first and removed ``layers/<id>`` last, and every driver deletes leftover
  ``-removing`` directories at its start): a name with ``<id>-removing`` beside it is being removed, and a
  ``layers/<id>`` that nothing else names, beside other layers, is what such a cut leaves;
- the layer store renames ``sha256/<chain>`` to ``<chain>-<random>-removing`` before it removes the layer: such
  an entry names nothing that must exist;
- a container's layers are removed before its ``mounts/`` entry and its directory, and the container is marked
  dead (``State.Dead``, or ``RemovalInProgress``) before that starts: the layers of a dead or config-less
  container may be gone.

Nothing here writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from migrator.formats import aufs
from migrator.formats.snapshot import RootSnapshot


@dataclass
class StorageCheck:
    """The outcome: ``missing`` pieces refuse the migration (unless accepted), ``debris`` is reported only."""

    diff_state: str = "present"  # present, empty or missing: aufs/diff/ itself
    missing_layers: Dict[str, List[str]] = field(default_factory=dict)  # id -> what names it
    missing_metadata: List[str] = field(default_factory=list)  # what is gone, and who needs it
    debris: List[Tuple[str, str]] = field(default_factory=list)  # (kind, detail)

    @property
    def complete(self) -> bool:
        return not self.missing_layers and not self.missing_metadata

    def findings(self) -> List[Tuple[str, str]]:
        """Every missing piece and every piece of debris, as (kind, detail) findings."""
        rows = [("missing-layer", f"aufs/diff/{lid} (named by {_some(by)})")
                for lid, by in sorted(self.missing_layers.items())]
        rows += [("missing-image-metadata", what) for what in self.missing_metadata]
        return rows + self.debris

    def refusal(self) -> Optional[str]:
        """The one line a refused run prints, naming what is missing and the likely cause."""
        if self.complete:
            return None
        parts = []
        if self.missing_layers:
            sources = sorted({_source(by) for names in self.missing_layers.values() for by in names})
            count = len(self.missing_layers)
            first = min(self.missing_layers)
            if self.diff_state != "present":
                parts.append(f"aufs/diff/ is {self.diff_state} but {' and '.join(sources)} name {count} layer(s) "
                             f"(e.g. {first})")
            else:
                parts.append(f"{count} layer(s) named by {' and '.join(sources)} have no aufs/diff/ directory "
                             f"(e.g. aufs/diff/{first})")
        if self.missing_metadata:
            more = f" and {len(self.missing_metadata) - 1} more" if len(self.missing_metadata) > 1 else ""
            parts.append(f"image metadata missing: {self.missing_metadata[0]}{more}")
        where = "aufs/diff/" if self.missing_layers else "image/aufs/"
        return (f"storage missing: {'; '.join(parts)}; is the filesystem that holds {where} mounted, or was the "
                "root restored only in part? (nothing was changed; --accept-missing-storage migrates the rest)")


def _some(names: List[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _source(named_by: str) -> str:
    for prefix in ("aufs/layers/", "image/aufs/layerdb/mounts/", "image/aufs/layerdb/sha256/"):
        if named_by.startswith(prefix):
            return prefix
    return named_by


def check(snap: RootSnapshot, containers_on_aufs: List[str]) -> StorageCheck:
    """Compare every reference to a layer with ``aufs/diff/``; ``containers_on_aufs`` are the containers whose
    ``config.v2.json`` says aufs (``containers.find_containers``)."""
    result = StorageCheck()
    present = snap.present
    if snap.diff_state != "present":
        result.diff_state = snap.diff_state
    elif not present:
        result.diff_state = "empty"
    named = _named_layers(snap, result)
    for lid in sorted(named):
        if lid in present:
            continue
        if lid in snap.being_removed:
            result.debris.append(("layer-being-removed", f"aufs/diff/{lid}{aufs.REMOVING_SUFFIX} (named by "
                                  f"{_some(named[lid])})"))
        elif named[lid] == [f"aufs/layers/{lid}"] and result.diff_state == "present":
            result.debris.append(("skipped-orphan-layers-file", f"aufs/layers/{lid} (no aufs/diff/{lid}, and "
                                  "nothing else names the layer)"))
        else:
            result.missing_layers[lid] = named[lid]
    _check_metadata(snap, containers_on_aufs, result)
    return result


def _named_layers(snap: RootSnapshot, result: StorageCheck) -> Dict[str, List[str]]:
    """Every layer id something names, with what names it; the layer store's debris goes to ``result``."""
    named: Dict[str, List[str]] = {}

    def expect(lid: Optional[str], by: str) -> None:
        if lid:
            named.setdefault(lid, []).append(by)

    for name, layers_file in snap.layers.items():
        expect(name, f"aufs/layers/{name}")
        for ancestor in layers_file.ancestors or ():  # discovery refuses a garbled one with its own message
            expect(ancestor, f"aufs/layers/{name}")
    for chain in snap.store.removing:
        result.debris.append(("skipped-removing-layer-store-entry", f"image/aufs/layerdb/sha256/{chain}"))
    for chain, layer in snap.store.layers.items():
        expect(layer.cache_id, f"image/aufs/layerdb/sha256/{chain}")
    for cid, mount in snap.store.mounts.items():
        ids = [lid for lid in (mount.mount_id, mount.init_id) if lid]
        gone = [lid for lid in ids if lid not in snap.present]
        if gone and _gone_or_dying(snap, cid):
            result.debris.append(("removed-container-layers", f"image/aufs/layerdb/mounts/{cid} names "
                                  f"{', '.join(gone)}; the container's removal was cut off"))
            continue
        for lid in ids:
            expect(lid, f"image/aufs/layerdb/mounts/{cid}")
    return named


def _check_metadata(snap: RootSnapshot, containers_on_aufs: List[str], result: StorageCheck) -> None:
    """The layer store and image store must be there while anything is on aufs, and each container on aufs
    needs its ``mounts/`` entry."""
    present = snap.present
    if present or snap.layers or containers_on_aufs:
        on_aufs = (f"{len(present)} layer(s) in aufs/diff/, {len(snap.layers)} in aufs/layers/ and "
                   f"{len(containers_on_aufs)} container(s) on aufs")
        for sub, there in (("layerdb", snap.store.layerdb), ("imagedb", snap.store.imagedb)):
            if not there:
                result.missing_metadata.append(f"image/aufs/{sub}/ is gone while {on_aufs}")
    if not snap.store.layerdb:
        return
    for cid in containers_on_aufs:
        if cid in snap.store.mounts:
            continue
        if _gone_or_dying(snap, cid):
            result.debris.append(("removed-container-layers", f"containers/{cid} is dead and its "
                                  "image/aufs/layerdb/mounts/ entry is gone; the container's removal was cut off"))
        else:
            result.missing_metadata.append(f"image/aufs/layerdb/mounts/{cid}/ is gone while container {cid} "
                                           "is on aufs")


def _gone_or_dying(snap: RootSnapshot, cid: str) -> bool:
    """A container whose config is gone, or marked dead or being removed: its removal was cut off."""
    facts = snap.containers.get(cid)
    return facts is None or (facts.is_dir and facts.config is None and not facts.problem) or facts.dead
