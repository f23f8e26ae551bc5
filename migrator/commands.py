"""One function per command.  The CLI only parses arguments and calls these; each returns the exit code.

A command that changes the root reads its state without the lock (to refuse early, before anything is
written), then takes the lock and reads it again (``runtime/lock.py``): only what it reads under the lock
decides what it does.  What decides, and what does it, is ``runtime/``: admission and the start of a
migration (``start.py``), its loops (``migration.py``), staging, and rollback without state.

What only one command uses is imported inside it (the sample root, the content check, verify's checks): every
command pays for its own imports, and ``run``'s start-up is only what it needs.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from typing import Optional

from migrations_state.machine import FINISHED
from migrator import procs
from migrator.checks import engine
from migrator.checks import plan as planner
from migrator.errors import EXIT_OK, EXIT_REFUSED, EXIT_USAGE, MigratorError, Refused
from migrator.formats import aufs, snapshot
from migrator.options import Options
from migrator.paths import Paths
from migrator.runtime import lock, recovery, staging, start
from migrator.runtime.migration import Migration
from migrator.scan.prescan import EarlyWalk
from migrator.ui import report
from migrator.ui.progress import Reporter


def _say(msg: str) -> None:
    print(msg, flush=True)


def _paths(opts: Options) -> Paths:
    return Paths.checked(opts.root, opts.state_db)


def plan(opts: Options) -> int:
    """Say what run would do and whether it can: exit 0 for yes, 3 for no; nothing is changed."""
    paths = _paths(opts)
    recorded = lock.peek_run(paths)
    if not start.is_fresh(recorded):
        _say(f"a migration of {paths.root} is already {recorded.phase} (strategy {recorded.strategy}); "
             "see 'aufs2overlay status'")
        return EXIT_OK
    snap = snapshot.read_root(paths)
    if snap.nothing_to_migrate():
        _say(f"nothing to migrate: {paths.root} has no aufs/")
        return EXIT_OK
    result = start.plan_root(paths, opts, snap)
    if start.is_staged(recorded):
        result.staged = staging.counts_of(paths)
    if opts.content and result.discovery is not None:
        from migrator.checks import contentcheck

        checked, seconds = contentcheck.check(paths, "aufs", opts.jobs, _terminal_progress())
        result.add_content(checked, contentcheck.summary(checked, seconds), contentcheck.lines(checked, seconds))
    if opts.as_json:
        print(json.dumps(result.summary(), indent=2, sort_keys=True))
    else:
        _say(planner.render(result))
    return EXIT_OK if result.verdict else EXIT_REFUSED


def stage(opts: Options) -> int:
    """With the engine running, convert the image layers it has committed into the staging area; resumable."""
    paths = _paths(opts)
    with Reporter(opts.quiet, opts.log_file) as progress:
        staging.refuse_unless_stageable(lock.peek_run(paths), paths)
        if not os.path.isdir(paths.aufs_diff) or os.path.islink(paths.aufs_diff):
            _say(f"nothing to stage: {paths.root} has no aufs/diff/ directory")
            return EXIT_OK
        if opts.nice:
            progress(f"priority: {procs.lower_priority()}")
        with lock.locked_store(paths) as held:
            done = staging.stage(paths, held, progress, opts.jobs)
    _say(f"staged: {done} of {aufs.count_layers(paths.aufs_diff)} layers (the rest, containers' layers and layers "
         "not yet committed, at the cutover: stop the engine, then 'aufs2overlay run')")
    return EXIT_OK


def run(opts: Options, early: Optional[EarlyWalk] = None) -> int:
    """Start or resume the migration (the cutover of a staged root); exit 0 only once it has completed."""
    paths = _paths(opts)
    with Reporter(opts.quiet, opts.log_file) as progress:
        admitted = start.admit(paths, opts, progress, lock.peek_run(paths), early)  # a refusal writes nothing
        if admitted.done is None:
            with lock.locked_store(paths) as held:
                admitted = start.under_lock(paths, opts, held, progress, admitted)
                if admitted.done is None:
                    migration = Migration.under(paths, held, progress, opts.jobs, admitted.surveys)
                    admitted.done = migration.run_to_completion(resumed=not admitted.fresh)
    _say(admitted.done)
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
        if not start.is_staged(recorded):  # a staging is not the engine's: it may run while the staging goes
            engine.refuse_if_running(paths.root, opts.engine_pidfiles)
        with lock.locked_store(paths) as held:
            done = Migration.under(paths, held, progress).roll_back(opts.force, start.is_staged(recorded),
                                                                    opts.engine_pidfiles)
    _say(done)
    return EXIT_OK


def _rollback_without_state(paths: Paths, opts: Options, progress: Reporter, problem: Optional[str]) -> int:
    """No usable state database: with --force, rebuild the aufs root from what is on disk."""
    done = recovery.refuse_or_nothing(paths, opts.force, problem)
    if done is None:
        engine.refuse_if_running(paths.root, opts.engine_pidfiles)
        with lock.root_lock(paths):
            recovery.rollback_without_state(paths, progress)
        done = (f"rolled back from disk: {paths.root} is on aufs (directory times could not be restored without the "
                "state database)")
    _say(done)
    return EXIT_OK


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
            Migration.under(paths, held, progress).clean_up().close()
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
