"""Admitting and starting a migration: whether ``run`` may go on, the plan that must say yes, then the file
changes that begin it, then its state.

``admit`` decides, from the run as recorded, whether this is a new migration (none recorded, the last one
rolled back, or the cutover of a staging), a resumed one, or nothing to do, with every refusal before anything
is written; ``plan_root`` makes the plan of the root's snapshot.  ``begin`` then writes, in this order:
leftovers of an unrecorded attempt removed, the kept container configs and engine config, and the state
database in one piece (``Store.create``).  A cut before the database exists leaves a root that a new run
starts over on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from migrations_state.machine import PENDING, ROLLED_BACK, STAGING
from migrations_state.schema import (
    ContainerRecord,
    FindingRecord,
    LayerRecord,
    RunRecord,
    SavedTimeRecord,
)
from migrations_state.store import Store
from migrator import checkpoints
from migrator.checks import engine, probe
from migrator.checks import plan as planner
from migrator.errors import Refused
from migrator.formats import aufs, containers, engineconfig, images, lowerview, snapshot
from migrator.formats.linkid import new_link_ids
from migrator.formats.snapshot import RootSnapshot
from migrator.fs import fsio
from migrator.options import Options
from migrator.paths import Paths
from migrator.runtime import lock, staging
from migrator.runtime.lock import Held
from migrator.scan import survey
from migrator.scan.prescan import EarlyWalk
from migrator.scan.survey import LayerSurvey
from migrator.strategies import registry
from migrator.ui.progress import Reporter


@dataclass
class Admission:
    """What ``run`` may do with a root (``admit``): the run as recorded, and for a new migration (none
    recorded, the last one rolled back, or the cutover of a staging) its plan; ``done``: the line that says
    there is nothing to do."""

    recorded: Optional[RunRecord]
    plan: Optional[planner.Plan] = None
    done: Optional[str] = None

    @property
    def fresh(self) -> bool:
        return is_fresh(self.recorded)

    @property
    def surveys(self) -> Dict[str, LayerSurvey]:
        """The plan's walk of the layers (a new run's, when it walked), for the conversion to reuse."""
        return self.plan.surveys if self.plan is not None else {}


def is_fresh(run: Optional[RunRecord]) -> bool:
    """Whether ``run`` would start a new migration: none recorded, the last one rolled back, or only staged
    (the cutover plans the root as it is now)."""
    return run is None or run.phase in (ROLLED_BACK, STAGING)


def is_staged(run: Optional[RunRecord]) -> bool:
    return run is not None and run.phase == STAGING


def admit(paths: Paths, opts: Options, progress: Reporter, recorded: Optional[RunRecord],
          early: Optional[EarlyWalk] = None, plan: Optional[planner.Plan] = None) -> Admission:
    """Whether and how ``run`` goes on from ``recorded`` (read without the lock first, then under it): every
    refusal (a mixed strategy, a running engine, a plan whose verdict is no) before anything is written, the
    plan of a new migration (``plan``: one made already, before the lock), or the line that says why there is
    nothing to do."""
    if opts.skip_if_rolled_back and recorded is not None and recorded.phase == ROLLED_BACK:
        return Admission(recorded, done=f"the last migration of {paths.root} was rolled back; not migrating "
                                        "again (--skip-if-rolled-back: run 'aufs2overlay run' by hand to migrate)")
    snap = snapshot.read_root(paths) if is_fresh(recorded) and plan is None else None
    if snap is not None and snap.nothing_to_migrate():
        return Admission(recorded, done=f"nothing to migrate: {paths.root} has no aufs/")
    refuse_mixed_strategy(recorded, opts.strategy)
    engine.refuse_if_running(paths.root, opts.engine_pidfiles)
    if not is_fresh(recorded):
        refuse_other_engine_config(paths, opts.engine_config)
        return Admission(recorded)
    return Admission(recorded, plan or checked_plan(paths, opts, progress, snap, early))


def under_lock(paths: Paths, opts: Options, held: Held, progress: Reporter, before: Admission) -> Admission:
    """``admit`` again with the run as recorded under the lock (another command may have changed it since),
    the plan made before the lock kept while it still applies; a new migration begins here (``begin``)."""
    recorded = held.store.run() if held.store is not None else None
    admitted = admit(paths, opts, progress, recorded, plan=before.plan if is_fresh(recorded) else None)
    if admitted.plan is not None and admitted.done is None:
        begin(paths, admitted.plan, held, progress, opts.engine_config)
    return admitted


def refuse_mixed_strategy(recorded: Optional[RunRecord], strategy: Optional[str]) -> None:
    """A migration resumes with the strategy it started with: the two leave different things half-done; a
    staged root's cutover is the strategy that stages."""
    if is_staged(recorded) and strategy not in (None, registry.BESIDE_ENGINE):
        raise Refused(f"this root is staged for the {registry.BESIDE_ENGINE} strategy; run the cutover with no "
                      "--strategy, or discard the staged work first with 'aufs2overlay rollback'")
    if is_fresh(recorded) or strategy is None or recorded.strategy == strategy:
        return
    raise Refused(f"this migration was started with --strategy {recorded.strategy} and is {recorded.phase}; resume "
                  f"it with --strategy {recorded.strategy} (or no --strategy), or roll it back first")


def refuse_other_engine_config(paths: Paths, engine_config: Optional[str]) -> None:
    managed = engineconfig.managed_path(paths)
    if engine_config and os.path.abspath(engine_config) != managed:
        raise Refused(f"this migration started with --set-engine-config {managed or '(none)'}; resume it "
                      "with the same (or no) --set-engine-config, or roll it back first")


def plan_root(paths: Paths, opts: Options, snap: RootSnapshot, walk: bool = True,
              early: Optional[EarlyWalk] = None) -> planner.Plan:
    """The plan of the root read as ``snap``, with the machine's facts read in the order the plan needs them:
    the engine and the filesystem's room; the walk of every layer where it is needed (``walk``: asked for;
    ``early``: the walk the CLI started before the heavy imports, taken first); the image store's size; the
    overlay probe (which writes, journaled, in ROOT: only for a root not refused already).  Writes nothing else."""
    strategy = registry.get(opts.strategy or registry.DEFAULT)
    machine = planner.Machine(engine.kind(paths.root),
                              engine.running_engine(paths.root, engine.pidfiles_or_default(opts.engine_pidfiles)),
                              os.statvfs(paths.root))
    plan = planner.assess(snap, strategy, machine, opts.accept_missing_storage)
    if plan.discovery is None:
        return plan
    surveys = survey_layers(paths, plan.discovery.layers, opts.jobs, early) \
        if planner.needs_walk(plan, strategy, machine, walk) else None
    machine.image_copy = images.copy_need(paths.image_aufs)
    planner.count(plan, strategy, machine, surveys)
    planner.probed(plan, probe.probe(paths.root))
    return plan


def survey_layers(paths: Paths, layers: List[aufs.AufsLayer], jobs: int,
                  early: Optional[EarlyWalk] = None) -> Dict[str, LayerSurvey]:
    """Walk every layer, read-only, in ``jobs`` processes (but those the CLI's early walkers did already, with
    the same ancestors)."""
    known = early.take() if early is not None else {}
    lowers = {layer.id: [lowerview.Lower(paths.aufs_layer(a)) for a in layer.ancestors] for layer in layers}
    todo = [layer for layer in layers if layer.id not in known or known[layer.id].writable != layer.writable
            or known[layer.id].lowers != tuple(lower.path for lower in lowers[layer.id])]
    results = survey.scan_layers([paths.aufs_layer(layer.id) for layer in todo],
                                 [layer.writable for layer in todo], [lowers[layer.id] for layer in todo], jobs)
    known.update((layer.id, result) for layer, result in zip(todo, results))
    return {layer.id: known[layer.id] for layer in layers}


def checked_plan(paths: Paths, opts: Options, progress: Reporter, snap: Optional[RootSnapshot] = None,
                 early: Optional[EarlyWalk] = None) -> planner.Plan:
    """The plan of a new run (of ``snap``, the root as already read, when given); refused (before anything is
    written) when its verdict is no."""
    if opts.engine_config:
        engineconfig.check(opts.engine_config)
    progress(f"planning: reading {paths.aufs_diff}")
    plan = plan_root(paths, opts, snap or snapshot.read_root(paths), walk=False, early=early)
    if not plan.verdict:
        more = f" (and {len(plan.problems) - 1} more)" if len(plan.problems) > 1 else ""
        raise Refused(f"{plan.problems[0]}{more}; 'aufs2overlay plan' shows every check")
    free = f"{plan.free_inodes} inodes and {planner.mib(plan.free_bytes)} free"
    if plan.walked:
        space = f"needs about {plan.need_inodes} inodes and {planner.mib(plan.need_bytes)}, {free}"
    else:  # the bound is the filesystem's used inodes and bytes: quoting it as a need misleads
        space = f"{free}, more than it can use ('aufs2overlay plan' counts what it needs)"
    progress(f"plan: {plan.layers} layers, {plan.containers} containers; {space}")
    return plan


def begin(paths: Paths, plan: planner.Plan, held: Held, progress: Reporter, engine_config: Optional[str]) -> None:
    """Write what starts the migration the plan describes, and its state database, which becomes the store
    ``held`` holds.  The cutover of a staging run (what ``held``'s store records) keeps the staged layers still
    good (``staging.for_cutover``) at their recorded states, and the staging area stays (the conversion moves it
    into place); otherwise a staging area is a lost run's leftover.  Under the lock: the leftovers are looked
    for here, not in the plan's snapshot, which was read before it."""
    staged = None
    if held.store is not None:
        if is_staged(held.store.run()):
            staged = staging.for_cutover(paths, held.store, plan.discovery, plan.snapshot, progress)
        held.store.close()
        held.store = None
    found = plan.found
    findings = plan.recorded_findings()
    times = dirs_whose_times_change(paths.root, [c.id for c in found if c.state == PENDING])
    leftovers = [(paths.root, os.path.basename(paths.temp_tree)),
                 (paths.image_dir, os.path.basename(paths.image_temp))]
    if staged is None:
        leftovers += [(paths.workdir, os.path.basename(paths.staging)),
                      (paths.workdir, os.path.basename(paths.staged_image))]
    for parent, name in leftovers:
        if fsio.lexists(os.path.join(parent, name)):
            progress(f"removing leftover {os.path.join(parent, name)} of an earlier, unrecorded attempt")
            fsio.ensure_absent_durably(parent, name)
            findings.append(("removed-leftover", os.path.join(parent, name)))
    for kind, detail in findings:
        progress(f"note: {kind}: {detail}")
    for kind, layer, detail in plan.discovery.layer_findings:
        progress(f"note: {kind}: layer {layer}: {detail}")
    fsio.ensure_absent_durably(paths.workdir, os.path.basename(paths.stash))  # journals of an earlier run
    containers.keep_originals(paths.originals, found)
    if engine_config:
        engineconfig.keep_original(paths, engine_config)
    else:
        engineconfig.forget(paths)
    os.makedirs(os.path.dirname(paths.state_db), mode=0o700, exist_ok=True)
    layers, container_rows, finding_rows = discovered_records(plan.discovery, found, findings)
    if staged is not None:
        layers = staging.merged(layers, staged)
        finding_rows += staging.finding_rows(staged)
    else:
        lock.remove_state_db(paths.state_db)
    held.store = Store.create(paths.state_db, paths.root, plan.strategy, layers, container_rows, finding_rows,
                              times, on_recorded=checkpoints.reached,
                              whiteout_dirs=staged.whiteout_dirs if staged else ())
    progress(f"discovered {len(layers)} layers, {sum(c.state == PENDING for c in found)} containers on aufs; "
             f"strategy {plan.strategy}")


def discovered_records(discovery: aufs.Discovery, found: List[containers.FoundContainer],
                       findings: List[Tuple[str, str]]
                       ) -> Tuple[List[LayerRecord], List[ContainerRecord], List[FindingRecord]]:
    """Rows for a new run: link ids chosen once here, persisted, so a resumed run writes the same tree."""
    layers, parents = discovery.layers, discovery.parents
    link_ids = new_link_ids(len(layers))
    layer_rows = [LayerRecord.discovered(layer.id, i, layer.ancestors, link_ids[i], layer.id in parents,
                                         layer.writable, layer.times) for i, layer in enumerate(layers)]
    container_rows = [
        ContainerRecord(id=c.id, state=c.state, original=c.original, note=c.note,
                        mode=(c.st.st_mode & 0o7777) if c.st else 0o600,
                        uid=c.st.st_uid if c.st else 0, gid=c.st.st_gid if c.st else 0,
                        atime_ns=c.st.st_atime_ns if c.st else 0, mtime_ns=c.st.st_mtime_ns if c.st else 0)
        for c in found
    ]
    finding_rows = [FindingRecord(layer_id=None, kind=k, detail=d) for k, d in findings]
    finding_rows += [FindingRecord(layer_id=lid, kind=k, detail=d) for k, lid, d in discovery.layer_findings]
    return layer_rows, container_rows, finding_rows


def dirs_whose_times_change(root: str, container_ids: List[str]) -> List[SavedTimeRecord]:
    """The run adds or renames entries in these directories: keep their times so rollback can put them back."""
    rows = []
    dirs = [".", "image", os.path.join("aufs", "diff")] + [os.path.join("containers", c) for c in container_ids]
    for rel in dirs:
        try:
            st = os.lstat(os.path.join(root, rel))
        except FileNotFoundError:
            continue
        rows.append(SavedTimeRecord(path=rel, atime_ns=st.st_atime_ns, mtime_ns=st.st_mtime_ns))
    return rows
