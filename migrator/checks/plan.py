"""``plan``: everything ``run`` would check and do, without changing anything, and a verdict.

A plan is a function of what was read: the root's snapshot (``formats/snapshot.py``), the machine's facts
(``Machine``: the engine's signs, the filesystem's ``statvfs``, what copying the image store takes, the
overlay probe), and the walk of every layer when there is one (``scan/survey.py``); this module reads nothing.
``runtime/start.py`` reads those facts, in the order a plan needs them (no probe for a root refused already, no
walk where the filesystem's room settles the space check), and ``run`` makes the same plan before it starts a
migration and refuses when the verdict is no; the walk is then reused (the in-place strategy's link step takes
its whiteout directories from it).  The space estimates count what each strategy leaves on the filesystem: new
inodes and the blocks they take.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

from migrations_state.machine import PENDING
from migrator.checks import consistency, probe
from migrator.errors import Refused
from migrator.formats import aufs, containers, overlay2
from migrator.formats import discovery as layer_graph
from migrator.formats.snapshot import RootSnapshot
from migrator.paths import IMAGE_OVERLAY2, TREE
from migrator.scan.survey import LayerSurvey

if TYPE_CHECKING:
    from migrator.strategies.base import Strategy

# Free space a run must keep beyond its estimate: SQLite's journal during a commit, rounding.
RESERVE_BYTES = 1 << 20
RESERVE_INODES = 16
_DB_BASE = 18 * 4096  # an empty state database: one page per table and index (18 of them)
_DB_PER_LAYER = 512


@dataclass
class Machine:
    """What a plan judges besides the root: which engine this is and whether it runs, the filesystem's room,
    what a copy of the image store takes (inodes, bytes), and the overlay probe (None: not run yet)."""

    engine: Tuple[str, str]  # (docker or balena-engine, why)
    engine_running: List[str]
    vfs: os.statvfs_result
    image_copy: Tuple[int, int] = (0, 0)
    probe: Optional[probe.ProbeResult] = None


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

    def add_content(self, checked: list, summary: dict, lines: List[str]) -> None:
        """The content check of the layers on aufs (``plan --content``): a damaged layer makes the verdict no."""
        self.content, self.content_lines = summary, lines
        for layer in checked:
            if layer.status == "failed":
                self.problems.append(f"layer {layer.chain_id} (cache-id {layer.cache_id}) is damaged on aufs "
                                     f"already ({layer.reason}); re-pull the image that uses it, or remove it, "
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


def assess(snap: RootSnapshot, strategy: "Strategy", machine: Machine, accept_missing_storage: bool = False) -> Plan:
    """The plan's judgement of ``snap`` before any layer is walked: discovery and every refusal, the engine,
    and the space bound (``count`` adds the walk, or settles for the bound; ``probed`` the probe).  A refused
    root's plan has its problem and no discovery."""
    plan = Plan(root=snap.root, strategy=strategy.name, accept_missing_storage=accept_missing_storage)
    plan.engine, plan.engine_reason = machine.engine
    plan.engine_running = list(machine.engine_running)
    plan.free_inodes, plan.free_bytes = machine.vfs.f_ffree, machine.vfs.f_bfree * machine.vfs.f_frsize
    if plan.engine_running:
        plan.problems.append(f"an engine is using {snap.root} ({plan.engine_running[0]}); stop it first")
    try:
        check_root(plan, snap)
    except Refused as exc:
        plan.problems.append(str(exc))
    return plan


def check_root(plan: Plan, snap: RootSnapshot) -> None:
    """Discovery and every refusal of a new run, before anything is written: all from one snapshot."""
    plan.snapshot = snap
    if snap.moved:
        layer_id, where = snap.moved[0]
        raise Refused(f"layer {layer_id} was moved out of aufs/diff by a --strategy inplace migration whose state "
                      f"database is gone ({os.path.join(snap.root, where)}); 'aufs2overlay rollback --force' moves "
                      "it back")
    refusal = snap.unreadable_refusal()
    if refusal:
        raise Refused(refusal)
    plan.found, plan.container_findings = containers.find_containers(snap.containers, snap.kept.get)
    plan.storage = consistency.check(snap, [c.id for c in plan.found if c.state == PENDING])
    plan.findings = plan.storage.findings()
    if not plan.storage.complete and not plan.accept_missing_storage:
        raise Refused(plan.storage.refusal())
    plan.discovery = layer_graph.discover(snap, skip_broken_chains=plan.accept_missing_storage)
    plan.layer_findings = list(plan.discovery.layer_findings)
    for built in (TREE, IMAGE_OVERLAY2):
        if built in snap.built:
            raise Refused(f"{built}/ already exists in {snap.root} and is not this migration's (an engine ran "
                          "with overlay2, or a migration lost its state database: 'aufs2overlay rollback --force' "
                          "removes it); move it away, then run again")
    plan.findings = plan.recorded_findings()


def needs_walk(plan: Plan, strategy: "Strategy", machine: Machine, walk: bool) -> bool:
    """Whether the plan must walk every layer: asked to (``plan`` always is), a strategy that starts from the
    walk, or a filesystem that may not have room for the migration's upper bound (``_upper_bound``).

    ``run`` leaves the walk out when the filesystem has more room free than it uses in all: nothing a
    migration makes can then exceed it (every directory, file and block it could copy is part of what is used),
    and the walk would cost a tenth of the run."""
    if plan.discovery is None or not plan.discovery.layers:
        return False
    bound = _upper_bound(machine.vfs, len(plan.discovery.layers))
    return walk or strategy.walks_first or bound[0] > plan.free_inodes or bound[1] > plan.free_bytes


def count(plan: Plan, strategy: "Strategy", machine: Machine,
          surveys: Optional[Dict[str, LayerSurvey]] = None) -> None:
    """The plan's counts and the space it needs: from ``surveys`` (the walk of every layer), else the upper
    bound; a problem where the filesystem lacks the room."""
    if plan.discovery is None:
        return
    plan.walked = surveys is not None
    plan.surveys = surveys or {}
    _count(plan, strategy, machine)
    if not plan.walked:
        plan.need_inodes, plan.need_bytes = _upper_bound(machine.vfs, len(plan.discovery.layers))
    alternative = strategy.frugal_alternative
    if plan.need_inodes + RESERVE_INODES > plan.free_inodes:
        plan.problems.append(f"not enough free inodes: the {strategy.name} strategy needs about "
                             f"{plan.need_inodes}, the filesystem has {plan.free_inodes}"
                             + (f"; --strategy {alternative} needs far fewer" if alternative else ""))
    if plan.need_bytes + RESERVE_BYTES > plan.free_bytes:
        plan.problems.append(f"not enough free space: the {strategy.name} strategy needs about "
                             f"{mib(plan.need_bytes)}, the filesystem has {mib(plan.free_bytes)}"
                             + (f"; --strategy {alternative} needs far less" if alternative else ""))


def probed(plan: Plan, result: probe.ProbeResult) -> None:
    plan.probe = result
    plan.problems.extend(result.problems)


def _upper_bound(vfs: os.statvfs_result, layers: int) -> Tuple[int, int]:
    """(inodes, bytes) no migration of this root can exceed, without walking it: everything the filesystem
    uses now, plus the few files per layer and the state database, plus the run's reserve."""
    inodes = (vfs.f_files - vfs.f_ffree) + 8 * layers + 16 + RESERVE_INODES
    used = (vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize + 8 * layers * vfs.f_bsize + (4 << 20) + RESERVE_BYTES
    return inodes, used


def _count(plan: Plan, chosen: "Strategy", machine: Machine) -> None:
    layers = plan.discovery.layers
    parents = plan.discovery.parents
    pending = [c for c in plan.found if c.state == PENDING]
    plan.layers = len(layers)
    plan.containers = len(pending)
    plan.deepest_chain = max((len(layer.ancestors) + 1 for layer in layers), default=0)
    plan.images = plan.snapshot.store.images
    block = machine.vfs.f_bsize
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
        files = overlay2.layer_files(bool(layer.ancestors), layer.id in parents)
        inline = 1 if len(f"../{layer.id}/diff") < 60 else 0  # a short symlink and the empty marker take no block
        inodes += files + s.whiteouts
        used += (files - inline - (1 if layer.id in parents else 0)) * block
        more_inodes, more_bytes = chosen.layer_need(layer.writable, s, block)
        inodes += more_inodes
        used += more_bytes
    inodes += machine.image_copy[0]
    used += machine.image_copy[1]
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
