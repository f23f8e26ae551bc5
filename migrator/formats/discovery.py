"""Discovery: the layers of ``aufs/diff`` with their ancestry, from the root's snapshot, the whole graph
validated (each chain fits overlay2, has no cycle, names only layers that are there, agrees with its parent's)
before anything is written.  A refusal names the layer and leaves the root as it was."""

from __future__ import annotations

import os
from typing import Dict, List

from migrator.errors import Refused
from migrator.formats import aufs, images
from migrator.formats.overlay2 import MAX_LOWERS
from migrator.formats.snapshot import RootSnapshot


def discover(snap: RootSnapshot, skip_broken_chains: bool = False) -> aufs.Discovery:
    """The layers of ``aufs/diff`` with their ancestry, the whole graph validated, parents first.

    ``skip_broken_chains`` (the operator accepted missing storage): a layer whose ancestor has no diff is left
    out and reported, instead of refusing the migration; nothing could mount it on either driver.
    """
    result = aufs.Discovery()
    refusal = snap.unreadable_refusal()
    if refusal:
        raise Refused(refusal)
    if snap.diff_state == "missing":
        return result
    if snap.diff_state != "present":
        raise Refused(f"{os.path.join(snap.root, 'aufs', 'diff')} is not a directory")
    candidates = _candidates(snap, result)
    for name in candidates:
        seen, current = {name}, candidates[name]
        while current:
            parent = current[0]
            if parent in seen:
                raise Refused(f"layer {name} has a cycle in its ancestry (through {parent})")
            seen.add(parent)
            current = candidates.get(parent, [])
    if skip_broken_chains:
        for name in sorted(candidates):
            gone = [a for a in candidates[name] if a not in candidates]
            if gone:
                result.findings.append(("skipped-layer-missing-ancestor", f"aufs/diff/{name} (its ancestor "
                                                                           f"{gone[0]} has no aufs/diff/{gone[0]})"))
        candidates = {name: a for name, a in candidates.items() if all(x in candidates for x in a)}
    _check_ancestry(candidates)
    writable = snap.store.mount_ids()
    result.layers = [aufs.AufsLayer(id=name, ancestors=ancestors, writable=name in writable,
                               times=(snap.diff[name].atime_ns, snap.diff[name].mtime_ns))
                     for name, ancestors in sorted(candidates.items(), key=lambda item: (len(item[1]), item[0]))]
    return result


def _candidates(snap: RootSnapshot, result: aufs.Discovery) -> Dict[str, List[str]]:
    """The layer directories of ``aufs/diff`` and their ancestors; what is not a layer is refused or reported."""
    candidates: Dict[str, List[str]] = {}
    without_layers_file = []
    for name, entry in snap.diff.items():
        if entry.kind == aufs.SYMLINK:
            raise Refused(f"aufs/diff/{name} is a symlink; refusing to follow it out of the layer store")
        if entry.kind != aufs.DIR:
            result.findings.append(("skipped-unexpected-file", f"aufs/diff/{name}"))
        elif aufs.is_removing(name):
            result.findings.append(("skipped-removing-layer", f"aufs/diff/{name}"))
        elif not aufs.valid_id(name):
            raise Refused(f"aufs/diff/{name!r} is not a layer id this tool recognises; move it out of aufs/diff")
        elif entry.dev != snap.dev:
            raise Refused(f"aufs/diff/{name} is on another filesystem than {snap.root}; hardlinks cannot cross it")
        elif name not in snap.layers:
            without_layers_file.append(name)
        elif snap.layers[name].ancestors is None:
            raise Refused(f"aufs/layers/{name} is garbled ({snap.layers[name].problem})")
        elif not snap.layers[name].ancestors and name in snap.store.references:
            candidates[name] = _repaired(snap, name, result)
        else:
            candidates[name] = list(snap.layers[name].ancestors)
    used = snap.store.references
    for name in without_layers_file:
        if name in used:
            raise Refused(f"layer {name} has no aufs/layers/{name} but the layer store uses it; "
                          "its ancestry is unknown")
        result.findings.append(("skipped-layer-without-layers-file", f"aufs/diff/{name}"))
    return candidates


def _repaired(snap: RootSnapshot, name: str, result: aufs.Discovery) -> List[str]:
    """An empty ``aufs/layers/<id>`` of a layer the layer store names: a base layer, unless the store records
    ancestors for it.  moby's aufs driver writes the file without fsync, so a power cut can empty it; the store
    writes its own atomically, so where they disagree the store is right.  aufs itself mounted such a layer
    alone (the view its containers had after the cut differs: the finding says so)."""
    ancestors = images.store_ancestry(os.path.join(snap.root, "image", "aufs"), snap.store, name)
    if ancestors:
        result.layer_findings.append(("layers-file-repaired", name, "/"))
    return ancestors


def _check_ancestry(candidates: Dict[str, List[str]]) -> None:
    """Each chain fits overlay2, has no cycle, names only layers that are there, and agrees with its parent's."""
    for name, ancestors in candidates.items():
        if len(ancestors) > MAX_LOWERS:
            raise Refused(f"layer {name} has {len(ancestors)} ancestors; overlay2 allows at most {MAX_LOWERS}")
        if name in ancestors or len(set(ancestors)) != len(ancestors):
            raise Refused(f"layer {name} has a cycle in its ancestry (aufs/layers/{name})")
        for ancestor in ancestors:
            if ancestor not in candidates:
                raise Refused(f"layer {name} names ancestor {ancestor}, which has no usable aufs/diff/{ancestor}")
        if ancestors and candidates[ancestors[0]] != ancestors[1:]:
            raise Refused(f"aufs/layers/{name} disagrees with aufs/layers/{ancestors[0]} about the ancestry")
