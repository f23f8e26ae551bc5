"""Command line: parse arguments, call the command, turn errors into one line and an exit code."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Dict, List, Optional

from migrations_state.errors import StateDatabaseError
from migrator import checkpoints, frozen, interrupts, procs
from migrator.errors import EXIT_FAILED, EXIT_USAGE, MigratorError
from migrator.fs import fsio
from migrator.options import DEFAULT_ROOT, Options
from migrator.strategies import registry
from migrator.ui import report

if TYPE_CHECKING:
    from migrator.scan.prescan import EarlyWalk



_COMMAND_PARSERS: Dict[str, argparse.ArgumentParser] = {}  # each command's parser, for its own usage line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aufs2overlay",
        description="Migrate a Docker or balena-engine root from aufs to overlay2, resumably and reversibly.")
    parser.add_argument("--version", action="version", version=frozen.version())
    sub = parser.add_subparsers(dest="command", required=True)
    _COMMAND_PARSERS.clear()

    def add(name: str, help_text: str, engine_check: bool = True, progress: bool = True) -> argparse.ArgumentParser:
        p = _COMMAND_PARSERS[name] = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--root", default=DEFAULT_ROOT, help=f"engine data root (default {DEFAULT_ROOT})")
        p.add_argument("--state-db", default=None,
                       help="state database (default ROOT/.aufs2overlay/state.db)")
        if engine_check:
            p.add_argument("--engine-pidfile", action="append", default=None, metavar="PATH", dest="engine_pidfiles",
                           help="engine pidfile to check for a running engine (repeatable; replaces the "
                                "defaults /var/run/docker.pid, /var/run/balena-engine.pid, ...)")
        if engine_check and progress:
            p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
            p.add_argument("--log-file", metavar="PATH", default=None,
                           help="append every step, with timestamps, to PATH (kept after a failure)")
        return p

    def add_accept_missing(p: argparse.ArgumentParser) -> None:
        p.add_argument("--accept-missing-storage", action="store_true",
                       help="migrate what is there although layers or image metadata that the root names are "
                            "missing (without it, such a root is refused: a filesystem that did not mount, a "
                            "partial restore); every missing piece is recorded as a finding")

    def add_strategy(p: argparse.ArgumentParser) -> None:
        p.add_argument("-j", "--jobs", type=int, default=procs.DEFAULT_JOBS, metavar="N",
                       help=f"layers walked or converted at once (default {procs.DEFAULT_JOBS}: the cores, at "
                            "least 2, at most 4)")
        p.add_argument("--strategy", choices=registry.NAMES, default=None,
                       help="hardlink (default for a new migration): build overlay2 beside the untouched aufs "
                            "data; inplace: move each layer into overlay2 and convert it there, journaling every "
                            "change (for full disks and huge roots). A migration resumes with the strategy it "
                            "started with")

    p = add("plan", "say what run would do and whether it can (exit 0 yes, 3 no); changes nothing", progress=False)
    add_strategy(p)
    add_accept_missing(p)
    p.add_argument("--content", action="store_true",
                   help="also check every image layer on aufs against its digest (a damaged one makes the verdict "
                        "no)")
    p.add_argument("--json", action="store_true", dest="as_json",
                   help="one JSON object (schema in docs/operations.md)")
    p = add("run", "start or resume the migration (exit 0 only when completed)")
    add_strategy(p)
    add_accept_missing(p)
    p.add_argument("--set-engine-config", metavar="PATH", default=None, dest="engine_config",
                   help="also set \"storage-driver\": \"overlay2\" in this daemon.json when the migration "
                        "completes (atomically; rollback puts the file back as it was)")
    p.add_argument("--skip-if-rolled-back", action="store_true",
                   help="exit 0 without migrating when the last migration of the root was rolled back (the boot "
                        "unit's choice: an operator's rollback stands until someone runs 'run' by hand)")
    p = add("stage", "with the engine running, convert the image layers it has committed, so that the cutover "
                     "('run', engine stopped) is short; resumable, and safe to repeat", engine_check=False)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.add_argument("--log-file", metavar="PATH", default=None,
                   help="append every step, with timestamps, to PATH (kept after a failure)")
    p.add_argument("-j", "--jobs", type=int, default=procs.DEFAULT_JOBS, metavar="N",
                   help=f"layers converted at once (default {procs.DEFAULT_JOBS})")
    p.add_argument("--nice", action=argparse.BooleanOptionalAction, default=True,
                   help="run at nice 19 in the idle I/O class, so the engine's applications keep the disk and "
                        "the cores (default; --no-nice keeps the caller's priority)")
    p = add("status", "show the phase, the layers by state, and what to do next", engine_check=False)
    p.add_argument("--json", action="store_true", dest="as_json",
                   help="one JSON object (schema in docs/operations.md)")
    p = add("rollback", "undo the migration and return the aufs root to its exact starting state")
    p.add_argument("--force", action="store_true", help="roll back even after completion")
    add("cleanup", "after completion, remove aufs/ and image/aufs/ (no rollback afterwards)")
    p = add("verify", "check the migrated overlay2 tree", engine_check=False)
    p.add_argument("--content", action="store_true",
                   help="instead, check every image layer's bytes against its digest, reassembled from its "
                        "tar-split and overlay2/ (no engine, no state database needed; works after cleanup)")
    p.add_argument("--json", action="store_true", dest="as_json",
                   help="with --content: one JSON object (docs/operations.md)")
    p.add_argument("-j", "--jobs", type=int, default=procs.DEFAULT_JOBS, metavar="N",
                   help=f"with --content: layers read at once (default {procs.DEFAULT_JOBS})")
    p = _COMMAND_PARSERS["demo"] = sub.add_parser("demo", help="migrate a built-in sample root in a temporary folder",
                       description="Build a sample aufs root (two images, a container, aufs debris) in a "
                                   "temporary folder, migrate it, verify it and show its status. Needs root.")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    return parser


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:500] + "; fix the cause and run the same command again"


def _start_walkers(opts: Options) -> "EarlyWalk | None":
    """A new run of a strategy that starts from a walk of every layer: walk them while SQLAlchemy is imported
    (``migrator/scan/prescan.py``)."""
    from migrator.paths import Paths
    from migrator.scan import prescan

    paths = Paths.for_root(opts.root, opts.state_db)
    if registry.walks_first(opts.strategy) and opts.jobs >= 1 and not os.path.exists(paths.state_db) \
            and os.path.isdir(paths.aufs_diff):
        return prescan.start(paths.aufs_diff, opts.jobs)
    return None


def _refuse_bad_files(opts: Options) -> None:
    """``--state-db`` and ``--log-file`` name a file in a folder that exists: a typo must not create folders
    (and a state database nobody will find again), nor can a folder be the file."""
    for option, path in (("--state-db", opts.state_db), ("--log-file", opts.log_file)):
        if path is None:
            continue
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise MigratorError(f"{option} {path}: the folder {parent} does not exist", EXIT_USAGE)
        if os.path.isdir(path):
            raise MigratorError(f"{option} {path} is a folder; name a file", EXIT_USAGE)


def entry() -> None:
    """The console script: ``main``, then exit without the interpreter's teardown of the modules it imported
    (60 ms of every command, for SQLAlchemy alone): every file this tool writes is closed and made durable
    before ``main`` returns, so only the standard streams are left to flush."""
    frozen.restore_host_environment()
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the command's own usage, not the top-level one
        _COMMAND_PARSERS[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    opts = Options.from_args(args)
    fsio.raise_fd_limit()  # walks hold two descriptors per level of a layer's depth
    interrupts.install()
    try:
        _refuse_bad_files(opts)
        if args.command == "status":
            return report.status(opts.root, opts.state_db, opts.as_json)
        checkpoints.arm(os.environ)
        early = _start_walkers(opts) if args.command == "run" else None
        from migrator import commands  # the machinery; status answers without importing it

        checkpoints.started(os.environ)

        if opts.jobs < 1:
            raise MigratorError("--jobs must be at least 1", EXIT_USAGE)
        if args.command == "run":
            return commands.run(opts, early)
        return getattr(commands, args.command)(opts)
    except MigratorError as exc:
        print(f"aufs2overlay: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (OSError, StateDatabaseError) as exc:
        print(f"aufs2overlay: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except interrupts.Stopped as exc:
        print(f"aufs2overlay: stopped by {exc.args[0]} at a safe point; run the same command again to resume",
              file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("aufs2overlay: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    entry()
