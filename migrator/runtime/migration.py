"""The run's model: its phases, converting → switching → completed (→ cleaning → cleaned), or → rolling-back
→ rolled-back (``migrations_state/machine.py``), and what each phase change does to the filesystem.

Its transition callbacks are the only places that change the root outside the layer steps; ``record_phase``
is the only place that records a phase.  The database row is the truth: every start rebuilds the model from
it.  Converting is the strategy's (``strategies/``); switching, rollback and cleanup are the same for all.
"""

from __future__ import annotations

import os
from typing import List

from migrations_state.machine import (
    COMMITTED,
    COMPLETED,
    GONE,
    PENDING,
    RESTORED,
    ROLLING_BACK,
    SWITCHED,
    SWITCHING,
    phase_machine,
)
from migrations_state.schema import SavedTimeRecord
from migrator.errors import MigratorError
from migrator.formats import containers, engineconfig, images
from migrator.fs import fsio
from migrator.runtime import recovery, staging
from migrator.strategies import registry
from migrator.strategies.base import Conversion
from migrator.strategies.runner import WaveRunner


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

    # -- converting -------------------------------------------------------------------------------------

    def convert_layers(self) -> None:
        """Drive every layer to ``committed``, resuming each from its recorded state (a staged root's layers
        first move into ``overlay2.temp/``)."""
        staging.move_into_place(self.paths)
        WaveRunner(self.strategy, self.conv).run()

    def all_layers_committed(self) -> bool:
        return set(self.store.layer_states()) <= {COMMITTED}

    # -- switching --------------------------------------------------------------------------------------

    def switch_to_overlay2(self) -> None:
        """Stage the image store, switch containers, then rename the layer tree and the image store in.

        Order: (1) ``image/overlay2.temp`` staged (``images.stage``) and synced, recorded as staged; (2) each
        container's config rewritten atomically (its original bytes are in the database since discovery); (3)
        ``overlay2.temp`` → ``overlay2``; (4) ``image/overlay2.temp`` → ``image/overlay2``.  Each is
        idempotent and detectable from the tree, so a cut anywhere resumes; rollback undoes all four.
        """
        p = self.paths
        if not self.store.run().image_staged:
            if images.is_dir(p.image_aufs):
                linked, copied = images.stage(p.image_aufs, p.image_stage)
                self.progress(f"image store staged ({linked} files linked, {copied} entries copied)")
            self.store.set_image_staged(True)
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
        if fsio.lexists(p.image_stage):
            fsio.rename_durable(p.image_dir, os.path.basename(p.image_stage), os.path.basename(p.image_overlay2))

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


def restore_dir_times(root: str, rows: List[SavedTimeRecord]) -> None:
    for row in rows:
        path = os.path.join(root, row.path)
        if os.path.isdir(path) and not os.path.islink(path):
            os.utime(path, ns=(row.atime_ns, row.mtime_ns), follow_symlinks=False)
            fsio.fsync_path(path)
