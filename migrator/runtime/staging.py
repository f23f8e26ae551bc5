"""Staging: the image layers the engine has committed, converted while it runs, and what the cutover keeps.

``stage`` builds overlay2 layers with the hardlink strategy in ``.aufs2overlay/staging/`` (named after no
storage driver: dockerd up to 23 refuses to start beside two drivers' directories).  Its state is a run in
phase ``staging`` in the same database: each layer's states as ``run`` records them, and each layer's proof
(``scan/proof.py``), taken before any of its directories is linked.  Only layers the layer store has
committed are staged (``cache-id`` names them, no ``-removing``), with their whole ancestry: a layer still
being pulled, a container's layers and anything the store does not name wait for the cutover.

Each ``stage`` first judges what is staged against the root as it is now (``judge``): a layer the engine
removed, whose ancestry changed, whose proof no longer holds, or whose ancestor was dropped, is dropped (its
staged directory removed); then new committed layers are proved and added.  The database is then replaced
whole (``Store.create``), so it names exactly the layers the staging area holds.  A layer the engine removes
while it is being linked fails its step; the pass then drops it and goes on.

The cutover (``run`` with the engine stopped) judges the same way against its own discovery, then starts the
migration with the kept layers at their states (``start.begin``); the conversion renames the staging area to
``overlay2.temp/`` before its first wave (``move_into_place``).  Nothing here writes in ``aufs/`` or
``image/aufs/``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Optional, Sequence, Set, Tuple

from migrations_state.machine import COMMITTED, DISCOVERED, LOWERS_WRITTEN, ROLLED_BACK, STAGING
from migrations_state.schema import FindingRecord, LayerRecord, RunRecord, WhiteoutDirRecord
from migrations_state.store import Store
from migrator import checkpoints, interrupts
from migrator.errors import MigratorError, Refused
from migrator.formats import aufs, discovery, images, overlay2, snapshot
from migrator.formats.linkid import new_link_id
from migrator.fs import fsio
from migrator.paths import Paths
from migrator.runtime.lock import Held, open_store
from migrator.scan import proof
from migrator.strategies import registry
from migrator.strategies.base import Conversion
from migrator.strategies.runner import WaveRunner
from migrator.ui.progress import Reporter

PASSES = 20  # stage passes in one command when the engine keeps removing layers under it
ENGINE_SHARE = 0.05  # of the filesystem's inodes and blocks, left free for the running engine by stage


@dataclass
class Staged:
    """What the cutover keeps of the staging: layer rows by id (each with its state), their proofs, their
    whiteout directories, and the findings to record."""

    kept: Dict[str, LayerRecord] = field(default_factory=dict)
    proofs: Dict[str, Tuple[bytes, str]] = field(default_factory=dict)
    whiteout_dirs: List[WhiteoutDirRecord] = field(default_factory=list)
    findings: List[Tuple[Optional[str], str, str]] = field(default_factory=list)  # (layer, kind, detail)


def committed_layers(snap: snapshot.RootSnapshot) -> List[aufs.AufsLayer]:
    """The image layers the layer store has committed, of the root's discovery, whose whole ancestry is
    committed too, parents first: what ``stage`` may convert while the engine runs."""
    committed = snap.store.cache_ids
    return [layer for layer in discovery.discover(snap).layers
            if layer.id in committed and not layer.writable and all(a in committed for a in layer.ancestors)]


def judge(paths: Paths, records: Sequence[LayerRecord], proofs: Dict[str, Tuple[bytes, str]],
          wanted: Dict[str, List[str]], staged_dirs: FrozenSet[str]
          ) -> Tuple[List[LayerRecord], List[Tuple[LayerRecord, str]]]:
    """The staged layers still good for ``wanted`` (layer id → ancestors, as the root holds them now), and the
    others with why: removed, ancestry changed, proof broken (``proof.holds``), an ancestor dropped, or its
    staged directory missing (``staged_dirs``, the snapshot's).  ``records`` go parents first, so an ancestor
    is judged before its children."""
    kept: List[LayerRecord] = []
    dropped: List[Tuple[LayerRecord, str]] = []
    good: Set[str] = set()
    for record in records:
        interrupts.check()
        ancestors = record.ancestor_ids
        why: Optional[str]
        if record.id not in wanted:
            why = "the engine removed it (or it is no longer a committed image layer)"
        elif wanted[record.id] != ancestors:
            why = "its ancestry changed"
        elif any(a not in good for a in ancestors):
            why = "an ancestor of it was dropped"
        elif record.id not in proofs:
            why = "it has no proof"
        elif record.state != DISCOVERED and record.id not in staged_dirs:
            why = "its staged directory is missing"
        else:
            dirs, digest = proofs[record.id]
            why = proof.holds(paths.aufs_layer(record.id), proof.Proof(dirs, digest))
            if why is not None:
                why = f"aufs/diff/{record.id}: {why}"
        if why is None:
            kept.append(record)
            good.add(record.id)
        else:
            dropped.append((record, why))
    return kept, dropped


def refuse_if_crowding(paths: Paths, proofs: Sequence[proof.Proof], image: Tuple[int, int] = (0, 0)) -> None:
    """Refused when staging these layers (and ``image``, the (inodes, bytes) of a first copy of the image store)
    would leave the engine less than ``ENGINE_SHARE`` of the filesystem's inodes or blocks: the engine is
    serving, and a full disk is its failure, not ours.  Each layer's need is its directories (a new inode and
    block each) and its own files (``overlay2.layer_files``, at most)."""
    vfs = os.statvfs(paths.root)
    layer_inodes = sum(len(p.dirs.split(proof.SEP)) + overlay2.layer_files(True, True) for p in proofs)
    inodes, need_bytes = layer_inodes + image[0], layer_inodes * vfs.f_bsize + image[1]
    keep_inodes, keep_bytes = int(vfs.f_files * ENGINE_SHARE), int(vfs.f_blocks * vfs.f_frsize * ENGINE_SHARE)
    if inodes + keep_inodes > vfs.f_favail or need_bytes + keep_bytes > vfs.f_bavail * vfs.f_frsize:
        raise Refused(f"staging {len(proofs)} layer(s) needs about {inodes} inodes and {need_bytes >> 20} MiB, and "
                      f"the filesystem has {vfs.f_favail} inodes and {vfs.f_bavail * vfs.f_frsize >> 20} MiB free; "
                      f"stage leaves {ENGINE_SHARE:.0%} of it to the running engine: free space, or migrate "
                      "offline ('aufs2overlay plan' counts each strategy's need)")


def remove_dropped(paths: Paths, dropped: Sequence[Tuple[LayerRecord, str]], progress: Reporter) -> None:
    """Remove each dropped layer's staged directory and ``l/`` link, durably; idempotent."""
    if not dropped or not fsio.lexists(paths.staging):
        return
    links = os.path.join(paths.staging, overlay2.LINKS_DIR)
    for record, why in dropped:
        progress(f"staged layer {record.id} dropped: {why}")
        if fsio.lexists(os.path.join(links, record.link_id)):
            fsio.ensure_absent_durably(links, record.link_id)
        fsio.ensure_absent_durably(paths.staging, record.id)


def carried(record: LayerRecord, seq: int, proofs: Dict[str, Tuple[bytes, str]], **changes: object) -> LayerRecord:
    """A new row for a kept layer: what it recorded (its link id, state, count, proof), with ``changes``."""
    dirs, digest = proofs.get(record.id, (None, None))
    return dataclasses.replace(record, seq=seq, error=None, proof_dirs=dirs, proof=digest, **changes)


def unused_link_id(taken: Set[str]) -> str:
    link = new_link_id()
    while link in taken:
        link = new_link_id()
    taken.add(link)
    return link


def _kept_findings(store: Store, kept: Set[str]) -> List[Tuple[Optional[str], str, str]]:
    return [(f.layer_id, f.kind, f.detail) for f in store.findings() if f.layer_id is None or f.layer_id in kept]


def _finding_rows(findings: Sequence[Tuple[Optional[str], str, str]]) -> List[FindingRecord]:
    return [FindingRecord(layer_id=layer_id, kind=kind, detail=detail) for layer_id, kind, detail in findings]


# -- stage ------------------------------------------------------------------------------------------------


def refresh(paths: Paths, held: Held, progress: Reporter) -> Store:
    """The staging run, judged against the root as it is now: dropped layers removed, new committed layers
    proved and added (the database replaced whole when anything changed); the store to convert with."""
    store = held.store
    staging_run = store is not None and store.run().phase == STAGING
    snap = snapshot.read_root(paths)
    wanted = committed_layers(snap)
    records = store.layers() if staging_run else []
    proofs = store.staged_proofs() if staging_run else {}
    kept, dropped = judge(paths, records, proofs, {layer.id: layer.ancestors for layer in wanted}, snap.staged)
    good = {r.id for r in kept}
    added: List[Tuple[aufs.AufsLayer, proof.Proof]] = []
    findings: List[Tuple[Optional[str], str, str]] = []
    now = time.time_ns()
    for layer in wanted:
        if layer.id in good or any(a not in good for a in layer.ancestors):
            continue
        interrupts.check()
        try:
            taken = proof.take(paths.aufs_layer(layer.id), now)
        except OSError:
            continue  # removed since the root was read
        if taken is None:
            progress(f"layer {layer.id} changed less than {proof.RACY_NS // 10**9} s ago: left for a later stage "
                     "or the cutover")
            continue
        good.add(layer.id)
        added.append((layer, taken))
    if staging_run and not dropped and not added:
        return store
    remove_dropped(paths, dropped, progress)
    refuse_if_crowding(paths, [taken for _layer, taken in added],
                       (0, 0) if fsio.lexists(paths.staged_image) else images.copy_need(paths.image_aufs))
    findings = (_kept_findings(store, {r.id for r in kept}) if staging_run else []) + findings
    findings += [(None, "staged-layer-dropped", f"{r.id}: {why}") for r, why in dropped]
    parents = {ancestors[0] for ancestors in (listed.ancestors for listed in snap.layers.values())
               if ancestors}
    rows = [carried(r, seq, proofs) for seq, r in enumerate(kept)]
    taken_links = {r.link_id for r in rows}
    for layer, taken in added:
        rows.append(LayerRecord.discovered(layer.id, len(rows), layer.ancestors, unused_link_id(taken_links),
                                           layer.id in parents, False, layer.times, proof_dirs=taken.dirs,
                                           proof=taken.digest))
    whiteout_dirs = store.whiteout_dir_records({r.id for r in kept}) if staging_run else []
    if store is not None:
        store.close()
        held.store = None
    if not staging_run:
        fsio.ensure_absent_durably(paths.workdir, os.path.basename(paths.staging))  # of a lost staging run
    new = Store.create(paths.state_db, paths.root, registry.BESIDE_ENGINE, rows, [], _finding_rows(findings), (),
                       on_recorded=checkpoints.reached, phase=STAGING, whiteout_dirs=whiteout_dirs)
    progress(f"staging: {len(kept)} layers kept, {len(added)} to stage, {len(dropped)} dropped")
    return new


def stage(paths: Paths, held: Held, progress: Reporter, jobs: int) -> int:
    """``stage`` under the lock: the staging brought up to date with the root (``_stage``); how many layers
    are staged.  An error of the filesystem is recorded as the staging run's last error, then reported as one
    line that says how to go on."""
    refuse_unless_stageable(held.store.run() if held.store is not None else None, paths)
    try:
        _stage(paths, held, progress, jobs)
    except OSError as exc:
        if held.store is not None:
            held.store.set_error(str(exc))
        raise MigratorError(f"{exc}; fix the cause and run 'aufs2overlay stage' again: it resumes") from exc
    return counts(held.store)[0]


def _stage(paths: Paths, held: Held, progress: Reporter, jobs: int) -> None:
    """Pass after pass, until every committed layer is staged: a pass cut short by a layer that the engine
    removed under it drops that layer and goes on.  ``held.store`` is the store in use throughout."""
    for _ in range(PASSES):
        held.store = refresh(paths, held, progress)
        try:
            WaveRunner(registry.get(registry.BESIDE_ENGINE),
                       Conversion(paths.for_staging(), held.store, progress, jobs, held.lock_fd)).run()
            stage_image_store(paths, progress)
            return
        except OSError:
            wanted = {layer.id for layer in committed_layers(snapshot.read_root(paths))}
            if all(r.id in wanted for r in held.store.layers() if r.state != COMMITTED):
                raise
            progress("a layer was removed by the engine while it was being staged: dropping it")
    raise MigratorError(f"the engine removed layers during each of {PASSES} passes; run 'aufs2overlay stage' again")


def stage_image_store(paths: Paths, progress: Reporter) -> None:
    """The image store's copy (``paths.staged_image``), brought up to date while the engine serves, so that the
    cutover copies only what changed since (``migration.copy_image_store``).  The engine may replace or remove
    an entry under the walk: the copy is then left as it is, and the cutover, which converges any copy, brings
    it up to date."""
    if not images.is_dir(paths.image_aufs):
        return
    try:
        linked, copied = images.update_store(paths.image_aufs, paths.staged_image)
    except FileNotFoundError:
        progress("the engine changed the image store while it was copied: the cutover brings the copy up to date")
        return
    progress(f"image store staged ({linked} files linked, {copied} entries copied)")


def counts(store: Store) -> Tuple[int, int]:
    """(staged layers, layers in the staging run)."""
    states = store.layer_states()
    return states.get(COMMITTED, 0), sum(states.values())


def counts_of(paths: Paths) -> Dict[str, int]:
    """How many layers ``stage`` has staged, of how many it holds (``plan`` of a staged root)."""
    store = open_store(paths)
    try:
        staged, held = counts(store) if store is not None else (0, 0)
    finally:
        if store is not None:
            store.close()
    return {"staged": staged, "layers": held}


def refuse_unless_stageable(recorded: Optional[RunRecord], paths: Paths) -> None:
    if recorded is not None and recorded.phase not in (STAGING, ROLLED_BACK):
        raise Refused(f"a migration of {paths.root} is already {recorded.phase}: stage only comes before it "
                      "('aufs2overlay status' says what to do)")


# -- the cutover ----------------------------------------------------------------------------------------


def for_cutover(paths: Paths, store: Store, found: aufs.Discovery, snap: snapshot.RootSnapshot,
                progress: Reporter) -> Staged:
    """What the cutover keeps of the staging run in ``store``, judged against its discovery (the engine is
    stopped) and the snapshot it was made from; dropped layers' staged directories are removed before the
    caller records anything."""
    records = store.layers()
    proofs = store.staged_proofs()
    kept, dropped = judge(paths, records, proofs, {layer.id: layer.ancestors for layer in found.layers
                                                   if not layer.writable}, snap.staged)
    remove_dropped(paths, dropped, progress)
    good = {r.id for r in kept}
    findings = _kept_findings(store, good) + [(None, "staged-layer-dropped", f"{r.id}: {why}") for r, why in dropped]
    progress(f"cutover: {len(kept)} staged layers kept, {len(dropped)} dropped, "
             f"{len(found.layers) - len(kept)} to convert now")
    return Staged({r.id: r for r in kept}, {i: p for i, p in proofs.items() if i in good},
                  store.whiteout_dir_records(good), findings)


def merged(rows: List[LayerRecord], staged: Staged) -> List[LayerRecord]:
    """The cutover's discovered rows with each kept layer's recorded row in its place (same position); a kept
    layer that gained a child since goes back one step, so the conversion marks it ``committed``; a new layer
    never takes a kept layer's link id."""
    taken = {r.link_id for r in staged.kept.values()}
    out: List[LayerRecord] = []
    for row in rows:
        record = staged.kept.get(row.id)
        if record is None:
            if row.link_id in taken:
                row.link_id = unused_link_id(taken)
            taken.add(row.link_id)
            out.append(row)
            continue
        state = record.state
        if row.has_child and not record.has_child and state == COMMITTED:
            state = LOWERS_WRITTEN
        out.append(carried(record, row.seq, staged.proofs, has_child=row.has_child, state=state,
                           atime_ns=row.atime_ns, mtime_ns=row.mtime_ns))
    return out


def finding_rows(staged: Staged) -> List[FindingRecord]:
    return _finding_rows(staged.findings)


def move_into_place(paths: Paths) -> bool:
    """The staging area becomes ``overlay2.temp/`` (one rename: its ``l/`` links are relative), durably;
    nothing to do once it has.  Whether it moved now (the cutover's first conversion)."""
    if not fsio.lexists(paths.staging):
        return False
    if fsio.lexists(paths.temp_tree):
        raise MigratorError(f"both {paths.staging} and {paths.temp_tree} exist; refusing to guess which is right")
    os.rename(paths.staging, paths.temp_tree)
    fsio.fsync_path(paths.root)
    fsio.fsync_path(paths.workdir)
    checkpoints.reached("staging moved into overlay2.temp")
    return True
