"""``plan``: everything ``run`` would check and do, without changing anything, and a verdict.

``run`` makes the same plan before it starts a migration and refuses when the verdict is no; the plan's
walk of the layers is then reused (the in-place strategy's link step takes its whiteout directories from it).
The space estimates count what each strategy leaves on the filesystem: new inodes and the blocks they take.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from migrations_state.machine import PENDING
from migrator.checks import consistency, discovery, engine, probe
from migrator.errors import Refused
from migrator.formats import aufs, containers, images, lowerview, overlay2, snapshot
from migrator.formats.snapshot import RootSnapshot
from migrator.fs import fsio
from migrator.options import Options
from migrator.paths import Paths
from migrator.scan import survey
from migrator.scan.prescan import EarlyWalk
from migrator.scan.survey import LayerSurvey
from migrator.strategies import registry
from migrator.strategies.base import Strategy

# Free space a run must keep beyond its estimate: SQLite's journal during a commit, rounding.
RESERVE_BYTES = 1 << 20
RESERVE_INODES = 16
_DB_BASE = 18 * 4096  # an empty state database: one page per table and index (18 of them)
_DB_PER_LAYER = 512


@dataclass
class Plan:
    root: str
    strategy: str
    engine: str = "docker"
    engine_reason: str = ""
    images: int = 0
    layers: int = 0
    containers: int = 0
    deepest_chain: int = 0
    entries: int = 0
    directories: int = 0
    whiteouts: int = 0
    opaque: int = 0
    need_inodes: int = 0
    need_bytes: int = 0
    free_inodes: int = 0
    free_bytes: int = 0
    engine_running: List[str] = field(default_factory=list)
    probe: Optional[probe.ProbeResult] = None
    walked: bool = False  # False: the counts of entries are unknown and ``need`` is an upper bound
    accept_missing_storage: bool = False
    storage: Optional[consistency.StorageCheck] = None
    content: Optional[dict] = None  # plan --content: contentcheck.summary of the layers on aufs
    content_lines: List[str] = field(default_factory=list)
    staged: Optional[Dict[str, int]] = None  # a staged root: {"staged": N, "layers": in the staging run}
    problems: List[str] = field(default_factory=list)
    findings: List[Tuple[str, str]] = field(default_factory=list)
    layer_findings: List[Tuple[str, str, str]] = field(default_factory=list)  # (kind, layer, detail), walked
    # What run takes over from the plan (not shown):
    snapshot: Optional[RootSnapshot] = None
    discovery: Optional[aufs.Discovery] = None
    found: List[containers.FoundContainer] = field(default_factory=list)
    container_findings: List[Tuple[str, str]] = field(default_factory=list)
    surveys: Dict[str, LayerSurvey] = field(default_factory=dict)

    def add_content(self, proofs: list, summary: dict, lines: List[str]) -> None:
        """The content proof of the layers on aufs (``plan --content``): a damaged layer makes the verdict no."""
        self.content, self.content_lines = summary, lines
        for proof in proofs:
            if proof.status == "failed":
                self.problems.append(f"layer {proof.chain_id} (cache-id {proof.cache_id}) is damaged on aufs "
                                     f"already ({proof.reason}); re-pull the image that uses it, or remove it, "
                                     "before migrating")

    def recorded_findings(self) -> List[Tuple[str, str]]:
        """What a run records as findings at its start: discovery's, the containers', the storage check's."""
        storage = self.storage.findings() if self.storage is not None else []
        return list(self.discovery.findings) + list(self.container_findings) + storage

    @property
    def verdict(self) -> bool:
        return not self.problems

    def summary(self) -> dict:
        """The plan as ``plan --json`` prints it (schema in docs/operations.md)."""
        p = self.probe
        return {
            "root": self.root, "strategy": self.strategy, "engine": self.engine,
            "engine_reason": self.engine_reason, "images": self.images, "layers": self.layers,
            "containers": self.containers, "deepest_chain": self.deepest_chain, "entries": self.entries,
            "directories": self.directories, "whiteouts": self.whiteouts, "opaque_directories": self.opaque,
            "need": {"inodes": self.need_inodes, "bytes": self.need_bytes, "walked": self.walked},
            "free": {"inodes": self.free_inodes, "bytes": self.free_bytes},
            "overlay": None if p is None else {"ran": p.ran, "d_type": p.d_type, "trusted_xattrs": p.trusted_xattrs,
                                                "whiteout_devices": p.whiteout_devices,
                                                "mount": p.overlay_mount},
            "engine_running": self.engine_running,
            "storage": None if self.storage is None else {
                "aufs_diff": self.storage.diff_state, "complete": self.storage.complete,
                "missing_layers": len(self.storage.missing_layers),
                "missing_metadata": len(self.storage.missing_metadata),
                "accepted": self.accept_missing_storage},
            "content": self.content, "staged": self.staged,
            "findings": [{"kind": k, "detail": d} for k, d in self.findings]
            + [{"kind": k, "layer": lid, "detail": d} for k, lid, d in self.layer_findings],
            "problems": self.problems, "verdict": "yes" if self.verdict else "no",
        }


def engine_kind(root: str) -> Tuple[str, str]:
    """docker or balena-engine, and why: balena-engine's roots are named after it (/var/lib/balena-engine,
    balenaOS's /mnt/data/docker is a docker-named root of balena-engine but its pidfile says so)."""
    if "balena" in os.path.basename(os.path.normpath(root)):
        return "balena-engine", f"the root is named {os.path.basename(os.path.normpath(root))}"
    for pidfile in ("/var/run/balena-engine.pid", "/run/balena-engine.pid", "/var/run/balena.pid"):
        if os.path.exists(pidfile):
            return "balena-engine", f"{pidfile} exists"
    return "docker", "the root is not named after balena-engine and no balena-engine pidfile exists"


def make_plan(paths: Paths, opts: Options, walk: bool = True, early: Optional[EarlyWalk] = None,
              snap: Optional[RootSnapshot] = None) -> Plan:
    """Read everything ``run`` needs and say whether it can go ahead; writes nothing (the probe's temporary
    directory is removed and the root's times put back).

    ``walk=False`` (what ``run`` asks for) leaves out the walk of every layer when the filesystem has more room
    free than it uses in all: nothing a migration makes can then exceed it (every directory, file and block it
    could copy is part of what is used), and the walk would cost a tenth of the run.  A strategy whose
    conversion starts from the walk (``walks_first``) is always walked for; ``early`` is the walk the CLI
    started before the heavy imports, whose results are taken first.

    ``opts.accept_missing_storage``: layers and image metadata that the root names but does not hold (a filesystem
    that did not mount, a partial restore: ``consistency.py``) are reported instead of refused.

    ``snap``: the root as the caller read it already (``snapshot.read_root``); read here when not given.
    """
    strategy = opts.strategy or registry.DEFAULT
    chosen = registry.get(strategy)
    plan = Plan(root=paths.root, strategy=strategy, accept_missing_storage=opts.accept_missing_storage)
    plan.engine, plan.engine_reason = engine_kind(paths.root)
    plan.engine_running = engine.running_engine(paths.root, engine.pidfiles_or_default(opts.engine_pidfiles))
    if plan.engine_running:
        plan.problems.append(f"an engine is using {paths.root} ({plan.engine_running[0]}); stop it first")
    try:
        check_root(paths, plan, snap or snapshot.read_root(paths.root))
    except Refused as exc:
        plan.problems.append(str(exc))
        return plan
    vfs = os.statvfs(paths.root)
    plan.free_inodes, plan.free_bytes = vfs.f_ffree, vfs.f_bfree * vfs.f_frsize
    bound = _upper_bound(vfs, plan)
    plan.walked = (walk or chosen.walks_first or not plan.discovery.layers or bound[0] > plan.free_inodes
                   or bound[1] > plan.free_bytes)
    if plan.walked:
        plan.surveys = survey_layers(paths, plan.discovery.layers, opts.jobs, early)
    _count(paths, plan, chosen)
    if not plan.walked:
        plan.need_inodes, plan.need_bytes = bound
    alternative = registry.frugal_alternative(strategy)
    if plan.need_inodes + RESERVE_INODES > plan.free_inodes:
        plan.problems.append(f"not enough free inodes: the {strategy} strategy needs about {plan.need_inodes}, "
                             f"the filesystem has {plan.free_inodes}"
                             + (f"; --strategy {alternative} needs far fewer" if alternative else ""))
    if plan.need_bytes + RESERVE_BYTES > plan.free_bytes:
        plan.problems.append(f"not enough free space: the {strategy} strategy needs about "
                             f"{mib(plan.need_bytes)}, the filesystem has {mib(plan.free_bytes)}"
                             + (f"; --strategy {alternative} needs far less" if alternative else ""))
    plan.probe = probe.probe(paths.root)
    plan.problems.extend(plan.probe.problems)
    return plan


def check_root(paths: Paths, plan: Plan, snap: RootSnapshot) -> None:
    """Discovery and every refusal of a new run, before anything is written: all from one snapshot."""
    plan.snapshot = snap
    for strategy in registry.every():
        moved = strategy.taken_from_aufs(paths)
        if moved:
            raise Refused(f"layer {moved[0][0]} was moved out of aufs/diff by a --strategy {strategy.name} migration "
                          f"whose state database is gone ({moved[0][1]}); 'aufs2overlay rollback --force' moves it "
                          "back")
    refusal = snap.unreadable_refusal()
    if refusal:
        raise Refused(refusal)
    plan.found, plan.container_findings = containers.find_containers(
        snap.containers, lambda c: containers.kept_original(paths.originals, c))
    plan.storage = consistency.check(snap, [c.id for c in plan.found if c.state == PENDING])
    plan.findings = plan.storage.findings()
    if not plan.storage.complete and not plan.accept_missing_storage:
        raise Refused(plan.storage.refusal())
    plan.discovery = discovery.discover(snap, skip_broken_chains=plan.accept_missing_storage)
    plan.layer_findings = list(plan.discovery.layer_findings)
    for path, what in ((paths.tree, "overlay2/"), (paths.image_overlay2, "image/overlay2/")):
        if fsio.lexists(path):
            raise Refused(f"{what} already exists in {paths.root} and is not this migration's (an engine ran "
                          "with overlay2, or a migration lost its state database: 'aufs2overlay rollback --force' "
                          "removes it); move it away, then run again")
    plan.findings = plan.recorded_findings()


def _upper_bound(vfs: os.statvfs_result, plan: Plan) -> Tuple[int, int]:
    """(inodes, bytes) no migration of this root can exceed, without walking it: everything the filesystem
    uses now, plus the few files per layer and the state database, plus the run's reserve."""
    layers = len(plan.discovery.layers)
    inodes = (vfs.f_files - vfs.f_ffree) + 8 * layers + 16 + RESERVE_INODES
    used = (vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize + 8 * layers * vfs.f_bsize + (4 << 20) + RESERVE_BYTES
    return inodes, used


def survey_layers(paths: Paths, layers: List[aufs.AufsLayer], jobs: int,
                  early: Optional[EarlyWalk] = None) -> Dict[str, LayerSurvey]:
    """Walk every layer, read-only, in ``jobs`` processes (but those the CLI's early walkers did already)."""
    known = early.take() if early is not None else {}
    lowers = {layer.id: [lowerview.Lower(os.path.join(paths.aufs_diff, a)) for a in layer.ancestors]
              for layer in layers}
    todo = [layer for layer in layers if layer.id not in known or known[layer.id].writable != layer.writable
            or known[layer.id].lowers != tuple(lower.path for lower in lowers[layer.id])]
    results = survey.scan_layers([os.path.join(paths.aufs_diff, layer.id) for layer in todo],
                                 [layer.writable for layer in todo], [lowers[layer.id] for layer in todo], jobs)
    known.update((layer.id, result) for layer, result in zip(todo, results))
    return {layer.id: known[layer.id] for layer in layers}


def _count(paths: Paths, plan: Plan, chosen: Strategy) -> None:
    layers = plan.discovery.layers
    parents = plan.discovery.parents
    pending = [c for c in plan.found if c.state == PENDING]
    plan.layers = len(layers)
    plan.containers = len(pending)
    plan.deepest_chain = max((len(layer.ancestors) + 1 for layer in layers), default=0)
    plan.images = plan.snapshot.store.images
    block = os.statvfs(paths.root).f_bsize
    inodes, used = 2, 2 * block  # overlay2.temp/ and l/
    for layer in layers:
        s = plan.surveys.get(layer.id)
        if s is None:
            continue
        plan.entries += s.entries
        plan.directories += s.directories
        plan.whiteouts += s.whiteouts
        plan.opaque += s.opaque
        plan.layer_findings.extend((kind, layer.id, detail) for kind, detail in s.findings + s.converting)
        # <id>/, link, l/<LINKID>; lower and work/ with a parent; the committed marker (empty) with a child
        files = 3 + (2 if layer.ancestors else 0)
        symlink_inline = len(f"../{layer.id}/diff") < 60
        inodes += files + (1 if layer.id in parents else 0) + s.whiteouts
        used += (files - (1 if symlink_inline else 0)) * block
        more_inodes, more_bytes = chosen.layer_need(layer.writable, s, block)
        inodes += more_inodes
        used += more_bytes
    image_inodes, image_bytes = images.stage_need(paths.image_aufs)
    inodes += image_inodes
    used += image_bytes
    # The work area: itself, the lock, the state database, the strategy's own, the kept container configs.
    area_inodes, area_bytes = chosen.work_area_need(block)
    inodes += 3 + area_inodes + (1 + len(pending) if pending else 0)
    originals = sum(_blocks(len(c.original or b""), block) for c in pending)
    db = _DB_BASE + sum(_DB_PER_LAYER + 66 * len(layer.ancestors) for layer in layers)
    db += sum(len(c.original or b"") for c in plan.found) + 64 * plan.opaque + 96 * plan.whiteouts
    used += block + _blocks(db, 4096) + originals + area_bytes
    plan.need_inodes, plan.need_bytes = inodes, used


def _blocks(n: int, block: int) -> int:
    return -(-n // block) * block


def mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def render(plan: Plan) -> str:
    """The plan as ``plan`` prints it for a person."""
    p = plan.probe
    yes_no = {True: "yes", False: "no"}
    lines = [
        f"engine root:    {plan.root} ({plan.engine}: {plan.engine_reason})",
        f"strategy:       {plan.strategy}",
        f"engine running: {'yes: ' + plan.engine_running[0] if plan.engine_running else 'no'}",
    ]
    if plan.discovery is not None:
        lines += [
            f"images:         {plan.images}",
            f"layers:         {plan.layers} (deepest chain: {plan.deepest_chain} layers; overlay2 takes up to "
            f"{overlay2.MAX_LOWERS + 1})",
            f"containers:     {plan.containers} to switch",
            f"entries:        {plan.entries} ({plan.directories} directories, {plan.whiteouts} whiteouts, "
            f"{plan.opaque} opaque directories)",
            f"needs:          about {plan.need_inodes} inodes and {mib(plan.need_bytes)}",
            f"free:           {plan.free_inodes} inodes and {mib(plan.free_bytes)}",
        ]
    if p is not None and p.ran:
        lines.append(f"overlay probe:  d_type {yes_no[p.d_type]}, trusted.* xattrs {yes_no[p.trusted_xattrs]}, "
                     f"whiteout devices {yes_no[p.whiteout_devices]}, mount {yes_no[p.overlay_mount]}")
    elif p is not None:
        lines.append("overlay probe:  did not run (see the problem below)")
    if plan.staged is not None:
        lines.append(f"staged:         {plan.staged['staged']} of {plan.layers} layers (by 'aufs2overlay stage'; "
                     "the cutover keeps those still unchanged and converts the rest)")
    for text in plan.content_lines:
        lines.append(f"content:        {text.removeprefix('content: ')}")
    for kind, detail in plan.findings:
        lines.append(f"note:           {kind}: {detail}")
    for kind, layer, detail in plan.layer_findings:
        lines.append(f"note:           {kind}: layer {layer}: {detail}")
    for problem in plan.problems:
        lines.append(f"problem:        {problem}")
    lines.append(f"verdict:        {'yes: run can go ahead' if plan.verdict else 'no: run would refuse'}")
    return "\n".join(lines)
