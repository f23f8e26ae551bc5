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

import json
import os
import stat
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

from migrator.formats import aufs, containers
from migrator.paths import Paths

REMOVING = aufs.REMOVING_SUFFIX


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


def _is_dir(path: str) -> Optional[bool]:
    """True for a directory, False for anything else (a symlink included), None when nothing is there."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return None


def _listdir(path: str) -> Optional[List[str]]:
    return sorted(os.listdir(path)) if _is_dir(path) else None


def _read_id(path: str) -> Optional[str]:
    try:
        return aufs.read_small(path, 4096).decode("ascii").strip() or None
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _container_gone_or_dying(root: str, cid: str) -> bool:
    """A container whose config is gone, or marked dead or being removed: its removal was cut off."""
    try:
        data, _st = containers.read_config(os.path.join(root, "containers", cid, containers.CONFIG))
    except FileNotFoundError:
        return True
    except (OSError, ValueError):
        return False
    try:
        doc = json.loads(data)
    except ValueError:
        return False
    state = doc.get("State") if isinstance(doc, dict) else None
    return isinstance(state, dict) and bool(state.get("Dead") or state.get("RemovalInProgress"))


def check(paths: Paths, containers_on_aufs: List[str]) -> StorageCheck:
    """Compare every reference to a layer with ``aufs/diff/``; ``containers_on_aufs`` are the containers whose
    ``config.v2.json`` says aufs (``containers.find_containers``)."""
    result = StorageCheck()
    kind = _is_dir(paths.aufs_diff)
    diff_names = _listdir(paths.aufs_diff) or []
    present: Set[str] = {n for n in diff_names if not n.endswith(REMOVING)}
    if kind is None:
        result.diff_state = "missing"
    elif not kind:
        result.diff_state = "not a directory"
    elif not present:
        result.diff_state = "empty"
    being_removed = {n[:-len(REMOVING)] for n in diff_names if n.endswith(REMOVING)}
    named: Dict[str, List[str]] = {}

    def expect(lid: Optional[str], by: str) -> None:
        if lid and lid not in present:
            named.setdefault(lid, []).append(by)

    layers_dir = os.path.join(paths.aufs, "layers")
    layer_files = _listdir(layers_dir) or []
    for name in layer_files:
        if name.endswith(REMOVING):
            continue
        expect(name, f"aufs/layers/{name}")
        try:
            ancestors = aufs.parse_layers_file(aufs.read_small(os.path.join(layers_dir, name),
                                                               aufs.LAYERS_FILE_MAX))
        except (OSError, ValueError, UnicodeDecodeError):
            continue  # discovery refuses a garbled layers file with its own message
        for ancestor in ancestors:
            expect(ancestor, f"aufs/layers/{name}")

    layerdb = os.path.join(paths.image_aufs, "layerdb")
    for chain in _listdir(os.path.join(layerdb, "sha256")) or []:
        if chain.endswith(REMOVING):
            result.debris.append(("skipped-removing-layer-store-entry", f"image/aufs/layerdb/sha256/{chain}"))
            continue
        expect(_read_id(os.path.join(layerdb, "sha256", chain, "cache-id")), f"image/aufs/layerdb/sha256/{chain}")

    mounts = set(_listdir(os.path.join(layerdb, "mounts")) or [])
    for cid in sorted(mounts):
        ids = [_read_id(os.path.join(layerdb, "mounts", cid, f)) for f in ("mount-id", "init-id")]
        gone = [lid for lid in ids if lid and lid not in present]
        if gone and _container_gone_or_dying(paths.root, cid):
            result.debris.append(("removed-container-layers", f"image/aufs/layerdb/mounts/{cid} names "
                                  f"{', '.join(gone)}; the container's removal was cut off"))
            continue
        for lid in ids:
            expect(lid, f"image/aufs/layerdb/mounts/{cid}")

    for lid in sorted(named):
        if lid in being_removed:
            result.debris.append(("layer-being-removed", f"aufs/diff/{lid}{REMOVING} (named by "
                                  f"{_some(named[lid])})"))
        elif named[lid] == [f"aufs/layers/{lid}"] and result.diff_state == "present":
            result.debris.append(("skipped-orphan-layers-file", f"aufs/layers/{lid} (no aufs/diff/{lid}, and "
                                  "nothing else names the layer)"))
        else:
            result.missing_layers[lid] = named[lid]

    has_layers = bool(present) or any(not n.endswith(REMOVING) for n in layer_files)
    if has_layers or containers_on_aufs:
        on_aufs = (f"{len(present)} layer(s) in aufs/diff/, {len(layer_files)} in aufs/layers/ and "
                   f"{len(containers_on_aufs)} container(s) on aufs")
        for sub in ("layerdb", "imagedb"):
            if _listdir(os.path.join(paths.image_aufs, sub)) is None:
                result.missing_metadata.append(f"image/aufs/{sub}/ is gone while {on_aufs}")
    if _listdir(layerdb) is not None:
        for cid in containers_on_aufs:
            if cid in mounts:
                continue
            if _container_gone_or_dying(paths.root, cid):
                result.debris.append(("removed-container-layers", f"containers/{cid} is dead and its "
                                      "image/aufs/layerdb/mounts/ entry is gone; the container's removal was cut off"))
            else:
                result.missing_metadata.append(f"image/aufs/layerdb/mounts/{cid}/ is gone while container {cid} "
                                               "is on aufs")
    return result


def nothing_to_migrate(paths: Paths) -> bool:
    """No aufs/, no image/aufs/ and no container on aufs: a root that never used aufs, or one cleaned up.
    ``aufs/`` alone gone while the rest still names aufs is missing storage, which the check refuses."""
    return (not os.path.lexists(paths.aufs) and not os.path.lexists(paths.image_aufs)
            and not containers.any_on_aufs(paths.root))
