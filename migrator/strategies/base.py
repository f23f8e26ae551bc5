"""The seam between the run and a strategy: one interface (``Strategy``) and the layer machine's model
(``LayerTask``).

A strategy decides what each layer step does to the filesystem (its task's callbacks), what happens around the
waves (``prepare``, ``before_wave``, ``pooled_outcomes``) and what the plan must count for it; the order of the
waves, the sync and the records are the runner's, the same for every strategy (``runner.py``).
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

from migrations_state.machine import (
    COMMIT,
    LAYER_CALLBACKS,
    LINKED,
    WRITE_LOWERS,
)
from migrations_state.schema import LayerRecord
from migrations_state.store import LayerStep, Store
from migrator import interrupts
from migrator.formats import overlay2
from migrator.paths import Paths
from migrator.scan.findings import StepResult
from migrator.scan.survey import LayerSurvey
from migrator.ui.progress import Reporter

CHUNKS_PER_JOB = 16  # pooled work goes out in this many chunks per worker (few round trips, even load)
Work = Tuple[Callable[..., Any], tuple]
Outcome = Tuple[bool, Any]  # (True, the work's result) or (False, the OSError it raised)


@dataclass
class Conversion:
    """What a conversion works with: where, the store, progress, how many workers, the descriptor the workers
    must close (the root's lock), and the plan's walk of the layers (a new run; empty on a resume)."""

    paths: Paths
    store: Store
    progress: Reporter
    jobs: int = 1
    lock_fd: Optional[int] = None
    surveys: Dict[str, LayerSurvey] = field(default_factory=dict)


class LayerTask:
    """One layer's steps, the callbacks of the layer machine (``migrations_state/machine.py``), called for it by
    its wave (``runner.Wave``, the machine's model).  Each strategy's task defines the
    link and whiteout steps (``STRATEGY_STEPS``: ``registry.get`` refuses a strategy whose task does not); the
    other two are the same for every strategy.  ``work(trigger)`` names a heavy step's work as a function and
    its arguments, so the runner can hand it to a worker; the callback then takes its outcome (``prepared``), or
    does the work itself when there is none."""

    STRATEGY_STEPS = ("build_tree", "convert_whiteouts_in_tree")

    def __init__(self, record: LayerRecord, paths: Paths, ancestor_links: List[str]) -> None:
        self.id = record.id
        self.record = record
        self.state = record.state  # moved on by the runner's wave (``runner.Wave``), the machine's model
        self.paths = paths
        self.ancestor_links = ancestor_links
        self.whiteout_dirs: List[bytes] = []  # set by the runner before the whiteout wave
        self.result: Optional[StepResult] = None
        self.steps: List[LayerStep] = []
        self.prepared: Optional[Outcome] = None

    def work(self, trigger: str) -> Optional[Work]:
        """The work of the two steps every strategy shares: overlay2's files of the layer."""
        if trigger == WRITE_LOWERS:
            return overlay2.write_layer_files, (self.paths.temp_tree, self.id, self.record.link_id,
                                                self.ancestor_links)
        if trigger == COMMIT:
            return overlay2.write_committed_marker, (self.paths.temp_tree, self.id, self.record.has_child)
        return None

    def perform(self, trigger: str) -> Any:
        """The work of ``trigger``: its outcome from the workers, or done here."""
        if self.prepared is not None:
            (ok, value), self.prepared = self.prepared, None
            if not ok:
                raise value
            return value
        fn, args = self.work(trigger)
        return fn(*args)

    def build_tree(self) -> None:
        """Step ``discovered → linked``: the layer's content in the new tree.  Sets ``result`` to what it found,
        whose ``whiteout_dirs`` (the directories holding aufs entries) the runner records with the state and
        hands to the whiteout step (``whiteout_dirs``), in this run or the next."""
        raise NotImplementedError

    def convert_whiteouts_in_tree(self) -> None:
        """Step ``linked → whiteouts-converted``: ``aufs.whiteout_actions`` of each of ``whiteout_dirs`` made."""
        raise NotImplementedError

    def write_lower_files(self) -> None:
        self.perform(WRITE_LOWERS)
        self.result = None

    def write_committed_marker(self) -> None:
        self.perform(COMMIT)
        self.result = None

    def record_state(self) -> None:
        """Keep the step for the wave's one transaction (after its ``syncfs``)."""
        step = LayerStep(self.id, self.state)
        if self.result is not None:
            if self.state == LINKED:
                step.entries = self.result.entries
                step.whiteout_dirs = list(self.result.whiteout_dirs)
            step.findings = list(self.result.findings)
        self.steps.append(step)


def undeclared_steps(task_class: type) -> List[str]:
    """The callbacks of the layer machine that ``task_class`` lacks, or inherits undefined from ``LayerTask``."""
    missing = [name for name in LAYER_CALLBACKS if not callable(getattr(task_class, name, None))]
    return missing + [name for name in LayerTask.STRATEGY_STEPS
                      if getattr(task_class, name, None) is getattr(LayerTask, name)]


class Strategy:
    """How layers become overlay2 layers; ``registry.py`` names each one and picks it.  A strategy says what
    each step does (its ``task_class``) and what happens around the waves (``prepare``, ``before_wave``,
    ``pooled_outcomes``); the order of the waves, the sync and the records are the runner's (``runner.py``)."""

    task_class: type = LayerTask
    name = ""  # set by the registry, with ``walks_first`` and ``frugal_alternative``
    walks_first = False  # its conversion starts from a walk of every layer: the plan always walks for it
    frugal_alternative: Optional[str] = None  # the strategy to suggest when this one needs more room than there is
    # Steps worth handing to worker processes: overlay2's files make new inodes, which costs (about 90 µs
    # each here), and thousands of layers make thousands of them.
    pooled_triggers: FrozenSet[str] = frozenset({WRITE_LOWERS, COMMIT})
    pool_from_layers = 64  # fewer pending layers than this: no workers (forking them would cost more)

    # -- what the plan counts ---------------------------------------------------------------------------

    def layer_need(self, writable: bool, survey: LayerSurvey, block: int) -> Tuple[int, int]:
        """(inodes, bytes) this strategy adds for a layer beyond overlay2's own files."""
        return 0, 0

    def work_area_need(self, block: int) -> Tuple[int, int]:
        return 0, 0

    # -- converting -------------------------------------------------------------------------------------

    def task(self, record: LayerRecord, conv: Conversion, ancestor_links: List[str]) -> LayerTask:
        raise NotImplementedError

    def prepare(self, conv: Conversion, pending: List[LayerRecord]) -> None:
        """Before the first wave (the in-place strategy walks the layers it has yet to move)."""

    def before_wave(self, conv: Conversion, trigger: str, tasks: List[LayerTask]) -> None:
        """Before ``trigger``'s wave changes anything (the in-place strategy records its journals here)."""

    def pooled_outcomes(self, pool: concurrent.futures.ProcessPoolExecutor, jobs: int, trigger: str,
                        tasks: List[LayerTask]) -> List[Outcome]:
        """The outcome of each task's ``work(trigger)``, done in the workers, in the order of ``tasks`` (the
        hardlink strategy shares big layers out in pieces; every other wave goes in chunks)."""
        return run_in_chunks(pool, jobs, [t.work(trigger) for t in tasks])

    # -- rollback ---------------------------------------------------------------------------------------

    def missing_layers(self, paths: Paths, store: Store) -> List[str]:
        """Layers whose aufs data a rollback could not give back (it is nowhere any more)."""
        return []

    def undo_layers(self, paths: Paths, store: Store, progress: Reporter) -> None:
        """Give aufs back what the conversion took from it, durably, before the new trees are removed."""

    def undo_from_disk(self, paths: Paths, progress: Reporter) -> None:
        """``undo_layers`` without the state database (``rollback --force``), from what is on disk."""


def run_chunk(work: Sequence[Work]) -> List[Outcome]:
    """In a worker: each piece of work, its result or the OSError it raised (so the parent can tell which
    layer failed, and the others of the chunk still count)."""
    out: List[Outcome] = []
    for fn, args in work:
        try:
            out.append((True, fn(*args)))
        except OSError as exc:
            out.append((False, exc))
    return out


def run_in_chunks(pool: concurrent.futures.ProcessPoolExecutor, jobs: int, work: Sequence[Work]) -> List[Outcome]:
    """Every piece of ``work`` in the pool, in order, in about ``jobs * CHUNKS_PER_JOB`` chunks; the outcomes,
    in the same order, once all are done."""
    per_chunk = max(1, -(-len(work) // (jobs * CHUNKS_PER_JOB)))
    futures = [pool.submit(run_chunk, work[i:i + per_chunk]) for i in range(0, len(work), per_chunk)]
    outcomes: List[Outcome] = []
    for future in futures:
        outcomes.extend(future.result())
        interrupts.check()
    return outcomes
