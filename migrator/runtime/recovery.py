"""Rollback from what is on disk, for when the state database is gone or unreadable.

Without the database the tool cannot know which of ``overlay2/`` and ``image/overlay2/`` it made, so this path
runs only with ``--force`` and only while ``aufs/`` is there to go back to.  Container configs come back from
the copies kept in the work area at discovery (``.aufs2overlay/originals/``), byte for byte; a config without
such a copy gets its ``Driver`` set back to ``aufs``.  What it cannot restore without the database: the
times of ROOT, ``image/``, ``aufs/diff/`` (an in-place run moves layers out of it) and the container directories.
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Tuple

from migrator.checks import probe
from migrator.errors import MigratorError, Refused
from migrator.formats import containers, engineconfig, snapshot
from migrator.fs import fsio
from migrator.paths import Paths
from migrator.runtime.lock import remove_state_db
from migrator.strategies import registry


def rollback_from_disk(paths: Paths, progress: Callable[[str], None]) -> None:
    """Remove every overlay2 artefact and give aufs containers their configs back; idempotent."""
    snap = snapshot.read_root(paths)
    for cid, facts in snap.containers.items():
        if facts.driver != "overlay2" or cid not in snap.store.mounts:
            continue  # not switched, or created on overlay2 after the migration: an aufs engine ignores it
        kept = snap.kept.get(cid)
        data, st = kept if kept is not None else (containers.with_driver(facts.config, "aufs"), facts.st)
        containers.restore(paths.root, cid, data, st.st_mode & 0o7777, st.st_uid, st.st_gid,
                           (st.st_atime_ns, st.st_mtime_ns))
        progress(f"container {cid} back on aufs")
    config = engineconfig.restore(paths)
    if config:
        progress(f"engine config {config} restored")
    for strategy in registry.every():
        strategy.undo_from_disk(paths, progress)
    remove_new_trees(paths, progress, final=True)


def remove_new_trees(paths: Paths, progress: Callable[[str], None], final: bool) -> None:
    """Remove, durably, the trees a migration builds: the staging area and its image store copy, the image
    store's copy and ``overlay2.temp/`` always, and with ``final`` their renamed forms ``image/overlay2/`` and
    ``overlay2/`` (only when they are known to be the migration's, or the operator forced it)."""
    trees = [paths.staging, paths.staged_image, paths.image_temp, paths.temp_tree]
    trees += [paths.image_overlay2, paths.tree] if final else []
    for path in trees:
        if fsio.lexists(path):
            progress(f"removing {path}")
            fsio.ensure_absent_durably(*os.path.split(path))
    if probe.undo_earlier_probe(paths.root):
        progress(f"removed what a cut-off overlay probe left in {paths.root}")


def remove_work_area(paths: Paths, keep: Tuple[str, ...] = ()) -> None:
    """Remove the work area durably, but for the files of ``keep`` in it (and then the lock beside them: a
    later command must lock the same file, not a new one while this inode is still held)."""
    kept = {os.path.basename(k) for k in keep if os.path.dirname(os.path.abspath(k)) == paths.workdir}
    if not kept:
        fsio.ensure_absent_durably(paths.root, os.path.basename(paths.workdir))
        return
    kept.add(os.path.basename(paths.lock))
    for name in sorted(os.listdir(paths.workdir)):
        if name not in kept:
            fsio.ensure_absent_durably(paths.workdir, name)


def refuse_or_nothing(paths: Paths, force: bool, problem: Optional[str]) -> Optional[str]:
    """Before a rollback without a usable state database: the line that says there is nothing to roll back,
    or refused without ``force`` (None: go on, with ``rollback_without_state``).  A lost migration shows in
    what it leaves: the trees it builds and renames, or a cut-off probe's directory."""
    snap = snapshot.read_root(paths)
    if not snap.aufs_present:
        return f"nothing to roll back: {paths.root} has no aufs/"
    if problem is None and not snap.built and not probe.leftover_dirs(paths.root):
        return f"nothing to roll back: no migration state at {paths.state_db} and no overlay2 tree"
    if not force:
        raise Refused(f"{problem or 'no state database at ' + paths.state_db}; "
                      "'aufs2overlay rollback --force' rebuilds the aufs root from what is on disk")
    return None


def rollback_without_state(paths: Paths, progress: Callable[[str], None]) -> None:
    """``rollback --force`` with no usable state database (the caller holds the lock): the database is set
    aside, then the root is rebuilt from disk."""
    if fsio.lexists(paths.state_db):
        unusable = f"{paths.state_db}.unusable"
        os.replace(paths.state_db, unusable)
        fsio.fsync_path(os.path.dirname(paths.state_db))
        progress(f"moved the unusable state database to {unusable}")
    remove_state_db(paths.state_db)
    try:
        rollback_from_disk(paths, progress)
    except OSError as exc:
        raise MigratorError(f"{exc}; fix the cause and run 'rollback --force' again") from exc
