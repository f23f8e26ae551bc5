"""Errors the operator sees as one line, and the exit codes they map to (documented in docs/operations.md)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1        # the run stopped on an error; fix the cause and run again (it resumes)
EXIT_USAGE = 2         # bad command line
EXIT_REFUSED = 3       # refused before changing anything (running engine, bad input, wrong phase)
EXIT_LOCKED = 4        # another aufs2overlay holds the lock on this root
EXIT_IN_PROGRESS = 5   # status: a migration or rollback is under way (run or rollback to finish it)
EXIT_ROLLED_BACK = 6   # status: the last migration was rolled back
EXIT_STATE_LOST = 7    # status: no state database, but the root holds a migration's trees


class MigratorError(Exception):
    """An error with a message meant for the operator and the exit code to leave with."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, exit_code: "int | None" = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class Refused(MigratorError):
    """Refused before anything was changed."""

    exit_code = EXIT_REFUSED


class Locked(MigratorError):
    exit_code = EXIT_LOCKED
