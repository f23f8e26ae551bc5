"""The run's model: its phases, converting → switching → completed (→ cleaning → cleaned), or → rolling-back
→ rolled-back (``migrations_state/machine.py``), what each phase change does to the filesystem, and the loops
that drive them (``run_to_completion``, ``roll_back``, ``clean_up``).

Its transition callbacks are the only places that change the root outside the layer steps; ``record_phase``
is the only place that records a phase.  The database row is the truth: every start rebuilds the model from
it.  Converting is the strategy's (``strategies/``); switching, rollback and cleanup are the same for all.  An
error of the filesystem in a loop is recorded as the run's last error (what ``status`` shows), then reported as
one line that says how to go on.
"""

from __future__ import annotations

import contextlib
import os
from typing import Dict, Iterator, List, Optional

from migrations_state.machine import (
    CLEANED,
    CLEANING,
    COMMITTED,
    COMPLETED,
    CONVERTING,
    FINISHED,
    GONE,
    PENDING,
    RESTORED,
    ROLLBACK_FORCED,
    ROLLED_BACK,
    ROLLING_BACK,
    STAGING,
    SWITCHED,
    SWITCHING,
    phase_machine,
)
from migrations_state.schema import SavedTimeRecord
from migrations_state.store import Store
from migrator import checkpoints, procs
from migrator.checks import engine
from migrator.errors import MigratorError, Refused
from migrator.formats import containers, engineconfig, images
from migrator.fs import fsio
from migrator.paths import Paths
from migrator.runtime import recovery, staging
from migrator.runtime.lock import Held
from migrator.scan.survey import LayerSurvey
from migrator.strategies import registry
from migrator.strategies.base import Conversion
from migrator.strategies.runner import WAVE_LAYERS, WaveRunner
from migrator.ui.progress import Reporter


class Migration:
    """Model of the run's phase machine, for the conversion ``conv`` describes."""

    def __init__(self, conv: Conversion) -> None:
        self.conv = conv
        self.paths = conv.paths
        self.store = conv.store
        self.progress = conv.progress
        self.run_record = conv.store.run()
        self.strategy = registry.get(self.run_record.strategy)
        phase_machine(self, self.run_record.phase)

    @classmethod
    def under(cls, paths: Paths, held: Held, progress: Reporter, jobs: int = 1,
              surveys: Optional[Dict[str, LayerSurvey]] = None) -> "Migration":
        """The migration recorded in the store ``held`` holds, under its lock."""
        if held.store is None:
            raise MigratorError(f"the state database {paths.state_db} went away while waiting for the lock; run "
                                "again")
        return cls(Conversion(paths, held.store, progress, jobs, held.lock_fd, surveys or {}))

    @contextlib.contextmanager
    def recording(self, resume: str) -> Iterator[None]:
        """An error of the filesystem inside is recorded as the run's last error, then reported as one line
        that ends with ``resume``, how to go on."""
        try:
            yield
        except OSError as exc:
            self.store.set_error(str(exc))
            raise MigratorError(f"{exc}; {resume}") from exc

    # -- the loops --------------------------------------------------------------------------------------

    def run_to_completion(self, resumed: bool = False) -> str:
        """Convert, switch, complete, from whatever phase is recorded; the line that says it is done."""
        phase = self.run_record.phase
        if phase in FINISHED:
            return f"migration of {self.paths.root} already {phase}"
        if phase == ROLLING_BACK:
            raise Refused("a rollback is in progress on this root; finish it with 'aufs2overlay rollback'")
        if resumed:
            states = self.store.layer_states()
            self.progress(f"resuming the migration ({phase}): {states.get(COMMITTED, 0)} of {sum(states.values())} "
                          "layers committed")
        with self.recording("fix the cause and run again: the migration resumes where it stopped"):
            if self.state == CONVERTING:
                self.convert_layers()
                if not self.start_switching():
                    raise MigratorError("not every layer reached 'committed'; see 'aufs2overlay status'")
            if self.state == SWITCHING:
                self.finish_switching()
        layers, entries = self.store.layer_totals()
        cutover = procs.seconds_since_start()
        self.store.set_cutover_seconds(cutover)
        self.progress(f"done in {self.progress.elapsed():.1f}s: {layers} layers, {entries} entries")
        return (f"migration of {self.paths.root} completed: {layers} layers now in overlay2/ "
                f"(cutover: {cutover:.2f} s from this command's start)")

    def roll_back(self, force: bool, staged_before: bool, engine_pidfiles: Optional[List[str]]) -> str:
        """Undo the migration from whatever phase is recorded (after completion only with ``force``); the line
        that says it is done.  A staging is not the engine's, so it may be rolled back beside a running
        engine; anything further (``staged_before`` false, or a cutover begun since) refuses one."""
        phase = self.run_record.phase
        if phase != STAGING and staged_before:  # the cutover began meanwhile
            engine.refuse_if_running(self.paths.root, engine_pidfiles)
        if phase == ROLLED_BACK:
            return f"migration of {self.paths.root} already rolled back"
        if phase in (CLEANING, CLEANED):
            raise Refused("the aufs data has been removed by cleanup; there is nothing to roll back to")
        if phase in ROLLBACK_FORCED and not force:
            raise Refused("the migration completed; rolling back loses everything the engine did on overlay2 "
                          "since. Use --force to roll back anyway")
        with self.recording("fix the cause and run rollback again: it resumes"):
            missing = self.missing_layers()
            if missing:
                raise Refused(f"{len(missing)} layer(s) moved in place are gone (e.g. {missing[0]}: removed by "
                              "the engine since the migration); a rollback cannot give back their aufs data")
            if self.may_start_rollback():
                self.start_rollback()
            self.finish_rollback()
        return f"rolled back: {self.paths.root} is on aufs as before the migration"

    def clean_up(self) -> Store:
        """Remove ``aufs/`` and ``image/aufs/`` after completion (``cleaning`` → ``cleaned``), then keep the
        state database as the migration's record: the store, to close before the work area goes."""
        with self.recording("run cleanup again: it resumes"):
            if self.state == COMPLETED:
                self.start_cleanup()
            if self.may_finish_cleanup():
                self.finish_cleanup()
        self.store.keep_as_record()
        return self.store

    # -- converting -------------------------------------------------------------------------------------

    def convert_layers(self) -> None:
        """Drive every layer to ``committed``, resuming each from its recorded state (a staged root's layers
        first move into ``overlay2.temp/``, and the cutover's few layers left go in one batch: the engine is
        waiting)."""
        cutover = staging.move_into_place(self.paths)
        WaveRunner(self.strategy, self.conv, first_batch=WAVE_LAYERS if cutover else 1).run()

    def all_layers_committed(self) -> bool:
        return set(self.store.layer_states()) <= {COMMITTED}

    # -- switching --------------------------------------------------------------------------------------

    def switch_to_overlay2(self) -> None:
        """Stage the image store, switch containers, then rename the layer tree and the image store in.

        Order: (1) ``image/overlay2.temp`` copied and synced (``copy_image_store``), recorded; (2) each
        container's config rewritten atomically (its original bytes are in the database since discovery); (3)
        ``overlay2.temp`` → ``overlay2``; (4) ``image/overlay2.temp`` → ``image/overlay2``.  Each is
        idempotent and detectable from the tree, so a cut anywhere resumes; rollback undoes all four.
        """
        p = self.paths
        if not self.store.run().image_copied:
            if images.is_dir(p.image_aufs):
                self.progress(copy_image_store(p))
            self.store.set_image_copied(True)
        for record in self.store.containers():
            if record.state == PENDING:
                containers.switch(p.root, record.id, record.original, record.mode, record.uid, record.gid)
                self.store.set_container_state(record.id, SWITCHED)
                self.progress(f"container {record.id} switched to overlay2")
        config = engineconfig.switch(p)
        if config:
            self.progress(f"engine config {config}: storage-driver overlay2")
        if fsio.lexists(p.temp_tree):
            if fsio.lexists(p.tree):
                raise MigratorError(f"both {p.temp_tree} and {p.tree} exist; refusing to guess which is right")
            fsio.rename_durable(p.root, os.path.basename(p.temp_tree), os.path.basename(p.tree))
        if fsio.lexists(p.image_temp):
            fsio.rename_durable(p.image_dir, os.path.basename(p.image_temp), os.path.basename(p.image_overlay2))

    # -- rollback ---------------------------------------------------------------------------------------

    def missing_layers(self) -> List[str]:
        """Layers whose aufs data a rollback cannot give back."""
        return self.strategy.missing_layers(self.paths, self.store)

    def undo_migration(self) -> None:
        """Restore every container config byte for byte, give aufs back its layers (the strategy's part), then
        remove everything the run created and put back the times of the directories it changed."""
        p = self.paths
        run = self.store.run()
        for record in self.store.containers():
            if record.original is not None and record.state in (PENDING, SWITCHED):
                restored = containers.restore(p.root, record.id, record.original, record.mode, record.uid,
                                              record.gid, (record.atime_ns, record.mtime_ns))
                self.store.set_container_state(record.id, RESTORED if restored else GONE)
                if not restored:
                    self.progress(f"container {record.id} was removed since the migration; not restored")
        config = engineconfig.restore(p)
        if config:
            self.progress(f"engine config {config} restored")
        self.strategy.undo_layers(p, self.store, self.progress)
        # overlay2/ and image/overlay2/ are this run's only once it reached switching (refused before).
        recovery.remove_new_trees(p, self.progress, final=run.rollback_from in (SWITCHING, COMPLETED))
        restore_dir_times(p.root, self.store.saved_times())

    # -- cleanup ----------------------------------------------------------------------------------------

    def remove_aufs_data(self) -> None:
        """Move ``aufs/`` and ``image/aufs/`` into the work area (atomic, so no engine sees half of them),
        then delete them there."""
        p = self.paths
        trash = os.path.join(p.workdir, "trash")
        os.makedirs(trash, mode=0o700, exist_ok=True)
        for parent, name, dest in ((p.root, "aufs", "aufs"), (p.image_dir, "aufs", "image-aufs")):
            if fsio.lexists(os.path.join(parent, name)):
                fsio.remove_tree(os.path.join(trash, dest))
                os.rename(os.path.join(parent, name), os.path.join(trash, dest))
                fsio.fsync_path(parent)
                fsio.fsync_path(trash)
        self.progress("removing the aufs data")
        fsio.ensure_absent_durably(p.workdir, "trash")

    # -- recording --------------------------------------------------------------------------------------

    def record_phase(self) -> None:
        rollback_from = self.store.run().phase if self.state == ROLLING_BACK else None
        self.store.set_phase(self.state, rollback_from=rollback_from)
        self.progress(f"phase: {self.state}")


def copy_image_store(p: Paths) -> str:
    """``image/overlay2.temp``: the copy ``stage`` made, moved into place and brought up to date with what
    changed since (``images.update_store``), or a copy made now; durable.  Converges from any cut: a copy
    cut off anywhere, or moved into place, is brought up to date; the line that says what was done."""
    if fsio.lexists(p.staged_image) and not fsio.lexists(p.image_temp):
        os.rename(p.staged_image, p.image_temp)
        fsio.fsync_path(p.image_dir)
        fsio.fsync_path(p.workdir)
        checkpoints.reached("staged image store moved into place")
    if fsio.lexists(p.image_temp):
        linked, copied = images.update_store(p.image_aufs, p.image_temp)
        done = f"image store brought up to date ({linked} files linked anew, {copied} entries copied anew)"
    else:
        linked, copied = images.copy_store(p.image_aufs, p.image_temp)
        done = f"image store copied ({linked} files linked, {copied} entries copied)"
    fsio.ensure_absent_durably(p.workdir, os.path.basename(p.staged_image))  # a staging's copy not moved in
    return done


def restore_dir_times(root: str, rows: List[SavedTimeRecord]) -> None:
    for row in rows:
        path = os.path.join(root, row.path)
        if os.path.isdir(path) and not os.path.islink(path):
            os.utime(path, ns=(row.atime_ns, row.mtime_ns), follow_symlinks=False)
            fsio.fsync_path(path)
