"""One function per command.  The CLI only parses arguments and calls these; each returns the exit code.

A command that changes the root reads its state without the lock (to refuse early, before anything is
written), then takes the lock and reads it again (``runtime/lock.py``): only what it reads under the lock
decides what it does.

What only one command uses is imported inside it (the sample root, the content proof, verify's checks): every
command pays for its own imports, and ``run``'s start-up is only what it needs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from typing import Dict, Iterator, Optional

from migrations_state.machine import (
    CLEANED,
    CLEANING,
    COMMITTED,
    COMPLETED,
    CONVERTING,
    FINISHED,
    ROLLBACK_FORCED,
    ROLLED_BACK,
    ROLLING_BACK,
    STAGING,
    SWITCHING,
)
from migrations_state.schema import RunRecord
from migrations_state.store import Store
from migrator import procs
from migrator.checks import engine
from migrator.checks import plan as planner
from migrator.errors import EXIT_OK, EXIT_REFUSED, EXIT_USAGE, MigratorError, Refused
from migrator.formats import aufs, engineconfig, snapshot
from migrator.fs import fsio
from migrator.options import Options
from migrator.paths import Paths
from migrator.runtime import lock, recovery, staging, start
from migrator.runtime.lock import Held
from migrator.runtime.migration import Migration
from migrator.scan.prescan import EarlyWalk
from migrator.scan.survey import LayerSurvey
from migrator.strategies import registry
from migrator.strategies.base import Conversion
from migrator.ui import report
from migrator.ui.progress import Reporter


def _say(msg: str) -> None:
    print(msg, flush=True)


def _fresh(run: Optional[RunRecord]) -> bool:
    """Whether ``run`` would start a new migration (none recorded, the last one rolled back, or only staged:
    the cutover plans the root as it is now)."""
    return run is None or run.phase in (ROLLED_BACK, STAGING)


def _staged(run: Optional[RunRecord]) -> bool:
    return run is not None and run.phase == STAGING


def _paths(opts: Options) -> Paths:
    return Paths.checked(opts.root, opts.state_db)


def plan(opts: Options) -> int:
    """Say what run would do and whether it can: exit 0 for yes, 3 for no; nothing is changed."""
    paths = _paths(opts)
    recorded = lock.peek_run(paths)
    if not _fresh(recorded):
        _say(f"a migration of {paths.root} is already {recorded.phase} (strategy {recorded.strategy}); "
             "see 'aufs2overlay status'")
        return EXIT_OK
    snap = snapshot.read_root(paths.root)
    if snap.nothing_to_migrate():
        _say(f"nothing to migrate: {paths.root} has no aufs/")
        return EXIT_OK
    result = planner.make_plan(paths, opts, snap=snap)
    if _staged(recorded):
        result.staged = _staged_counts(paths)
    if opts.content and result.discovery is not None:
        from migrator.checks import contentcheck

        proofs, seconds = contentcheck.check(paths, "aufs", opts.jobs, _terminal_progress())
        result.add_content(proofs, contentcheck.summary(proofs, seconds), contentcheck.lines(proofs, seconds))
    if opts.as_json:
        print(json.dumps(result.summary(), indent=2, sort_keys=True))
    else:
        _say(planner.render(result))
    return EXIT_OK if result.verdict else EXIT_REFUSED


def _staged_counts(paths: Paths) -> Dict[str, int]:
    """How many layers ``stage`` has staged, of how many it holds."""
    store = lock.open_store(paths)
    try:
        staged, held = staging.counts(store) if store is not None else (0, 0)
    finally:
        if store is not None:
            store.close()
    return {"staged": staged, "layers": held}


def stage(opts: Options) -> int:
    """With the engine running, convert the image layers it has committed into the staging area; resumable."""
    paths = _paths(opts)
    with Reporter(opts.quiet, opts.log_file) as progress:
        _refuse_unless_stageable(lock.peek_run(paths), paths)
        if not os.path.isdir(paths.aufs_diff) or os.path.islink(paths.aufs_diff):
            _say(f"nothing to stage: {paths.root} has no aufs/diff/ directory")
            return EXIT_OK
        if opts.nice:
            progress(f"priority: {procs.lower_priority()}")
        with lock.locked_store(paths) as held:
            _refuse_unless_stageable(held.store.run() if held.store is not None else None, paths)
            try:
                staging.stage(paths, held, progress, opts.jobs)
            except OSError as exc:
                if held.store is not None:
                    held.store.set_error(str(exc))
                raise MigratorError(f"{exc}; fix the cause and run 'aufs2overlay stage' again: it resumes") from exc
            done, _in_staging = staging.counts(held.store)
    _say(f"staged: {done} of {aufs.count_layers(paths.aufs_diff)} layers (the rest, containers' layers and layers "
         "not yet committed, at the cutover: stop the engine, then 'aufs2overlay run')")
    return EXIT_OK


def _refuse_unless_stageable(recorded: Optional[RunRecord], paths: Paths) -> None:
    if recorded is not None and recorded.phase not in (STAGING, ROLLED_BACK):
        raise Refused(f"a migration of {paths.root} is already {recorded.phase}: stage only comes before it "
                      "('aufs2overlay status' says what to do)")


def run(opts: Options, early: Optional[EarlyWalk] = None) -> int:
    """Start or resume the migration (the cutover of a staged root); exit 0 only once it has completed."""
    paths = _paths(opts)
    if opts.strategy is not None and opts.strategy not in registry.NAMES:
        raise MigratorError(f"unknown strategy {opts.strategy!r}; choose one of {', '.join(registry.NAMES)}",
                            EXIT_USAGE)
    with Reporter(opts.quiet, opts.log_file) as progress:
        recorded = lock.peek_run(paths)
        if opts.skip_if_rolled_back and recorded is not None and recorded.phase == ROLLED_BACK:
            _say(f"the last migration of {paths.root} was rolled back; not migrating again "
                 "(--skip-if-rolled-back: run 'aufs2overlay run' by hand to migrate)")
            return EXIT_OK
        snap = snapshot.read_root(paths.root) if recorded is None or _staged(recorded) else None
        if snap is not None and snap.nothing_to_migrate():
            _say(f"nothing to migrate: {paths.root} has no aufs/")
            return EXIT_OK
        _refuse_mixed_strategy(recorded, opts.strategy)
        engine.refuse_if_running(paths.root, opts.engine_pidfiles)

        def checked_plan(snap: Optional[snapshot.RootSnapshot] = None) -> planner.Plan:
            return start.checked_plan(paths, opts, progress, early, snap)

        new_plan = checked_plan(snap) if _fresh(recorded) else None  # before the lock: a refusal writes nothing
        with lock.locked_store(paths) as held:
            recorded = held.store.run() if held.store is not None else None
            _refuse_mixed_strategy(recorded, opts.strategy)
            surveys: Dict[str, LayerSurvey] = {}
            resumed = not _fresh(recorded)
            if not resumed:
                new_plan = new_plan or checked_plan()  # rolled back by another command meanwhile
                staged = None
                if held.store is not None:
                    if _staged(recorded):
                        staged = staging.for_cutover(paths, held.store, new_plan.discovery, progress)
                    held.store.close()
                held.store = start.begin(paths, new_plan, progress, opts.engine_config, staged)
                surveys = new_plan.surveys
            else:
                _refuse_other_engine_config(paths, opts.engine_config)
            return _drive_run(paths, held, progress, opts.jobs, surveys, resumed)


def _refuse_mixed_strategy(recorded: Optional[RunRecord], strategy: Optional[str]) -> None:
    """A migration resumes with the strategy it started with: the two leave different things half-done; a
    staged root's cutover is the hardlink strategy's."""
    if _staged(recorded) and strategy not in (None, staging.STRATEGY):
        raise Refused(f"this root is staged for the {staging.STRATEGY} strategy; run the cutover with no "
                      "--strategy, or discard the staged work first with 'aufs2overlay rollback'")
    if _fresh(recorded) or strategy is None or recorded.strategy == strategy:
        return
    raise Refused(f"this migration was started with --strategy {recorded.strategy} and is {recorded.phase}; resume "
                  f"it with --strategy {recorded.strategy} (or no --strategy), or roll it back first")


def _refuse_other_engine_config(paths: Paths, engine_config: Optional[str]) -> None:
    managed = engineconfig.managed_path(paths)
    if engine_config and os.path.abspath(engine_config) != managed:
        raise Refused(f"this migration started with --set-engine-config {managed or '(none)'}; resume it "
                      "with the same (or no) --set-engine-config, or roll it back first")


@contextlib.contextmanager
def _migration(paths: Paths, held: Held, progress: Reporter, resume: str, jobs: int = 1,
               surveys: Optional[Dict[str, LayerSurvey]] = None) -> Iterator[Migration]:
    """The migration under the lock, for ``run``, ``rollback`` and ``cleanup`` alike: an error of the
    filesystem is recorded as the run's last error (what ``status`` shows), then reported as one line that
    ends with ``resume``, how to go on."""
    store = _held_store(held, paths)
    try:
        yield Migration(Conversion(paths, store, progress, jobs, held.lock_fd, surveys or {}))
    except OSError as exc:
        store.set_error(str(exc))
        raise MigratorError(f"{exc}; {resume}") from exc


def _drive_run(paths: Paths, held: Held, progress: Reporter, jobs: int, surveys: Dict[str, LayerSurvey],
               resumed: bool = False) -> int:
    phase = _held_store(held, paths).run().phase
    if phase in FINISHED:
        _say(f"migration of {paths.root} already {phase}")
        return EXIT_OK
    if phase == ROLLING_BACK:
        raise Refused("a rollback is in progress on this root; finish it with 'aufs2overlay rollback'")
    if resumed:
        states = _held_store(held, paths).layer_states()
        progress(f"resuming the migration ({phase}): {states.get(COMMITTED, 0)} of {sum(states.values())} "
                 "layers committed")
    with _migration(paths, held, progress, "fix the cause and run again: the migration resumes where it stopped",
                    jobs, surveys) as migration:
        if migration.state == CONVERTING:
            migration.convert_layers()
            if not migration.start_switching():
                raise MigratorError("not every layer reached 'committed'; see 'aufs2overlay status'")
        if migration.state == SWITCHING:
            migration.finish_switching()
    layers = held.store.layers()
    cutover = procs.seconds_since_start()
    held.store.set_cutover_seconds(cutover)
    progress(f"done in {progress.elapsed():.1f}s: {len(layers)} layers, {sum(r.entries for r in layers)} entries")
    _say(f"migration of {paths.root} completed: {len(layers)} layers now in overlay2/ "
         f"(cutover: {cutover:.2f} s from this command's start)")
    return EXIT_OK


def rollback(opts: Options) -> int:
    """Undo the migration: the aufs root as it was, every container config byte for byte."""
    paths = _paths(opts)
    with Reporter(opts.quiet, opts.log_file) as progress:
        try:
            recorded = lock.peek_run(paths)
        except MigratorError as exc:
            return _rollback_without_state(paths, opts, progress, str(exc))
        if recorded is None:
            return _rollback_without_state(paths, opts, progress, None)
        if not _staged(recorded):  # a staging is not the engine's: it may run while the staging goes
            engine.refuse_if_running(paths.root, opts.engine_pidfiles)
        with lock.locked_store(paths) as held:
            phase = _held_store(held, paths).run().phase
            if phase != STAGING and _staged(recorded):  # the cutover began meanwhile
                engine.refuse_if_running(paths.root, opts.engine_pidfiles)
            if phase == ROLLED_BACK:
                _say(f"migration of {paths.root} already rolled back")
                return EXIT_OK
            if phase in (CLEANING, CLEANED):
                raise Refused("the aufs data has been removed by cleanup; there is nothing to roll back to")
            if phase in ROLLBACK_FORCED and not opts.force:
                raise Refused("the migration completed; rolling back loses everything the engine did on overlay2 "
                              "since. Use --force to roll back anyway")
            with _migration(paths, held, progress, "fix the cause and run rollback again: it resumes") as migration:
                missing = migration.missing_layers()
                if missing:
                    raise Refused(f"{len(missing)} layer(s) moved in place are gone (e.g. {missing[0]}: removed by "
                                  "the engine since the migration); a rollback cannot give back their aufs data")
                if migration.may_start_rollback():
                    migration.start_rollback()
                migration.finish_rollback()
    _say(f"rolled back: {paths.root} is on aufs as before the migration")
    return EXIT_OK


def _rollback_without_state(paths: Paths, opts: Options, progress: Reporter, problem: Optional[str]) -> int:
    """No usable state database: with --force, rebuild the aufs root from what is on disk."""
    if not fsio.lexists(paths.aufs):
        _say(f"nothing to roll back: {paths.root} has no aufs/")
        return EXIT_OK
    if problem is None and not recovery.leftovers(paths):
        _say(f"nothing to roll back: no migration state at {paths.state_db} and no overlay2 tree")
        return EXIT_OK
    if not opts.force:
        raise Refused(f"{problem or 'no state database at ' + paths.state_db}; "
                      "'aufs2overlay rollback --force' rebuilds the aufs root from what is on disk")
    engine.refuse_if_running(paths.root, opts.engine_pidfiles)
    with lock.root_lock(paths):
        recovery.rollback_without_state(paths, progress)
    _say(f"rolled back from disk: {paths.root} is on aufs (directory times could not be restored without the "
         "state database)")
    return EXIT_OK


def _held_store(held: Held, paths: Paths) -> Store:
    if held.store is None:
        raise MigratorError(f"the state database {paths.state_db} went away while waiting for the lock; run again")
    return held.store


def cleanup(opts: Options) -> int:
    """After completion: remove aufs/ and image/aufs/, then the migrator's own state."""
    paths = _paths(opts)
    with Reporter(opts.quiet, opts.log_file) as progress:
        recorded = lock.peek_run(paths)
        if recorded is None:
            raise Refused(f"no migration state at {paths.state_db}; cleanup only follows a completed run")
        if recorded.phase not in FINISHED:
            raise Refused(f"the migration is {recorded.phase}, not completed; cleanup would destroy the only copy")
        engine.refuse_if_running(paths.root, opts.engine_pidfiles)
        with lock.locked_store(paths) as held:
            with _migration(paths, held, progress, "run cleanup again: it resumes") as migration:
                if migration.state == COMPLETED:
                    migration.start_cleanup()
                if migration.may_finish_cleanup():
                    migration.finish_cleanup()
            held.store.keep_as_record()
            held.store.close()
            held.store = None
            recovery.remove_work_area(paths, keep=(paths.state_db,))
    _say(f"cleaned: {paths.root} now holds only the overlay2 driver's data (and the migration's record, "
         f"{paths.state_db}: 'aufs2overlay status' reads it)")
    return EXIT_OK


def _terminal_progress() -> Reporter:
    """A bar on a terminal, nothing otherwise: these commands print their results on standard output."""
    return Reporter(quiet=not sys.stderr.isatty())


def verify(opts: Options) -> int:
    """Check the migrated tree: structure of every layer, no aufs residue, and each chain mounts; or, with
    ``--content``, every image layer's bytes against its digest (no state database needed)."""
    from migrator.checks import contentcheck
    from migrator.checks import verify as verifier

    paths = _paths(opts)
    if opts.content:
        return contentcheck.verify_overlay2(paths, opts.as_json, opts.jobs, _terminal_progress())
    if opts.as_json:
        raise MigratorError("--json goes with --content", EXIT_USAGE)
    store = lock.open_store(paths)
    if store is None:
        raise Refused(f"no migration state at {paths.state_db}")
    try:
        with Reporter() as progress:  # a bar on a terminal, a line every 10 s otherwise: on standard error
            problems = verifier.verify(paths, store, progress)
    finally:
        store.close()
    for problem in problems:
        print(f"problem: {problem}")
    if problems:
        print(f"verify: {len(problems)} problem(s)")
        return 1
    print("verify: ok")
    return EXIT_OK


def demo(opts: Options) -> int:
    """Build a sample aufs root in a temporary folder, migrate it, verify it and show its status."""
    from migrator import sample

    if os.geteuid() != 0:
        raise MigratorError("demo needs root (it creates device nodes, trusted.* xattrs and mounts)", EXIT_USAGE)
    workdir = tempfile.mkdtemp(prefix="aufs2overlay-demo-")
    root = os.path.join(workdir, "docker")
    try:
        sample.build_sample_root(root)
        _say(f"demo: sample aufs root built at {root}")
        code = run(Options(root=root, engine_pidfiles=[]))
        if code == EXIT_OK:
            code = verify(Options(root=root))
        report.status(root)
        return code
    finally:
        if opts.keep:
            _say(f"demo: kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
