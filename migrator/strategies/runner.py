"""The wave runner: the one order and durability of a conversion, the same for every strategy.

- Layers go in batches of 1, 2, 4, … at most ``WAVE_LAYERS`` (``batches``); in a batch, one *wave* per layer
  state takes every layer at that state one step on (``trigger``); when the strategy says the step is heavy
  (``pooled_triggers``), its work is done first by ``jobs`` worker processes (``Strategy.pooled_outcomes``),
  and each layer's transition callback takes its own outcome;
- once every wave of the batch is done, one ``syncfs`` makes all of their effects durable, and one
  transaction records every layer's last state.  A strategy may sync and record more *before* a wave
  (``Strategy.before_wave``: the in-place strategy records its journals before its whiteout wave changes
  anything), never instead of this.

A cut anywhere leaves each layer at its last recorded state with its steps' work perhaps done in part, and
every step converges when it is done again.  Costs per layer are a few system calls; per batch, one sync and
one transaction (docs/design.md, "Waves").  A strategy supplies hooks; it does not subclass this class.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import time
from typing import Dict, Iterator, List, Optional

from migrations_state.machine import COMMITTED, CONVERT_WHITEOUTS, DISCOVERED, LAYER_NEXT, LINKED, layer_machine
from migrations_state.schema import LayerRecord
from migrations_state.store import LayerStep, Store
from migrator import procs
from migrator.formats import overlay2
from migrator.fs import fsio
from migrator.strategies.base import Conversion, LayerTask, Strategy

WAVE_LAYERS = 512  # layers per batch: bounds what a cut loses and what one transaction holds


class WaveRunner:
    """Drives every layer of ``conv`` to ``committed`` with ``strategy``'s steps, resuming each from its
    recorded state."""

    def __init__(self, strategy: Strategy, conv: Conversion, first_batch: int = 1) -> None:
        self.strategy = strategy
        self.conv = conv
        self.first_batch = first_batch

    def run(self) -> None:
        conv = self.conv
        overlay2.prepare_tree(conv.paths.temp_tree)
        records = conv.store.layers()
        pending = [r for r in records if r.state != COMMITTED]
        self.strategy.prepare(conv, pending)
        self._start_progress(records)
        link_ids = {r.id: r.link_id for r in records}
        tfd = fsio.open_dir(conv.paths.temp_tree)
        try:
            with self._pool(pending) as pool:
                for batch in batches(pending, self.first_batch):
                    tasks = [self.strategy.task(r, conv, [link_ids[a] for a in r.ancestor_ids]) for r in batch]
                    self._convert_batch(tasks, tfd, pool)
        finally:
            os.close(tfd)

    @contextlib.contextmanager
    def _pool(self, pending: List[LayerRecord]) -> Iterator[Optional[concurrent.futures.ProcessPoolExecutor]]:
        """The workers of the whole conversion (none with one job, or too few layers), all forked now,
        before the store opens a connection again (a child never uses one, but none need cross the fork)."""
        conv, strategy = self.conv, self.strategy
        if conv.jobs <= 1 or not strategy.pooled_triggers or len(pending) < strategy.pool_from_layers:
            yield None
            return
        conv.store.release_connections()
        with procs.pool(conv.jobs, [conv.lock_fd] if conv.lock_fd is not None else []) as pool:
            pool.submit(int).result()  # with fork, the first task starts every worker
            yield pool

    def _convert_batch(self, tasks: List[LayerTask], tfd: int,
                       pool: Optional[concurrent.futures.ProcessPoolExecutor]) -> None:
        """Every wave of the batch, then one ``syncfs``, then one transaction: each layer's last state, with
        what its steps found.  A state in between needs no record: a cut before the one record finds each
        layer at its last recorded state, and every step converges when it is done again."""
        conv, strategy = self.conv, self.strategy
        machine = layer_machine()
        for source, trigger in LAYER_NEXT.items():
            at = [t for t in tasks if t.state == source]
            if not at:
                continue
            if trigger == CONVERT_WHITEOUTS:
                listed = conv.store.all_whiteout_dirs()  # layers linked by an earlier run
                for task in at:
                    task.whiteout_dirs = task.steps[0].whiteout_dirs if task.steps else listed.get(task.id, [])
            strategy.before_wave(conv, trigger, at)
            if pool is not None and trigger in strategy.pooled_triggers:
                for task, outcome in zip(at, strategy.pooled_outcomes(pool, conv.jobs, trigger, at)):
                    task.prepared = outcome
            wave = Wave(at, conv.store)
            machine.add_model(wave, initial=source)
            try:
                wave.trigger(trigger)
            finally:
                machine.remove_model(wave)
        fsio.syncfs(tfd)
        conv.store.set_layer_states([_summed(t.steps) for t in tasks if t.steps])
        for task in tasks:
            for step in task.steps:
                conv.progress.step(step.layer_id, step.state, step.entries, step.seconds)

    def _start_progress(self, records: List[LayerRecord]) -> None:
        surveyed: Dict[str, int] = {i: s.entries for i, s in self.conv.surveys.items()}
        done = [r for r in records if r.state != DISCOVERED]
        self.conv.progress.start(len(records), sum(r.entries or surveyed.get(r.id, 0) for r in records),
                                 sum(r.state == COMMITTED for r in records), sum(r.entries for r in done))


class Wave:
    """The layer machine's model: the layers of a batch that are at one state, taken one step on together.
    One trigger moves the wave (thousands of layers made thousands of triggers, most of a run's bookkeeping);
    its callbacks are the layer machine's, each done for every layer in order.  A step that raises records its
    layer's error and leaves the whole wave at its state: nothing of the batch is recorded (the runner
    records a batch only after its ``syncfs``), and every step converges when it is done again."""

    def __init__(self, tasks: List[LayerTask], store: Store) -> None:
        self.tasks = tasks
        self.store = store
        self.state = ""  # set by the machine (``add_model``'s ``initial``)
        self._seconds: List[float] = []

    def _each(self, callback: str) -> None:
        self._seconds = []
        for task in self.tasks:
            started = time.monotonic()
            try:
                getattr(task, callback)()
            except OSError as exc:
                self.store.set_layer_error(task.id, f"{self.state}: {exc}")
                raise
            self._seconds.append(time.monotonic() - started)

    def build_tree(self) -> None:
        self._each("build_tree")

    def convert_whiteouts_in_tree(self) -> None:
        self._each("convert_whiteouts_in_tree")

    def write_lower_files(self) -> None:
        self._each("write_lower_files")

    def write_committed_marker(self) -> None:
        self._each("write_committed_marker")

    def record_state(self) -> None:
        """Each layer at the wave's new state, its step kept for the batch's one transaction."""
        for task, seconds in zip(self.tasks, self._seconds):
            task.state = self.state
            task.record_state()
            task.steps[-1].seconds = seconds


def _summed(steps: List[LayerStep]) -> LayerStep:
    """A layer's steps of one batch as one record: the last state, the link step's count and list of
    directories to convert, every step's findings."""
    linked = next((step for step in steps if step.state == LINKED), None)
    return LayerStep(steps[-1].layer_id, steps[-1].state, linked.entries if linked else None,
                     [f for step in steps for f in step.findings], linked.whiteout_dirs if linked else [])


def batches(pending: List[LayerRecord], first: int = 1) -> Iterator[List[LayerRecord]]:
    """The pending layers in batches of 1, 2, 4, … up to ``WAVE_LAYERS``: a run cut again and again still gets
    on (each start records its first layer after one layer's work), and thousands of layers still go in
    batches of ``WAVE_LAYERS``.  ``first``: the first batch's size (the cutover's few layers go in one)."""
    size, start = min(max(first, 1), WAVE_LAYERS), 0
    while start < len(pending):
        yield pending[start:start + size]
        start += size
        size = min(2 * size, WAVE_LAYERS)
