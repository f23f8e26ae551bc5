"""One function per command.  The CLI only parses arguments and calls these; each returns the exit code."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from typing import Optional, Sequence

from migrations_state.errors import StateDatabaseError
from migrations_state.machine import ROLLBACK_FORCED, ROLLBACK_FREE
from migrations_state.store import Store
from migrator import consistency, contentcheck, engine, engineconfig, fsio, recovery, report, sample
from migrator import plan as planner
from migrator import verify as verifier
from migrator.errors import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_USAGE,
    MigratorError,
    Refused,
)
from migrator.progress import Reporter
from migrator.runtime import (
    Migration,
    Paths,
    default_progress,
    dirs_whose_times_change,
    discovered_records,
    root_lock,
)

STRATEGIES = planner.STRATEGIES
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


def _pidfiles(pidfiles: Optional[Sequence[str]]) -> Sequence[str]:
    return pidfiles if pidfiles is not None else engine.DEFAULT_PIDFILES


def _refuse_running_engine(paths: Paths, pidfiles: Optional[Sequence[str]]) -> None:
    signs = engine.running_engine(paths.root, _pidfiles(pidfiles))
    if signs:
        raise Refused(f"an engine is using {paths.root} ({signs[0]}); stop it first")


def _remove_state_db(path: str) -> None:
    for suffix in ("", "-wal", "-shm", "-journal", ".new", ".new-journal"):
        try:
            os.unlink(path + suffix)
        except FileNotFoundError:
            pass
    fsio.fsync_path(os.path.dirname(path))


def _checked_plan(paths: Paths, strategy: str, pidfiles: Optional[Sequence[str]], jobs: int,
                  progress, engine_config: Optional[str], accept_missing_storage: bool) -> planner.Plan:
    """The plan of a new run; refused (before anything is written) when its verdict is no."""
    if engine_config:
        engineconfig.check(engine_config)
    progress(f"planning: reading {paths.aufs_diff}")
    plan = planner.make_plan(paths, strategy, _pidfiles(pidfiles), jobs, walk=False,
                             accept_missing_storage=accept_missing_storage)
    if not plan.verdict:
        more = f" (and {len(plan.problems) - 1} more)" if len(plan.problems) > 1 else ""
        raise Refused(f"{plan.problems[0]}{more}; 'aufs2overlay plan' shows every check")
    needs = "needs about" if plan.walked else "needs at most"
    progress(f"plan: {plan.layers} layers, {plan.containers} containers; {needs} {plan.need_inodes} inodes and "
             f"{planner.mib(plan.need_bytes)}, {plan.free_inodes} inodes and {planner.mib(plan.free_bytes)} free")
    return plan


def _start(paths: Paths, plan: planner.Plan, progress, engine_config: Optional[str]) -> Store:
    discovery, found = plan.discovery, plan.found
    findings = plan.recorded_findings()
    times = dirs_whose_times_change(paths.root, [c.id for c in found if c.state == "pending"])
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
    if engine_config:
        engineconfig.keep_original(paths, engine_config)
    else:
        engineconfig.forget(paths)
    os.makedirs(os.path.dirname(paths.state_db), mode=0o700, exist_ok=True)
    _remove_state_db(paths.state_db)
    layers, container_rows, finding_rows = discovered_records(discovery.layers, discovery.parents, found, findings)
    store = Store.create(paths.state_db, paths.root, plan.strategy, layers, container_rows, finding_rows, times)
    progress(f"discovered {len(layers)} layers, {sum(c.state == 'pending' for c in found)} containers on aufs; "
             f"strategy {plan.strategy}")
    return store


def plan(root: str, state_db: Optional[str] = None, strategy: Optional[str] = None,
         engine_pidfiles: Optional[Sequence[str]] = None, as_json: bool = False, jobs: int = DEFAULT_JOBS,
         accept_missing_storage: bool = False, content_check: bool = False) -> int:
    """Say what run would do and whether it can: exit 0 for yes, 3 for no; nothing is changed."""
    paths = _paths(root, state_db)
    store = _open_store(paths)
    if store is not None:
        run_record = store.run()
        store.close()
        if run_record.phase != "rolled-back":
            _say(f"a migration of {paths.root} is already {run_record.phase} (strategy {run_record.strategy}); "
                 "see 'aufs2overlay status'")
            return EXIT_OK
    if consistency.nothing_to_migrate(paths):
        _say(f"nothing to migrate: {paths.root} has no aufs/")
        return EXIT_OK
    result = planner.make_plan(paths, strategy or DEFAULT_STRATEGY, _pidfiles(engine_pidfiles), jobs,
                               accept_missing_storage=accept_missing_storage)
    if content_check and result.discovery is not None:
        proofs, seconds = contentcheck.check(paths, "aufs", jobs, _terminal_progress())
        result.add_content(proofs, contentcheck.summary(proofs, seconds), contentcheck.lines(proofs, seconds))
    if as_json:
        print(json.dumps(result.summary(), indent=2, sort_keys=True))
    else:
        _say(planner.render(result))
    return EXIT_OK if result.verdict else EXIT_REFUSED


def run(root: str, state_db: Optional[str] = None, engine_pidfiles: Optional[Sequence[str]] = None,
        quiet: bool = False, jobs: int = DEFAULT_JOBS, strategy: Optional[str] = None,
        log_file: Optional[str] = None, engine_config: Optional[str] = None,
        accept_missing_storage: bool = False) -> int:
    """Start or resume the migration; exit 0 only once it has completed."""
    with default_progress(quiet, log_file) as progress:
        return _run(root, state_db, engine_pidfiles, jobs, strategy, progress, engine_config,
                    accept_missing_storage)


def _run(root: str, state_db: Optional[str], engine_pidfiles: Optional[Sequence[str]], jobs: int,
         strategy: Optional[str], progress, engine_config: Optional[str], accept_missing_storage: bool) -> int:
    paths = _paths(root, state_db)
    if strategy is not None and strategy not in STRATEGIES:
        raise MigratorError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}", EXIT_USAGE)
    store = _open_store(paths)
    if store is None and consistency.nothing_to_migrate(paths):
        _say(f"nothing to migrate: {paths.root} has no aufs/")
        return EXIT_OK
    _refuse_mixed_strategy(store, strategy)
    _refuse_running_engine(paths, engine_pidfiles)
    fresh = store is None or store.run().phase == "rolled-back"
    if fresh:
        plan = _checked_plan(paths, strategy or DEFAULT_STRATEGY, engine_pidfiles, jobs, progress, engine_config,
                             accept_missing_storage)
    with root_lock(paths):
        if store is not None:
            store.close()
        store = _open_store(paths)
        _refuse_mixed_strategy(store, strategy)
        if store is None or store.run().phase == "rolled-back":
            if not fresh:
                plan = _checked_plan(paths, strategy or DEFAULT_STRATEGY, engine_pidfiles, jobs, progress,
                                     engine_config, accept_missing_storage)
            if store is not None:
                store.close()
            store = _start(paths, plan, progress, engine_config)
            surveys = plan.surveys
        else:
            surveys = {}
            managed = engineconfig.managed_path(paths)
            if engine_config and os.path.abspath(engine_config) != managed:
                store.close()
                raise Refused(f"this migration started with --set-engine-config {managed or '(none)'}; resume it "
                              "with the same (or no) --set-engine-config, or roll it back first")
        try:
            return _drive_run(paths, store, progress, jobs, surveys)
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


def _drive_run(paths: Paths, store: Store, progress, jobs: int, surveys: dict) -> int:
    phase = store.run().phase
    if phase in ("completed", "cleaning", "cleaned"):
        _say(f"migration of {paths.root} already {phase}")
        return EXIT_OK
    if phase == "rolling-back":
        raise Refused("a rollback is in progress on this root; finish it with 'aufs2overlay rollback'")
    migration = Migration(paths, store, progress, surveys)
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
    layers = store.layers()
    elapsed = time.monotonic() - progress.started
    progress(f"done in {elapsed:.1f}s: {len(layers)} layers, {sum(r.entries for r in layers)} entries")
    _say(f"migration of {paths.root} completed: {len(layers)} layers now in overlay2/")
    return EXIT_OK


def rollback(root: str, state_db: Optional[str] = None, force: bool = False,
             engine_pidfiles: Optional[Sequence[str]] = None, quiet: bool = False,
             log_file: Optional[str] = None) -> int:
    """Undo the migration: the aufs root as it was, every container config byte for byte."""
    with default_progress(quiet, log_file) as progress:
        return _rollback(root, state_db, force, engine_pidfiles, progress)


def _rollback(root: str, state_db: Optional[str], force: bool, engine_pidfiles: Optional[Sequence[str]],
              progress) -> int:
    paths = _paths(root, state_db)
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
            quiet: bool = False, log_file: Optional[str] = None) -> int:
    """After completion: remove aufs/ and image/aufs/, then the migrator's own state."""
    with default_progress(quiet, log_file) as progress:
        return _cleanup(root, state_db, engine_pidfiles, progress)


def _cleanup(root: str, state_db: Optional[str], engine_pidfiles: Optional[Sequence[str]], progress) -> int:
    paths = _paths(root, state_db)
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


def _terminal_progress() -> Reporter:
    """A bar on a terminal, nothing otherwise: these commands print their results on standard output."""
    return Reporter(quiet=not sys.stderr.isatty())


def verify(root: str, state_db: Optional[str] = None, content_check: bool = False, as_json: bool = False,
           jobs: int = DEFAULT_JOBS) -> int:
    """Check the migrated tree: structure of every layer, no aufs residue, and each chain mounts; or, with
    ``content_check``, every image layer's bytes against its digest (no state database needed)."""
    paths = _paths(root, state_db)
    if content_check:
        return _verify_content(paths, as_json, jobs)
    if as_json:
        raise MigratorError("--json goes with --content", EXIT_USAGE)
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


def _verify_content(paths: Paths, as_json: bool, jobs: int) -> int:
    if not fsio.lexists(paths.image_overlay2):
        raise Refused(f"{paths.root} has no image/overlay2/: nothing is migrated yet ('aufs2overlay plan --content' "
                      "checks the layers on aufs)")
    proofs, seconds = contentcheck.check(paths, "overlay2", jobs, _terminal_progress())
    if as_json:
        print(json.dumps({"root": paths.root, "side": "overlay2", **contentcheck.summary(proofs, seconds)},
                         indent=2, sort_keys=True))
    else:
        print("\n".join(contentcheck.lines(proofs, seconds)))
    return EXIT_FAILED if any(p.status == "failed" for p in proofs) else EXIT_OK


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

