"""The seam between the run and a strategy: one interface, and the wave runner both strategies convert with.

A strategy decides what each layer step does to the filesystem (its ``LayerTask`` model's callbacks) and what
the plan must count for it; the runner decides the order and the durability, the same for every strategy:

- layers go in batches of 1, 2, 4, … at most ``WAVE_LAYERS`` (``batches``); in a batch, one *wave* per layer
  state takes every layer at that state one step on (``trigger``); when the strategy says the step is heavy
  (``pooled_triggers``), its work is done first by ``jobs`` worker processes (``work_in_pool``), and each
  layer's transition callback takes its own outcome;
- once every wave of the batch is done, one ``syncfs`` makes all of their effects durable, and one
  transaction records every layer's last state (a strategy may sync and record more in between: the
  in-place strategy records its journals before its whiteout wave changes anything).

A cut anywhere leaves each layer at its last recorded state with its steps' work perhaps done in part, and
every step converges when it is done again.  Costs per layer are a few system calls; per batch, one sync and
one transaction (docs/design.md, "Waves").
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, Iterator, List, Optional, Sequence, Tuple

from migrations_state.machine import (
    COMMIT,
    COMMITTED,
    CONVERT_WHITEOUTS,
    DISCOVERED,
    LAYER_NEXT,
    LINKED,
    WRITE_LOWERS,
    layer_machine,
)
from migrations_state.schema import LayerRecord
from migrations_state.store import LayerStep, Store
from migrator import procs
from migrator.formats import overlay2
from migrator.fs import fsio
from migrator.paths import Paths
from migrator.scan.findings import StepResult
from migrator.scan.survey import LayerSurvey
from migrator.ui.progress import Reporter

WAVE_LAYERS = 512  # layers per batch: bounds what a cut loses and what one transaction holds
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
    """Model of one layer's state machine (``migrations_state/machine.py``).  Subclasses do the link and whiteout
    steps; the other two are the same for every strategy.  ``work(trigger)`` names a heavy step's work as a
    function and its arguments, so the runner can hand it to a worker; the callback then takes its outcome
    (``prepared``), or does the work itself when there is none."""

    def __init__(self, record: LayerRecord, paths: Paths, ancestor_links: List[str]) -> None:
        self.id = record.id
        self.record = record
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


class Strategy:
    """How layers become overlay2 layers; ``registry.py`` names each one and picks it."""

    name = ""  # set by the registry, with ``walks_first``
    walks_first = False  # its conversion starts from a walk of every layer: the plan always walks for it
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

    def convert(self, conv: Conversion) -> None:
        """Drive every layer to ``committed``, resuming each from its recorded state."""
        overlay2.prepare_tree(conv.paths.temp_tree)
        records = conv.store.layers()
        pending = [r for r in records if r.state != COMMITTED]
        self.prepare(conv, pending)
        _start_progress(conv, records)
        link_ids = {r.id: r.link_id for r in records}
        tfd = fsio.open_dir(conv.paths.temp_tree)
        try:
            with self._pool(conv, pending) as pool:
                for batch in batches(pending):
                    tasks = [self.task(r, conv, [link_ids[a] for a in _ancestors(r)]) for r in batch]
                    self._convert_batch(conv, tasks, tfd, pool)
        finally:
            os.close(tfd)

    @contextlib.contextmanager
    def _pool(self, conv: Conversion, pending: List[LayerRecord]
              ) -> Iterator[Optional[concurrent.futures.ProcessPoolExecutor]]:
        """The workers of the whole conversion (none with one job, or too few layers), all forked now,
        before the store opens a connection again (a child never uses one, but none need cross the fork)."""
        if conv.jobs <= 1 or not self.pooled_triggers or len(pending) < self.pool_from_layers:
            yield None
            return
        conv.store.release_connections()
        with procs.pool(conv.jobs, [conv.lock_fd] if conv.lock_fd is not None else []) as pool:
            pool.submit(int).result()  # with fork, the first task starts every worker
            yield pool

    def _convert_batch(self, conv: Conversion, tasks: List[LayerTask], tfd: int,
                       pool: Optional[concurrent.futures.ProcessPoolExecutor]) -> None:
        """Every wave of the batch, then one ``syncfs``, then one transaction: each layer's last state, with
        what its steps found.  A state in between needs no record: a cut before the one record finds each
        layer at its last recorded state, and every step converges when it is done again."""
        machine = layer_machine()
        for task in tasks:
            machine.add_model(task, initial=task.record.state)
        for source, trigger in LAYER_NEXT.items():
            at = [t for t in tasks if t.state == source]
            if not at:
                continue
            if trigger == CONVERT_WHITEOUTS:
                listed = conv.store.all_whiteout_dirs()  # layers linked by an earlier run
                for task in at:
                    task.whiteout_dirs = task.steps[0].whiteout_dirs if task.steps else listed.get(task.id, [])
            self.before_wave(conv, trigger, at)
            if pool is not None and trigger in self.pooled_triggers:
                self.work_in_pool(pool, conv.jobs, trigger, at)
            self._step_each(conv, trigger, at)
        fsio.syncfs(tfd)
        conv.store.set_layer_states([_summed(t.steps) for t in tasks if t.steps])
        for task in tasks:
            for step in task.steps:
                conv.progress.step(step.layer_id, step.state, step.entries, step.seconds)

    def work_in_pool(self, pool: concurrent.futures.ProcessPoolExecutor, jobs: int, trigger: str,
                     tasks: List[LayerTask]) -> None:
        """Each task's ``work(trigger)``, in the workers; each task gets its outcome."""
        for task, outcome in zip(tasks, run_in_chunks(pool, jobs, [t.work(trigger) for t in tasks])):
            task.prepared = outcome

    def _step_each(self, conv: Conversion, trigger: str, tasks: List[LayerTask]) -> None:
        for task in tasks:
            started = time.monotonic()
            try:
                task.trigger(trigger)
            except OSError as exc:
                conv.store.set_layer_error(task.id, f"{task.state}: {exc}")
                raise
            for step in task.steps:
                step.seconds = time.monotonic() - started

    # -- rollback ---------------------------------------------------------------------------------------

    def missing_layers(self, paths: Paths, store: Store) -> List[str]:
        """Layers whose aufs data a rollback could not give back (it is nowhere any more)."""
        return []

    def undo_layers(self, paths: Paths, store: Store, progress: Reporter) -> None:
        """Give aufs back what the conversion took from it, durably, before the new trees are removed."""

    def taken_from_aufs(self, paths: Paths) -> List[Tuple[str, str]]:
        """``(layer id, where it is)`` of every layer this strategy took out of ``aufs/diff``, found on disk
        alone (for a root whose state database is gone)."""
        return []

    def undo_from_disk(self, paths: Paths, progress: Reporter) -> None:
        """``undo_layers`` without the state database (``rollback --force``), from what is on disk."""


def _summed(steps: List[LayerStep]) -> LayerStep:
    """A layer's steps of one batch as one record: the last state, the link step's count and list of
    directories to convert, every step's findings."""
    linked = next((step for step in steps if step.state == LINKED), None)
    return LayerStep(steps[-1].layer_id, steps[-1].state, linked.entries if linked else None,
                     [f for step in steps for f in step.findings], linked.whiteout_dirs if linked else [])


def batches(pending: List[LayerRecord]) -> Iterator[List[LayerRecord]]:
    """The pending layers in batches of 1, 2, 4, … up to ``WAVE_LAYERS``: a run cut again and again still gets
    on (each start records its first layer after one layer's work), and thousands of layers still go in
    batches of ``WAVE_LAYERS``."""
    size, start = 1, 0
    while start < len(pending):
        yield pending[start:start + size]
        start += size
        size = min(2 * size, WAVE_LAYERS)


def _ancestors(record: LayerRecord) -> List[str]:
    return record.ancestors.split("\n") if record.ancestors else []


def _start_progress(conv: Conversion, records: List[LayerRecord]) -> None:
    surveyed = {i: s.entries for i, s in conv.surveys.items()}
    done = [r for r in records if r.state != DISCOVERED]
    conv.progress.start(len(records), sum(r.entries or surveyed.get(r.id, 0) for r in records),
                        sum(r.state == COMMITTED for r in records), sum(r.entries for r in done))


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
    return [outcome for future in futures for outcome in future.result()]
