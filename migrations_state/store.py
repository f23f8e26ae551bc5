"""The durable store: the only place a state is written to the database.

SQLite runs in WAL mode with ``synchronous=FULL``: every committed transaction has its WAL frames fsynced
before ``commit()`` returns, so a state that was recorded survives a power cut (SQLite's documented
guarantee for WAL+FULL).  Each record method is one transaction; the checkpoint after it lets the
fault-injection tests crash right after a state became durable.
"""

from __future__ import annotations

import datetime
import os
from typing import Dict, Iterable, List, Optional

from sqlalchemy import create_engine, event, func, select, update
from sqlalchemy.exc import DatabaseError
from sqlalchemy.orm import Session, sessionmaker

from migrations_state.schema import (
    SCHEMA_VERSION,
    Base,
    ContainerRecord,
    FindingRecord,
    LayerRecord,
    RunRecord,
    SavedTimeRecord,
)


class StateDatabaseError(Exception):
    """The state database is missing a run, unreadable, or from another schema."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _on_connect(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.close()


def _checkpoint(label: str) -> None:
    from migrator import checkpoints  # the store is usable without the migrator package's side effects

    checkpoints.reached(label)


class Store:
    """Open (or create) the state database at ``path``."""

    def __init__(self, path: str, create: bool = False) -> None:
        self.path = path
        if not create and not os.path.exists(path):
            raise StateDatabaseError(f"no state database at {path}")
        self.engine = create_engine(f"sqlite:///{path}", future=True)
        event.listen(self.engine, "connect", _on_connect)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        try:
            if create:
                Base.metadata.create_all(self.engine)
                _fsync_dir(os.path.dirname(os.path.abspath(path)))
            else:
                with self._session() as s:
                    run = s.get(RunRecord, 1)
                if run is None:
                    raise StateDatabaseError(f"state database {path} holds no migration")
                if run.schema_version != SCHEMA_VERSION:
                    raise StateDatabaseError(
                        f"state database {path} has schema {run.schema_version}, this tool knows {SCHEMA_VERSION}")
        except DatabaseError as exc:
            self.engine.dispose()
            raise StateDatabaseError(f"state database {path} is unreadable: {exc.orig}") from exc

    def close(self) -> None:
        self.engine.dispose()

    def session(self) -> Session:
        return self._session()

    # -- creation ---------------------------------------------------------------------------------------

    def create_run(self, root: str, strategy: str, layers: Iterable[LayerRecord],
                   containers: Iterable[ContainerRecord], findings: Iterable[FindingRecord],
                   saved_times: Iterable[SavedTimeRecord] = ()) -> None:
        """Record a whole discovery in one transaction: either the run exists with all its layers, or not."""
        now = _now()
        with self._session.begin() as s:
            s.add(RunRecord(id=1, schema_version=SCHEMA_VERSION, phase="converting", strategy=strategy,
                            root=root, created_at=now, updated_at=now))
            s.add_all(list(layers))
            s.flush()
            s.add_all(list(containers))
            s.add_all(list(findings))
            s.add_all(list(saved_times))
        _checkpoint("recorded discovery")

    # -- reads ------------------------------------------------------------------------------------------

    def run(self) -> RunRecord:
        with self._session() as s:
            run = s.get(RunRecord, 1)
        if run is None:
            raise StateDatabaseError(f"state database {self.path} holds no migration")
        return run

    def layers(self) -> List[LayerRecord]:
        with self._session() as s:
            return list(s.scalars(select(LayerRecord).order_by(LayerRecord.seq)))

    def layer_states(self) -> Dict[str, int]:
        with self._session() as s:
            rows = s.execute(select(LayerRecord.state, func.count()).group_by(LayerRecord.state))
            return {state: n for state, n in rows}

    def containers(self) -> List[ContainerRecord]:
        with self._session() as s:
            return list(s.scalars(select(ContainerRecord).order_by(ContainerRecord.id)))

    def saved_times(self) -> List[SavedTimeRecord]:
        with self._session() as s:
            return list(s.scalars(select(SavedTimeRecord).order_by(SavedTimeRecord.path)))

    def findings(self) -> List[FindingRecord]:
        with self._session() as s:
            return list(s.scalars(select(FindingRecord).order_by(FindingRecord.id)))

    # -- state changes ----------------------------------------------------------------------------------

    def set_phase(self, phase: str, rollback_from: Optional[str] = None) -> None:
        values = {"phase": phase, "updated_at": _now(), "last_error": None}
        if rollback_from is not None:
            values["rollback_from"] = rollback_from
        with self._session.begin() as s:
            s.execute(update(RunRecord).where(RunRecord.id == 1).values(**values))
        _checkpoint(f"recorded phase {phase}")

    def set_image_staged(self, staged: bool) -> None:
        with self._session.begin() as s:
            s.execute(update(RunRecord).where(RunRecord.id == 1).values(image_staged=staged, updated_at=_now()))
        _checkpoint(f"recorded image_staged={staged}")

    def set_error(self, message: Optional[str]) -> None:
        with self._session.begin() as s:
            s.execute(update(RunRecord).where(RunRecord.id == 1).values(last_error=message, updated_at=_now()))

    def set_layer_state(self, layer_id: str, state: str, entries: Optional[int] = None,
                        findings: Iterable[FindingRecord] = ()) -> None:
        """One transaction per layer step: the new state and what the step found."""
        values = {"state": state, "error": None}
        if entries is not None:
            values["entries"] = entries
        with self._session.begin() as s:
            s.execute(update(LayerRecord).where(LayerRecord.id == layer_id).values(**values))
            s.add_all(list(findings))
            s.execute(update(RunRecord).where(RunRecord.id == 1).values(updated_at=_now()))
        _checkpoint(f"recorded layer {layer_id} {state}")

    def set_layer_error(self, layer_id: str, message: str) -> None:
        with self._session.begin() as s:
            s.execute(update(LayerRecord).where(LayerRecord.id == layer_id).values(error=message))

    def set_container_state(self, container_id: str, state: str) -> None:
        with self._session.begin() as s:
            s.execute(update(ContainerRecord).where(ContainerRecord.id == container_id).values(state=state))
        _checkpoint(f"recorded container {container_id} {state}")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
