"""The durable store: the only place a state is written to the database.

SQLite runs with a rollback journal (``journal_mode=DELETE``) and ``synchronous=EXTRA``: ``commit()`` returns
only after the journal and the database file have been fsynced and the journal's deletion (the commit point)
has been made durable by an fsync of its directory, so a recorded state survives a power cut; an interrupted
transaction is rolled back from its journal at the next open (SQLite's documented guarantees; ``FULL`` would
leave the deletion unsynced, and a cut right after a commit could roll that commit back).
WAL mode would need one fsync less per commit, but its shared-memory index is an mmap-ed file that SQLite
extends sparsely: on a full filesystem with 1 KiB blocks (mkfs.ext4's default below 512 MiB, common on device
data partitions) touching it raises SIGBUS instead of an error.  The rollback journal has no such file.

A new database is built under a temporary name (without per-statement syncs: only the finished file counts)
and fsynced, renamed into place, so ``state.db`` exists only complete.
Each record method is one transaction; the ``on_recorded`` hook after it (the migrator passes its checkpoint
counter) lets the fault-injection tests crash right after a state became durable.  Every SQLAlchemy error
leaves this module as a ``StateDatabaseError`` that names the database.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from sqlalchemy import Table, bindparam, create_engine, delete, event, func, insert, select, text, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from migrations_state.errors import StateDatabaseError, filesystem_hint
from migrations_state.machine import CONVERTING
from migrations_state.schema import (
    CHANGE,
    CHANGED_DIR,
    CONTAINER,
    FINDING,
    LAYER,
    RUN,
    SAVED_TIME,
    SCHEMA_VERSION,
    WHITEOUT_DIR,
    ChangedDirRecord,
    ChangeRecord,
    ContainerRecord,
    FindingRecord,
    LayerRecord,
    RunRecord,
    SavedTimeRecord,
    WhiteoutDirRecord,
    columns,
    metadata,
    record_of,
    values_of,
)

# What turns a database of an earlier schema into this one (each adds columns that start empty).
UPGRADES: Dict[int, Tuple[str, ...]] = {
    2: ("ALTER TABLE run ADD COLUMN cutover_seconds FLOAT", "ALTER TABLE layer ADD COLUMN proof_dirs BLOB",
        "ALTER TABLE layer ADD COLUMN proof VARCHAR(64)"),
}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _on_connect(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=DELETE")
    cur.execute("PRAGMA synchronous=EXTRA")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.close()


def _on_connect_building(dbapi_conn, _record) -> None:
    """A database being built under its temporary name needs no durability per statement: ``create`` fsyncs
    the whole file once before it renames it into place, and discards a partial one."""
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=MEMORY")
    cur.execute("PRAGMA synchronous=OFF")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


@dataclass
class LayerStep:
    """A layer step done and made durable, to record: the state it reached and what it found (the link step
    counts entries and lists the directories that hold whiteouts; the whiteout step may only find)."""

    layer_id: str
    state: str
    entries: Optional[int] = None
    findings: List[Tuple[str, str]] = field(default_factory=list)
    whiteout_dirs: List[bytes] = field(default_factory=list)
    seconds: float = 0.0  # how long the step took (for the progress log; not recorded)


@dataclass
class Journal:
    """An in-place layer's journal: every change to its aufs data, and the times of the directories they touch,
    recorded before any of them is made."""

    layer_id: str
    changes: List[ChangeRecord]
    dirs: List[ChangedDirRecord]
    findings: List[Tuple[str, str]] = field(default_factory=list)


def _no_hook(label: str) -> None:
    pass


class Store:
    """Open the state database at ``path`` (``Store.create`` makes a new one); ``on_recorded(label)`` is called
    after each durable change."""

    def __init__(self, path: str, on_recorded: Callable[[str], None] = _no_hook) -> None:
        self.path = path
        self._recorded = on_recorded
        if not os.path.exists(path):
            raise StateDatabaseError(f"no state database at {path}")
        self._open(path)
        try:
            with self.engine.connect() as c:  # the version alone: an earlier schema lacks columns of this one
                version = c.execute(select(RUN.c.schema_version).where(RUN.c.id == 1)).scalar()
            if version is None:
                raise StateDatabaseError(f"state database {path} holds no migration")
            if version in UPGRADES:
                self._upgrade(version)
            elif version != SCHEMA_VERSION:
                raise StateDatabaseError(
                    f"state database {path} has schema {version}, this tool knows {SCHEMA_VERSION}")
        except SQLAlchemyError as exc:
            self.engine.dispose()
            raise StateDatabaseError(f"state database {path} is unreadable: {_cause(exc)}"
                                     f"{filesystem_hint(path)}") from exc
        except StateDatabaseError:
            self.engine.dispose()
            raise

    def _upgrade(self, version: int) -> None:
        """A database of an earlier schema (a migration begun by the previous release) gains the new columns,
        empty, in one transaction: what it recorded keeps its meaning."""
        with self.engine.begin() as c:
            for statement in UPGRADES[version]:
                c.execute(text(statement))
            c.execute(update(RUN).where(RUN.c.id == 1).values(schema_version=SCHEMA_VERSION))
        self._recorded(f"upgraded the state database from schema {version}")

    def _open(self, path: str, building: bool = False) -> None:
        self.engine = create_engine(f"sqlite:///{path}", future=True)
        event.listen(self.engine, "connect", _on_connect_building if building else _on_connect)

    @classmethod
    def create(cls, path: str, root: str, strategy: str, layers: Iterable[LayerRecord],
               containers: Iterable[ContainerRecord], findings: Iterable[FindingRecord],
               saved_times: Iterable[SavedTimeRecord] = (), on_recorded: Callable[[str], None] = _no_hook,
               phase: str = CONVERTING, whiteout_dirs: Iterable[WhiteoutDirRecord] = ()) -> "Store":
        """Record a whole discovery: built as ``<path>.new`` in one transaction, fsynced, renamed into place.

        Either ``path`` holds the run with all its layers, or it does not exist; or, when it held a database
        (a staging run the cutover or a new ``stage`` replaces), it holds the old one or the new one whole.
        The caller has closed the old one after reading it under the lock, so no journal of it is left to
        apply to the new file (SQLite rolls a hot journal back on the first read).
        """
        tmp = path + ".new"
        for suffix in ("", "-journal"):
            if os.path.exists(tmp + suffix):
                os.unlink(tmp + suffix)
        builder = cls.__new__(cls)
        builder.path = tmp
        builder._open(tmp, building=True)
        now = _now()
        try:
            metadata.create_all(builder.engine)
            with builder.engine.begin() as c:
                _insert_all(c, RUN, [RunRecord(id=1, phase=phase, strategy=strategy, root=root, created_at=now,
                                               updated_at=now)])
                for table, rows in ((LAYER, layers), (CONTAINER, containers), (FINDING, findings),
                                    (SAVED_TIME, saved_times), (WHITEOUT_DIR, whiteout_dirs)):
                    _insert_all(c, table, rows)
        except SQLAlchemyError as exc:
            raise StateDatabaseError(f"state database {path} cannot be created: {_cause(exc)}"
                                     f"{filesystem_hint(path)}") from exc
        finally:
            builder.engine.dispose()
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
        on_recorded("recorded discovery")
        return cls(path, on_recorded)

    def close(self) -> None:
        self.engine.dispose()

    def release_connections(self) -> None:
        """Before a fork: no pooled SQLite connection may be shared with a child; the engine reconnects when next
        used."""
        self.engine.dispose()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """One durable transaction; a failure names the database and what the filesystem lacks."""
        try:
            with self.engine.begin() as c:
                yield c
        except SQLAlchemyError as exc:
            raise StateDatabaseError(f"state database {self.path}: {_cause(exc)}{filesystem_hint(self.path)}") from exc

    @contextlib.contextmanager
    def _reading(self) -> Iterator[Connection]:
        try:
            with self.engine.connect() as c:
                yield c
        except SQLAlchemyError as exc:
            raise StateDatabaseError(f"state database {self.path}: {_cause(exc)}{filesystem_hint(self.path)}") from exc

    # -- reads ------------------------------------------------------------------------------------------

    def run(self) -> RunRecord:
        with self._reading() as c:
            row = c.execute(select(*columns(RUN)).where(RUN.c.id == 1)).first()
        if row is None:
            raise StateDatabaseError(f"state database {self.path} holds no migration")
        return record_of(RunRecord, row)

    def layers(self) -> List[LayerRecord]:
        """Every layer's record in discovery order; without its proof's directories (``staged_proofs``)."""
        with self._reading() as c:
            return [record_of(LayerRecord, row)
                    for row in c.execute(select(*columns(LAYER, ("proof_dirs",))).order_by(LAYER.c.seq))]

    def layer_states(self) -> Dict[str, int]:
        with self._reading() as c:
            rows = c.execute(select(LAYER.c.state, func.count()).group_by(LAYER.c.state))
            return {state: n for state, n in rows}

    def layer_totals(self) -> Tuple[int, int]:
        """(layers, entries counted by their link steps), in one query."""
        with self._reading() as c:
            count, entries = c.execute(select(func.count(), func.coalesce(func.sum(LAYER.c.entries), 0))
                                       .select_from(LAYER)).one()
            return count, entries

    def containers(self) -> List[ContainerRecord]:
        with self._reading() as c:
            return [record_of(ContainerRecord, row)
                    for row in c.execute(select(*columns(CONTAINER)).order_by(CONTAINER.c.id))]

    def all_whiteout_dirs(self) -> Dict[str, List[bytes]]:
        """The directories holding whiteouts of every layer, by layer (one query for a whole wave)."""
        found: Dict[str, List[bytes]] = {}
        with self._reading() as c:
            for layer_id, path in c.execute(select(WHITEOUT_DIR.c.layer_id, WHITEOUT_DIR.c.path)
                                            .order_by(WHITEOUT_DIR.c.id)):
                found.setdefault(layer_id, []).append(path)
        return found

    def staged_proofs(self) -> Dict[str, Tuple[bytes, str]]:
        """The proof of each staged layer (its directories and their digest), by layer."""
        with self._reading() as c:
            rows = c.execute(select(LAYER.c.id, LAYER.c.proof_dirs, LAYER.c.proof).where(LAYER.c.proof.is_not(None)))
            return {layer_id: (dirs or b"", digest) for layer_id, dirs, digest in rows}

    def whiteout_dir_records(self, layer_ids: Iterable[str]) -> List[WhiteoutDirRecord]:
        """New rows of the whiteout directories of ``layer_ids`` (what a replacing database carries over)."""
        wanted = set(layer_ids)
        return [WhiteoutDirRecord(layer_id=layer_id, path=path)
                for layer_id, paths in self.all_whiteout_dirs().items() if layer_id in wanted for path in paths]

    def findings(self) -> List[FindingRecord]:
        with self._reading() as c:
            return [record_of(FindingRecord, row)
                    for row in c.execute(select(*columns(FINDING)).order_by(FINDING.c.id))]

    def saved_times(self) -> List[SavedTimeRecord]:
        with self._reading() as c:
            return [record_of(SavedTimeRecord, row)
                    for row in c.execute(select(*columns(SAVED_TIME)).order_by(SAVED_TIME.c.path))]

    def changes(self, layer_id: str) -> Tuple[List[ChangeRecord], List[ChangedDirRecord]]:
        with self._reading() as c:
            rows = [record_of(ChangeRecord, row) for row in c.execute(
                select(*columns(CHANGE)).where(CHANGE.c.layer_id == layer_id).order_by(CHANGE.c.seq))]
            dirs = [record_of(ChangedDirRecord, row) for row in c.execute(
                select(*columns(CHANGED_DIR)).where(CHANGED_DIR.c.layer_id == layer_id).order_by(CHANGED_DIR.c.id))]
        return rows, dirs

    def journaled_layers(self) -> List[str]:
        with self._reading() as c:
            return list(c.execute(select(CHANGE.c.layer_id).distinct()).scalars())

    # -- state changes ----------------------------------------------------------------------------------

    def set_phase(self, phase: str, rollback_from: Optional[str] = None) -> None:
        values = {"phase": phase, "updated_at": _now(), "last_error": None}
        if rollback_from is not None:
            values["rollback_from"] = rollback_from
        with self._transaction() as c:
            c.execute(update(RUN).where(RUN.c.id == 1).values(**values))
        self._recorded(f"recorded phase {phase}")

    def keep_as_record(self) -> None:
        """After cleanup: keep only what says what happened (the run with its times and strategy, each layer
        and container with its state, the findings); the journals, the kept configs and the saved times only
        served a rollback, which cleanup has made impossible.  Then the file is compacted."""
        with self._transaction() as c:
            for table in (CHANGE, CHANGED_DIR, WHITEOUT_DIR, SAVED_TIME):
                c.execute(delete(table))
            c.execute(update(CONTAINER).values(original=None))
        self._recorded("recorded the migration's record")
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("VACUUM")
        except SQLAlchemyError as exc:
            raise StateDatabaseError(f"state database {self.path}: {_cause(exc)}{filesystem_hint(self.path)}") from exc

    def set_image_copied(self, copied: bool) -> None:
        with self._transaction() as c:
            c.execute(update(RUN).where(RUN.c.id == 1).values(image_copied=copied, updated_at=_now()))
        self._recorded(f"recorded image_copied={copied}")

    def set_cutover_seconds(self, seconds: float) -> None:
        with self._transaction() as c:
            c.execute(update(RUN).where(RUN.c.id == 1).values(cutover_seconds=seconds, updated_at=_now()))
        self._recorded("recorded the cutover time")

    def set_error(self, message: Optional[str]) -> None:
        with self._transaction() as c:
            c.execute(update(RUN).where(RUN.c.id == 1).values(last_error=message, updated_at=_now()))

    def set_layer_states(self, steps: List[LayerStep]) -> None:
        """A wave of layer steps, made durable by the caller, in one transaction: each layer's new state and
        what its step found."""
        if not steps:
            return
        counted = [{"layer": st.layer_id, "new_state": st.state, "counted": st.entries}
                   for st in steps if st.entries is not None]
        others = [{"layer": st.layer_id, "new_state": st.state} for st in steps if st.entries is None]
        with self._transaction() as c:
            for statement, rows in ((_SET_STATE_COUNTED, counted), (_SET_STATE, others)):
                if rows:  # one executemany per set of columns
                    c.execute(statement, rows)
            findings = [{"layer_id": st.layer_id, "kind": k, "detail": d} for st in steps for k, d in st.findings]
            if findings:
                c.execute(insert(FINDING), findings)
            dirs = [{"layer_id": st.layer_id, "path": p} for st in steps for p in st.whiteout_dirs]
            if dirs:
                c.execute(insert(WHITEOUT_DIR), dirs)
            c.execute(update(RUN).where(RUN.c.id == 1).values(updated_at=_now()))
        self._recorded(f"recorded layers {steps[0].state}")

    def record_journals(self, journals: List[Journal]) -> None:
        """In-place journals in one transaction, before any of their changes is made."""
        with self._transaction() as c:
            _insert_all(c, CHANGE, [change for journal in journals for change in journal.changes])
            _insert_all(c, CHANGED_DIR, [d for journal in journals for d in journal.dirs])
            _insert_all(c, FINDING, [FindingRecord(layer_id=journal.layer_id, kind=k, detail=d)
                                     for journal in journals for k, d in journal.findings])
        self._recorded(f"recorded journals of {len(journals)} layer(s)")

    def set_layer_error(self, layer_id: str, message: str) -> None:
        with self._transaction() as c:
            c.execute(update(LAYER).where(LAYER.c.id == layer_id).values(error=message))

    def set_container_state(self, container_id: str, state: str) -> None:
        with self._transaction() as c:
            c.execute(update(CONTAINER).where(CONTAINER.c.id == container_id).values(state=state))
        self._recorded(f"recorded container {container_id} {state}")


# A wave's layer states, by primary key: one executemany each (bound names differ from the columns' keys, as
# SQLAlchemy requires of an UPDATE's bound parameters).
_SET_STATE = update(LAYER).where(LAYER.c.id == bindparam("layer")).values(state=bindparam("new_state"), error=None)
_SET_STATE_COUNTED = _SET_STATE.values(entries=bindparam("counted"))


def _insert_all(c: Connection, table: Table, rows: Iterable[object]) -> None:
    """``rows`` (new records of ``table``) as one INSERT executed for many rows (one statement compiled)."""
    values = [values_of(row) for row in rows]
    if values:
        c.execute(insert(table), values)


def _cause(exc: SQLAlchemyError) -> str:
    return str(getattr(exc, "orig", None) or exc)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
