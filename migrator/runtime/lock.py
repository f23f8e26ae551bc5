"""The root's lock and the state database behind it: one migrator (or rollback, or cleanup) per root."""

from __future__ import annotations

import contextlib
import fcntl
import os
from typing import Iterator, Optional

from migrations_state.errors import StateDatabaseError
from migrations_state.schema import RunRecord
from migrations_state.store import Store
from migrator import checkpoints
from migrator.errors import Locked, MigratorError
from migrator.fs import fsio
from migrator.paths import Paths


@contextlib.contextmanager
def root_lock(paths: Paths) -> Iterator[int]:
    """An exclusive flock under ROOT (its descriptor is yielded: worker processes close it, so the lock ends
    with the migrator).  Creating the work area leaves ROOT's own times as they were, so a rollback can
    return ROOT exactly."""
    if not fsio.lexists(paths.workdir):
        st = os.lstat(paths.root)
        os.mkdir(paths.workdir, 0o700)
        os.utime(paths.root, ns=(st.st_atime_ns, st.st_mtime_ns))
        fsio.fsync_path(paths.root)
    fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Locked(f"another aufs2overlay is working on {paths.root} (lock {paths.lock})") from None
        yield fd
    finally:
        os.close(fd)


def open_store(paths: Paths) -> Optional[Store]:
    """The state database, or None when there is none; an unusable one is an error that names the way out."""
    if not os.path.exists(paths.state_db):
        return None
    try:
        return Store(paths.state_db, checkpoints.reached)
    except StateDatabaseError as exc:
        raise MigratorError(f"{exc}; 'aufs2overlay rollback --force' restores aufs without it") from None


def peek_run(paths: Paths) -> Optional[RunRecord]:
    """The run as recorded, read without the lock (what to refuse, and whether to plan, before taking it)."""
    store = open_store(paths)
    if store is None:
        return None
    try:
        return store.run()
    finally:
        store.close()


class Held:
    """The lock's descriptor and the store opened under it (``store`` may be replaced, e.g. by a new run's)."""

    def __init__(self, lock_fd: int, store: Optional[Store]) -> None:
        self.lock_fd = lock_fd
        self.store = store


@contextlib.contextmanager
def locked_store(paths: Paths) -> Iterator[Held]:
    """Take the root's lock, then open the store under it (what was read before the lock may have changed);
    both are released on the way out."""
    with root_lock(paths) as fd:
        held = Held(fd, open_store(paths))
        try:
            yield held
        finally:
            if held.store is not None:
                held.store.close()


def remove_state_db(path: str) -> None:
    """The database and every file SQLite or ``Store.create`` may have left beside it, durably."""
    for suffix in ("", "-wal", "-shm", "-journal", ".new", ".new-journal"):
        try:
            os.unlink(path + suffix)
        except FileNotFoundError:
            pass
    fsio.fsync_path(os.path.dirname(path))
