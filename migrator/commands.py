"""One function per command.  The CLI only parses arguments and calls these; each returns the exit code."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Optional, Sequence

from migrations_state.errors import StateDatabaseError
from migrations_state.machine import ROLLBACK_FORCED, ROLLBACK_FREE
from migrations_state.store import Store
from migrator import aufs, containers, engine, fsio, recovery, report, sample
from migrator import verify as verifier
from migrator.errors import (
    EXIT_OK,
    EXIT_USAGE,
    MigratorError,
    Refused,
)
from migrator.runtime import (
    Migration,
    Paths,
    default_progress,
    dirs_whose_times_change,
    discovered_records,
    root_lock,
)

STRATEGIES = ("hardlink", "inplace")
DEFAULT_STRATEGY = "hardlink"
DEFAULT_JOBS = report.DEFAULT_JOBS


def _say(msg: str) -> None:
    print(msg, flush=True)


_paths = report.paths_for


def _open_store(paths: Paths) -> Optional[Store]:
    if not os.path.exists(paths.state_db):
        return None
    try:
        return Store(paths.state_db)
    except StateDatabaseError as exc:
        raise MigratorError(f"{exc}; 'aufs2overlay rollback --force' restores aufs without it") from None


def _refuse_running_engine(paths: Paths, pidfiles: Optional[Sequence[str]]) -> None:
    signs = engine.running_engine(paths.root, pidfiles if pidfiles is not None else engine.DEFAULT_PIDFILES)
    if signs:
        raise Refused(f"an engine is using {paths.root} ({signs[0]}); stop it first")


def _remove_state_db(path: str) -> None:
    for suffix in ("", "-wal", "-shm", "-journal", ".new", ".new-journal"):
        try:
            os.unlink(path + suffix)
        except FileNotFoundError:
            pass
    fsio.fsync_path(os.path.dirname(path))


def _discover(paths: Paths) -> tuple:
    """Every refusal of a new run happens here, before anything is written."""
    moved = recovery.moved_layers(paths)
    if moved:
        raise Refused(f"layer {moved[0][0]} was moved out of aufs/diff by an in-place migration whose state "
                      f"database is gone ({moved[0][1]}); 'aufs2overlay rollback --force' moves it back")
    discovery = aufs.discover(paths.root)
    found, container_findings = containers.find_containers(paths.root, lambda c: recovery.original_of(paths, c))
    for path, what in ((paths.tree, "overlay2/"), (paths.image_overlay2, "image/overlay2/")):
        if fsio.lexists(path):
            raise Refused(f"{what} already exists in {paths.root} and is not this migration's (an engine ran "
                          "with overlay2, or a migration lost its state database: 'aufs2overlay rollback --force' "
                          "removes it); move it away, then run again")
    times = dirs_whose_times_change(paths.root, [c.id for c in found if c.state == "pending"])
    return discovery, found, container_findings, times


def _start(paths: Paths, strategy: str, discovery, found, container_findings, times, progress) -> Store:
    findings = list(discovery.findings) + list(container_findings)
    for parent, name in ((paths.root, os.path.basename(paths.temp_tree)),
                         (paths.image_dir, os.path.basename(paths.image_stage))):
        if fsio.lexists(os.path.join(parent, name)):
            progress(f"removing leftover {os.path.join(parent, name)} of an earlier, unrecorded attempt")
            fsio.ensure_absent_durably(parent, name)
            findings.append(("removed-leftover", os.path.join(parent, name)))
    for kind, detail in findings:
        progress(f"note: {kind}: {detail}")
    fsio.ensure_absent_durably(paths.workdir, os.path.basename(paths.stash))  # journals of an earlier run
    recovery.keep_originals(paths, found)
    os.makedirs(os.path.dirname(paths.state_db), mode=0o700, exist_ok=True)
    _remove_state_db(paths.state_db)
    layers, container_rows, finding_rows = discovered_records(discovery.layers, discovery.parents, found, findings)
    store = Store.create(paths.state_db, paths.root, strategy, layers, container_rows, finding_rows, times)
    progress(f"discovered {len(layers)} layers, {sum(c.state == 'pending' for c in found)} containers on aufs; "
             f"strategy {strategy}")
    return store


def run(root: str, state_db: Optional[str] = None, engine_pidfiles: Optional[Sequence[str]] = None,
        quiet: bool = False, jobs: int = DEFAULT_JOBS, strategy: Optional[str] = None) -> int:
    """Start or resume the migration; exit 0 only once it has completed."""
    paths = _paths(root, state_db)
    progress = default_progress(quiet)
    if strategy is not None and strategy not in STRATEGIES:
        raise MigratorError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}", EXIT_USAGE)
    store = _open_store(paths)
    if store is None and not fsio.lexists(paths.aufs):
        _say(f"nothing to migrate: {paths.root} has no aufs/")
        return EXIT_OK
    _refuse_mixed_strategy(store, strategy)
    _refuse_running_engine(paths, engine_pidfiles)
    fresh = store is None or store.run().phase == "rolled-back"
    if fresh:
        discovered = _discover(paths)
    with root_lock(paths):
        if store is not None:
            store.close()
        store = _open_store(paths)
        _refuse_mixed_strategy(store, strategy)
        if store is None or store.run().phase == "rolled-back":
            if not fresh:
                discovered = _discover(paths)
            if store is not None:
                store.close()
            store = _start(paths, strategy or DEFAULT_STRATEGY, *discovered, progress)
        try:
            return _drive_run(paths, store, progress, jobs)
        finally:
            store.close()


def _refuse_mixed_strategy(store: Optional[Store], strategy: Optional[str]) -> None:
    """A migration resumes with the strategy it started with: the two leave different things half-done."""
    if store is None or strategy is None:
        return
    run = store.run()
    if run.phase != "rolled-back" and run.strategy != strategy:
        store.close()
        raise Refused(f"this migration was started with --strategy {run.strategy} and is {run.phase}; resume it "
                      f"with --strategy {run.strategy} (or no --strategy), or roll it back first")


def _drive_run(paths: Paths, store: Store, progress, jobs: int) -> int:
    phase = store.run().phase
    if phase in ("completed", "cleaning", "cleaned"):
        _say(f"migration of {paths.root} already {phase}")
        return EXIT_OK
    if phase == "rolling-back":
        raise Refused("a rollback is in progress on this root; finish it with 'aufs2overlay rollback'")
    migration = Migration(paths, store, progress)
    try:
        if migration.state == "converting":
            migration.convert_layers(jobs)
            if not migration.start_switching():
                raise MigratorError("not every layer reached 'committed'; see 'aufs2overlay status'")
        if migration.state == "switching":
            migration.finish_switching()
    except OSError as exc:
        store.set_error(str(exc))
        raise MigratorError(f"{exc}; fix the cause and run again: the migration resumes where it stopped") from exc
    _say(f"migration of {paths.root} completed: {len(store.layers())} layers now in overlay2/")
    return EXIT_OK


def rollback(root: str, state_db: Optional[str] = None, force: bool = False,
             engine_pidfiles: Optional[Sequence[str]] = None, quiet: bool = False) -> int:
    """Undo the migration: the aufs root as it was, every container config byte for byte."""
    paths = _paths(root, state_db)
    progress = default_progress(quiet)
    try:
        store = _open_store(paths)
    except MigratorError as exc:
        return _rollback_without_state(paths, force, engine_pidfiles, progress, str(exc))
    if store is None:
        return _rollback_without_state(paths, force, engine_pidfiles, progress, None)
    store.close()
    _refuse_running_engine(paths, engine_pidfiles)
    with root_lock(paths):
        store = _open_store(paths)
        try:
            phase = store.run().phase
            if phase == "rolled-back":
                _say(f"migration of {paths.root} already rolled back")
                return EXIT_OK
            if phase in ("cleaning", "cleaned"):
                raise Refused("the aufs data has been removed by cleanup; there is nothing to roll back to")
            if phase in ROLLBACK_FORCED and not force:
                raise Refused("the migration completed; rolling back loses everything the engine did on overlay2 "
                              "since. Use --force to roll back anyway")
            migration = Migration(paths, store, progress)
            missing = migration.missing_layers()
            if missing:
                raise Refused(f"{len(missing)} layer(s) moved in place are gone (e.g. {missing[0]}: removed by the "
                              "engine since the migration); a rollback cannot give back their aufs data")
            if phase in ROLLBACK_FREE + ROLLBACK_FORCED:
                migration.start_rollback()
            migration.finish_rollback()
        except OSError as exc:
            store.set_error(str(exc))
            raise MigratorError(f"{exc}; fix the cause and run rollback again: it resumes") from exc
        finally:
            store.close()
    _say(f"rolled back: {paths.root} is on aufs as before the migration")
    return EXIT_OK


def _rollback_without_state(paths: Paths, force: bool, engine_pidfiles, progress, problem: Optional[str]) -> int:
    """No usable state database: with --force, rebuild the aufs root from what is on disk."""
    if not fsio.lexists(paths.aufs):
        _say(f"nothing to roll back: {paths.root} has no aufs/")
        return EXIT_OK
    if problem is None and not recovery.leftovers(paths):
        _say(f"nothing to roll back: no migration state at {paths.state_db} and no overlay2 tree")
        return EXIT_OK
    if not force:
        raise Refused(f"{problem or 'no state database at ' + paths.state_db}; "
                      "'aufs2overlay rollback --force' rebuilds the aufs root from what is on disk")
    _refuse_running_engine(paths, engine_pidfiles)
    with root_lock(paths):
        if fsio.lexists(paths.state_db):
            unusable = f"{paths.state_db}.unusable"
            os.replace(paths.state_db, unusable)
            fsio.fsync_path(os.path.dirname(paths.state_db))
            progress(f"moved the unusable state database to {unusable}")
        _remove_state_db(paths.state_db)
        try:
            recovery.rollback_from_disk(paths, progress)
        except OSError as exc:
            raise MigratorError(f"{exc}; fix the cause and run 'rollback --force' again") from exc
    _say(f"rolled back from disk: {paths.root} is on aufs (directory times could not be restored without the "
         "state database)")
    return EXIT_OK


def cleanup(root: str, state_db: Optional[str] = None, engine_pidfiles: Optional[Sequence[str]] = None,
            quiet: bool = False) -> int:
    """After completion: remove aufs/ and image/aufs/, then the migrator's own state."""
    paths = _paths(root, state_db)
    progress = default_progress(quiet)
    store = _open_store(paths)
    if store is None:
        raise Refused(f"no migration state at {paths.state_db}; cleanup only follows a completed run")
    phase = store.run().phase
    store.close()
    if phase not in ("completed", "cleaning", "cleaned"):
        raise Refused(f"the migration is {phase}, not completed; cleanup would destroy the only copy")
    _refuse_running_engine(paths, engine_pidfiles)
    with root_lock(paths):
        store = _open_store(paths)
        try:
            migration = Migration(paths, store, progress)
            if migration.state == "completed":
                migration.start_cleanup()
            if migration.state == "cleaning":
                migration.finish_cleanup()
        except OSError as exc:
            raise MigratorError(f"{exc}; run cleanup again: it resumes") from exc
        finally:
            store.close()
        _remove_state_db(paths.state_db)
        fsio.ensure_absent_durably(paths.root, os.path.basename(paths.workdir))
    _say(f"cleaned: {paths.root} now holds only the overlay2 driver's data")
    return EXIT_OK


def verify(root: str, state_db: Optional[str] = None) -> int:
    """Check the migrated tree: structure of every layer, no aufs residue, and each chain mounts."""
    paths = _paths(root, state_db)
    store = _open_store(paths)
    if store is None:
        raise Refused(f"no migration state at {paths.state_db}")
    try:
        problems = verifier.verify(paths, store)
    finally:
        store.close()
    for problem in problems:
        print(f"problem: {problem}")
    if problems:
        print(f"verify: {len(problems)} problem(s)")
        return 1
    print("verify: ok")
    return EXIT_OK


def demo(keep: bool = False) -> int:
    """Build a sample aufs root in a temporary folder, migrate it, verify it and show its status."""
    if os.geteuid() != 0:
        raise MigratorError("demo needs root (it creates device nodes, trusted.* xattrs and mounts)", EXIT_USAGE)
    workdir = tempfile.mkdtemp(prefix="aufs2overlay-demo-")
    root = os.path.join(workdir, "docker")
    try:
        sample.build_sample_root(root)
        _say(f"demo: sample aufs root built at {root}")
        code = run(root, engine_pidfiles=[])
        if code == EXIT_OK:
            code = verify(root)
        report.status(root)
        return code
    finally:
        if keep:
            _say(f"demo: kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

