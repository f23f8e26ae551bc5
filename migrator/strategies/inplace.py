"""The in-place strategy: each ``aufs/diff/<id>`` is renamed into the new tree and converted where it stands.

No entry is copied or linked, so the cost is one rename per layer plus a read-only walk that finds the
directories holding aufs whiteouts.  What it changes is aufs data, so before the whiteout wave changes
anything every layer's journal is written (a copy in its stash, then one ``syncfs``, then the rows in one
transaction); rollback undoes each journal and renames the layer back (``inplace_moves.py``).
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Set, Tuple

from migrations_state.machine import CONVERT_WHITEOUTS, DISCOVERED
from migrations_state.schema import LayerRecord
from migrations_state.store import Journal, Store
from migrator.formats import lowerview, overlay2
from migrator.fs import fsio
from migrator.paths import Paths
from migrator.scan import survey
from migrator.scan.findings import StepResult
from migrator.strategies import inplace_journal, inplace_moves
from migrator.strategies.base import Conversion, LayerTask, Strategy
from migrator.ui.progress import Reporter


class InPlaceTask(LayerTask):
    """The link step moves ``aufs/diff/<id>`` into the tree; the whiteout step applies the layer's journal."""

    def __init__(self, record: LayerRecord, paths: Paths, ancestor_links: List[str], store: Store,
                 scanned: Optional[StepResult], journaled: bool = False) -> None:
        super().__init__(record, paths, ancestor_links)
        self.store = store
        self.scanned = scanned
        self.journaled = journaled  # by an earlier run: its findings were recorded with the journal
        self.walk_findings: List[Tuple[str, str]] = []  # the walk's, recorded with the journal (``journal``)
        self.planned: Optional[tuple] = None  # (changes, dir times) journaled in this run

    def lowers(self, lower_of: Callable[[str], lowerview.Lower]) -> List[lowerview.Lower]:
        """The ancestors as they stand, nearest first, read by ``lower_of`` (``ancestors_as_they_stand``)."""
        return [lower_of(a) for a in self.record.ancestor_ids]

    @property
    def diff(self) -> str:
        return overlay2.diff_dir(self.paths.temp_tree, self.id)

    @property
    def stash(self) -> str:
        return os.path.join(self.paths.stash, self.id)

    def build_tree(self) -> None:
        """Move the layer into the tree, with what the walk found.  A layer with aufs entries gets a journal,
        and the walk's findings are recorded with it, before any entry moves: after a cut, a walk of the half
        converted layer would find other things (``journal``)."""
        if self.journaled:  # converted in part already: its journal, recorded, holds the rest
            inplace_moves.move_layer(self.paths.aufs_diff, self.paths.temp_tree, self.id)
            self.result = StepResult()
            return
        if self.scanned is None:
            where = inplace_moves.diff_location(self.paths.aufs_diff, self.paths.temp_tree, self.id)
            lowers = self.lowers(ancestors_as_they_stand(self.paths, self.store))
            self.scanned = survey.scan_layer(where, self.record.writable, lowers)
        inplace_moves.move_layer(self.paths.aufs_diff, self.paths.temp_tree, self.id)
        self.result = self.scanned
        if self.scanned.whiteout_dirs:
            self.walk_findings = list(self.scanned.findings)
            self.result = StepResult(self.scanned.entries, [], list(self.scanned.whiteout_dirs))

    def journal(self, lower_of: Callable[[str], lowerview.Lower]) -> Optional[Journal]:
        """Plan this layer's changes in its whiteout directories and write their journal copy; the journal to
        record, or None when the layer needs none.  Nothing is changed yet.  ``lower_of`` reads an ancestor."""
        self.planned = ([], [])
        if not self.whiteout_dirs:
            return None
        changes, times, found = inplace_journal.plan_changes(self.diff, self.whiteout_dirs, self.lowers(lower_of),
                                                             image=not self.record.writable)
        inplace_journal.write_journal_copy(self.stash, changes, times)
        self.planned = (changes, times)
        return Journal(self.id, *inplace_journal.rows_from_changes(self.id, changes, times),
                       self.walk_findings + found.findings)

    def convert_whiteouts_in_tree(self) -> None:
        """Apply the journal: planned and recorded before this wave, or recorded by an earlier run."""
        self.result = None
        if self.planned is None:
            self.planned = inplace_journal.changes_from_rows(*self.store.changes(self.id))
        changes, times = self.planned
        if changes:
            inplace_moves.apply_changes(self.diff, self.stash, self.id, changes, times)


class InPlaceStrategy(Strategy):
    task_class = InPlaceTask
    journaled: Set[str] = frozenset()  # layers an earlier run journaled (``prepare``)

    def layer_need(self, writable: bool, found: survey.LayerSurvey, block: int) -> Tuple[int, int]:
        return (2, 2 * block) if found.whiteout_dirs else (0, 0)  # the layer's stash and its journal copy

    def work_area_need(self, block: int) -> Tuple[int, int]:
        return 1, block  # the stash directory

    def task(self, record: LayerRecord, conv: Conversion, ancestor_links: List[str]) -> LayerTask:
        return self.task_class(record, conv.paths, ancestor_links, conv.store, conv.surveys.get(record.id),
                               record.id in self.journaled)

    def prepare(self, conv: Conversion, pending: List[LayerRecord]) -> None:
        """Walk, read-only and in ``jobs`` processes, the layers still to move that the plan did not walk (but
        those an earlier run journaled: their journals say the rest)."""
        p = conv.paths
        self.journaled = set(conv.store.journaled_layers())
        todo = [r for r in pending if r.state == DISCOVERED and r.id not in conv.surveys
                and r.id not in self.journaled]
        if not todo:
            return
        where = [inplace_moves.diff_location(p.aufs_diff, p.temp_tree, r.id) for r in todo]
        lower_of = ancestors_as_they_stand(p, conv.store)
        lowers = [[lower_of(a) for a in r.ancestor_ids] for r in todo]
        conv.store.release_connections()
        close = [conv.lock_fd] if conv.lock_fd is not None else []
        conv.surveys.update(zip((r.id for r in todo), survey.scan_layers(where, [r.writable for r in todo], lowers,
                                                                        conv.jobs, close)))

    def before_wave(self, conv: Conversion, trigger: str, tasks: List[LayerTask]) -> None:
        """Every journal of the wave before it changes anything: the copies written, one ``syncfs``, one
        transaction.  A layer whose journal an earlier run recorded reads it back in its whiteout step."""
        if trigger != CONVERT_WHITEOUTS:
            return
        journaled = set(conv.store.journaled_layers())
        lower_of = ancestors_as_they_stand(conv.paths, conv.store, journaled)
        journals = [j for j in (t.journal(lower_of) for t in tasks if t.id not in journaled) if j is not None]
        if journals:
            fd = fsio.open_dir(conv.paths.temp_tree)
            try:
                fsio.syncfs(fd)
            finally:
                os.close(fd)
            conv.store.record_journals(journals)

    def missing_layers(self, paths: Paths, store: Store) -> List[str]:
        """Layers whose data is nowhere (an engine removed them after completion)."""
        return [r.id for r in store.layers()
                if not fsio.lexists(paths.aufs_layer(r.id))
                and not fsio.lexists(inplace_moves.moved_location((paths.temp_tree, paths.tree), r.id))]

    def undo_layers(self, paths: Paths, store: Store, progress: Reporter) -> None:
        """Undo each layer's journal and rename it back into ``aufs/diff``, then sync; only then may the new
        trees, now free of aufs data, be removed."""
        for record in reversed(store.layers()):
            changes, times = inplace_journal.changes_from_rows(*store.changes(record.id))
            diff = inplace_moves.moved_location((paths.temp_tree, paths.tree), record.id)
            inplace_moves.undo_layer(paths.aufs_diff, diff, os.path.join(paths.stash, record.id), record.id,
                                     changes, times, (record.atime_ns, record.mtime_ns), progress)
        inplace_moves.sync_moved_back(paths)

    def undo_from_disk(self, paths: Paths, progress: Reporter) -> None:
        """Each moved layer's journal copy undone, the layer renamed back, then synced."""
        for layer_id, diff in overlay2.moved_from_aufs(paths):
            stash = os.path.join(paths.stash, layer_id)
            changes, times = inplace_journal.read_journal_copy(stash) or ([], [])
            inplace_moves.undo_layer(paths.aufs_diff, diff, stash, layer_id, changes, times, None, progress)
        inplace_moves.sync_moved_back(paths)


def ancestors_as_they_stand(paths: Paths, store: Store, journaled: Optional[Set[str]] = None
                            ) -> Callable[[str], lowerview.Lower]:
    """How an ancestor is read as it stands now: in aufs form unless journaled (then maybe partly converted by
    an earlier run or wave: its journal says what to read back); each journal is read once."""
    journaled = set(store.journaled_layers()) if journaled is None else journaled
    read: Dict[str, Dict[bytes, lowerview.JournaledDir]] = {}

    def lower_of(layer_id: str) -> lowerview.Lower:
        where = inplace_moves.diff_location(paths.aufs_diff, paths.temp_tree, layer_id)
        if layer_id not in journaled:
            return lowerview.Lower(where)
        if layer_id not in read:
            changes, _ = inplace_journal.changes_from_rows(*store.changes(layer_id))
            read[layer_id] = inplace_journal.aufs_entries_by_dir(changes)
        return lowerview.Lower(where, read[layer_id])

    return lower_of
