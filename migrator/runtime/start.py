"""Starting a migration: the plan that must say yes, then the file changes that begin it, then its state.

Nothing is written before the plan's verdict; then, in this order: leftovers of an unrecorded attempt
removed, the kept container configs and engine config written, and the state database created in one piece
(``Store.create``).  A cut before the database exists leaves a root that a new run starts over on.
"""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

from migrations_state.machine import DISCOVERED, PENDING
from migrations_state.schema import ContainerRecord, FindingRecord, LayerRecord, SavedTimeRecord
from migrations_state.store import Store
from migrator import checkpoints
from migrator.checks import plan as planner
from migrator.errors import Refused
from migrator.formats import aufs, containers, engineconfig
from migrator.formats.linkid import new_link_ids
from migrator.formats.snapshot import RootSnapshot
from migrator.fs import fsio
from migrator.options import Options
from migrator.paths import Paths
from migrator.runtime import lock, staging
from migrator.scan.prescan import EarlyWalk
from migrator.ui.progress import Reporter


def checked_plan(paths: Paths, opts: Options, progress: Reporter, early: Optional[EarlyWalk] = None,
                 snap: Optional[RootSnapshot] = None) -> planner.Plan:
    """The plan of a new run (of ``snap``, the root as already read, when given); refused (before anything is
    written) when its verdict is no."""
    if opts.engine_config:
        engineconfig.check(opts.engine_config)
    progress(f"planning: reading {paths.aufs_diff}")
    plan = planner.make_plan(paths, opts, walk=False, early=early, snap=snap)
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


def begin(paths: Paths, plan: planner.Plan, progress: Reporter, engine_config: Optional[str],
          staged: Optional[staging.Staged] = None) -> Store:
    """Write what starts the migration the plan describes, and its state database; the store.  With
    ``staged`` (the cutover of a staging run), the kept staged layers start at their recorded states, and the
    staging area stays (the conversion moves it into place); without, a staging area is a lost run's."""
    found = plan.found
    findings = plan.recorded_findings()
    times = dirs_whose_times_change(paths.root, [c.id for c in found if c.state == PENDING])
    leftovers = [(paths.root, os.path.basename(paths.temp_tree)),
                 (paths.image_dir, os.path.basename(paths.image_stage))]
    if staged is None:
        leftovers.append((paths.workdir, os.path.basename(paths.staging)))
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
    store = Store.create(paths.state_db, paths.root, plan.strategy, layers, container_rows, finding_rows, times,
                         on_recorded=checkpoints.reached, whiteout_dirs=staged.whiteout_dirs if staged else ())
    progress(f"discovered {len(layers)} layers, {sum(c.state == PENDING for c in found)} containers on aufs; "
             f"strategy {plan.strategy}")
    return store


def discovered_records(discovery: aufs.Discovery, found: List[containers.FoundContainer],
                       findings: List[Tuple[str, str]]
                       ) -> Tuple[List[LayerRecord], List[ContainerRecord], List[FindingRecord]]:
    """Rows for a new run: link ids chosen once here, persisted, so a resumed run writes the same tree."""
    layers, parents = discovery.layers, discovery.parents
    link_ids = new_link_ids(len(layers))
    layer_rows = [
        LayerRecord(id=layer.id, seq=i, parent=layer.parent, ancestors="\n".join(layer.ancestors),
                    link_id=link_ids[i], has_child=layer.id in parents, writable=layer.writable,
                    atime_ns=layer.times[0], mtime_ns=layer.times[1], state=DISCOVERED)
        for i, layer in enumerate(layers)
    ]
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
