"""The state database's tables (SQLAlchemy Core) and the records the store reads and writes.

One ``run`` row (the migration as a whole), one ``layer`` row per directory of ``aufs/diff/``, one
``container`` row per container, and ``finding`` rows for what the migrator saw and reports (aufs internals
dropped, garbage layers skipped, links that had to become copies).  Nothing else is the truth about how far a
migration got: the in-memory state machines are rebuilt from these rows on every start.

Why Core and plain dataclasses, not the ORM: the store writes and reads thousands of layer rows at once, where
an ORM object each cost more than the statement (a cutover's 6,000 layer objects: 0.25 s of a 1.4 s cutover);
and importing the ORM and mapping these classes was 0.08 s of every command's start-up.  The tables are the
same, column for column, as the mapped classes of schema 3 declared (``tests/test_waves_and_store.py`` checks
the DDL), so every database an earlier release wrote reads unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, TypeVar

from sqlalchemy import (
    Boolean,
    Column,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from migrations_state.machine import DISCOVERED

SCHEMA_VERSION = 3  # 3: staging (the layer's proof, the run's cutover time); a 2 is upgraded on open

metadata = MetaData()

RUN = Table(
    "run", metadata,
    Column("id", Integer, primary_key=True),
    Column("schema_version", Integer, nullable=False, default=SCHEMA_VERSION),
    Column("phase", String(32), nullable=False),
    Column("strategy", String(16), nullable=False),
    Column("root", Text, nullable=False),
    Column("created_at", String(40), nullable=False),
    Column("updated_at", String(40), nullable=False),
    # The image store's copy (``image/overlay2.temp/``) is complete (the column keeps its first name).
    Column("image_staged", Boolean, key="image_copied", nullable=False, default=False),
    Column("rollback_from", String(32)),
    Column("last_error", Text),
    # Seconds from the start of the ``run`` that completed the migration to its completion: the engine's
    # downtime when the layers were staged before (``stage``), the whole conversion otherwise.
    Column("cutover_seconds", Double),
)

LAYER = Table(
    "layer", metadata,
    Column("id", String(200), primary_key=True),
    Column("seq", Integer, nullable=False),
    Column("parent", String(200)),
    # Ancestors nearest first, "\n"-joined, exactly as aufs/layers/<id> lists them.
    Column("ancestors", Text, nullable=False, default=""),
    Column("link_id", String(26), nullable=False),
    Column("has_child", Boolean, nullable=False, default=False),
    # A container's writable layer: overlay2 writes into it in place, so its files are copied, not hardlinked
    # (a write through a hardlink would change the aufs data that rollback must return).
    Column("writable", Boolean, nullable=False, default=False),
    Column("state", String(32), nullable=False),
    # Times of aufs/diff/<id> at discovery: the in-place strategy moves that directory and gives them back.
    Column("atime_ns", Integer, nullable=False, default=0),
    Column("mtime_ns", Integer, nullable=False, default=0),
    Column("entries", Integer, nullable=False, default=0),
    Column("error", Text),
    # A layer staged while the engine ran (``stage``): the aufs directories it is linked from, NUL-separated
    # relative paths in walk order, and the digest of their inodes and ctimes taken before any was linked
    # (``scan/proof.py``); the cutover keeps the staged layer only if the digest still holds.  Read only by
    # ``Store.staged_proofs`` (the cutover's), not with the layer's record.
    Column("proof_dirs", LargeBinary),
    Column("proof", String(64)),
    UniqueConstraint("link_id"),
    Index("ix_layer_seq", "seq"),
    Index("ix_layer_state", "state"),
)

CONTAINER = Table(
    "container", metadata,
    Column("id", String(200), primary_key=True),
    Column("state", String(16), nullable=False),
    # The config.v2.json exactly as found, with its metadata, so rollback restores it byte for byte.
    Column("original", LargeBinary),
    Column("mode", Integer, nullable=False, default=0o600),
    Column("uid", Integer, nullable=False, default=0),
    Column("gid", Integer, nullable=False, default=0),
    Column("atime_ns", Integer, nullable=False, default=0),
    Column("mtime_ns", Integer, nullable=False, default=0),
    Column("note", Text),
)

# A directory of a layer that holds aufs whiteouts or an opaque marker, found by the link step and recorded with
# the ``linked`` state, so the whiteout step visits only these directories (and can resume).
WHITEOUT_DIR = Table(
    "whiteout_dir", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("layer_id", String(200), ForeignKey("layer.id"), nullable=False),
    Column("path", LargeBinary, nullable=False),  # relative to the layer's root, b"" for the root itself
    Index("ix_whiteout_dir_layer_id", "layer_id"),
)

# In-place strategy: one change to what was aufs data, journaled before it is made (``inplace.Change``).
CHANGE = Table(
    "change", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("layer_id", String(200), ForeignKey("layer.id"), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("dir", LargeBinary, nullable=False),
    Column("name", LargeBinary),
    Column("action", String(16), nullable=False),
    Column("target", LargeBinary),
    Column("stash", String(20)),
    Column("kind", Integer, nullable=False, default=0),
    Column("mode", Integer, nullable=False, default=0),
    Column("uid", Integer, nullable=False, default=0),
    Column("gid", Integer, nullable=False, default=0),
    Column("atime_ns", Integer, nullable=False, default=0),
    Column("mtime_ns", Integer, nullable=False, default=0),
    Column("xattr_before", LargeBinary),
    Column("xattrs", LargeBinary),
    Index("ix_change_layer_id", "layer_id"),
)

# In-place strategy: the times of a directory the journaled changes touch, as they were before.
CHANGED_DIR = Table(
    "changed_dir", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("layer_id", String(200), ForeignKey("layer.id"), nullable=False),
    Column("dir", LargeBinary, nullable=False),
    Column("atime_ns", Integer, nullable=False),
    Column("mtime_ns", Integer, nullable=False),
    Index("ix_changed_dir_layer_id", "layer_id"),
)

# Times of directories the run changes entries in (ROOT, image/, containers/<id>/), for an exact rollback.
SAVED_TIME = Table(
    "saved_time", metadata,
    Column("path", Text, primary_key=True),  # relative to the engine root; "." is the root
    Column("atime_ns", Integer, nullable=False),
    Column("mtime_ns", Integer, nullable=False),
)

FINDING = Table(
    "finding", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("layer_id", String(200), ForeignKey("layer.id")),
    Column("kind", String(40), nullable=False),
    Column("detail", Text, nullable=False),
)


# -- records: one dataclass per table, its fields the table's column keys ------------------------------------


@dataclass
class RunRecord:
    id: int
    phase: str
    strategy: str
    root: str
    created_at: str
    updated_at: str
    schema_version: int = SCHEMA_VERSION
    image_copied: bool = False
    rollback_from: Optional[str] = None
    last_error: Optional[str] = None
    cutover_seconds: Optional[float] = None


@dataclass
class LayerRecord:
    id: str
    seq: int
    link_id: str
    state: str
    parent: Optional[str] = None
    ancestors: str = ""
    has_child: bool = False
    writable: bool = False
    atime_ns: int = 0
    mtime_ns: int = 0
    entries: int = 0
    error: Optional[str] = None
    proof_dirs: Optional[bytes] = None  # not read back with the record (``Store.staged_proofs`` reads it)
    proof: Optional[str] = None

    @classmethod
    def discovered(cls, layer_id: str, seq: int, ancestors: Sequence[str], link_id: str, has_child: bool,
                   writable: bool, times: Tuple[int, int], **more: Any) -> "LayerRecord":
        """A layer's row as discovery (or ``stage``) first records it: state ``discovered``."""
        return cls(id=layer_id, seq=seq, parent=ancestors[0] if ancestors else None,
                   ancestors=encode_ancestors(ancestors), link_id=link_id, has_child=has_child, writable=writable,
                   atime_ns=times[0], mtime_ns=times[1], state=DISCOVERED, **more)

    @property
    def ancestor_ids(self) -> List[str]:
        """The ancestors, nearest first (``ancestors`` as stored, decoded: ``encode_ancestors``)."""
        return self.ancestors.split("\n") if self.ancestors else []


def encode_ancestors(ancestors: Sequence[str]) -> str:
    """``LayerRecord.ancestors`` as stored: nearest first, one per line, as ``aufs/layers/<id>`` lists them."""
    return "\n".join(ancestors)


@dataclass
class ContainerRecord:
    id: str
    state: str
    original: Optional[bytes] = None
    mode: int = 0o600
    uid: int = 0
    gid: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    note: Optional[str] = None


@dataclass
class WhiteoutDirRecord:
    layer_id: str
    path: bytes
    id: Optional[int] = None  # given by the database


@dataclass
class ChangeRecord:
    layer_id: str
    seq: int
    dir: bytes
    action: str
    name: Optional[bytes] = None
    target: Optional[bytes] = None
    stash: Optional[str] = None
    kind: int = 0
    mode: int = 0
    uid: int = 0
    gid: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    xattr_before: Optional[bytes] = None
    xattrs: Optional[bytes] = None
    id: Optional[int] = None


@dataclass
class ChangedDirRecord:
    layer_id: str
    dir: bytes
    atime_ns: int
    mtime_ns: int
    id: Optional[int] = None


@dataclass
class SavedTimeRecord:
    path: str
    atime_ns: int
    mtime_ns: int


@dataclass
class FindingRecord:
    layer_id: Optional[str]
    kind: str
    detail: str
    id: Optional[int] = None


R = TypeVar("R")

TABLE_OF: Dict[type, Table] = {RunRecord: RUN, LayerRecord: LAYER, ContainerRecord: CONTAINER,
                               WhiteoutDirRecord: WHITEOUT_DIR, ChangeRecord: CHANGE, ChangedDirRecord: CHANGED_DIR,
                               SavedTimeRecord: SAVED_TIME, FindingRecord: FINDING}


def values_of(record: object) -> Dict[str, Any]:
    """A record's column values by key, for an INSERT (an id the database gives left out)."""
    values = dict(vars(record))
    if values.get("id", 0) is None:
        del values["id"]
    return values


def record_of(kind: Type[R], row: Any) -> R:
    """A record of ``kind`` from a result row selected with ``columns`` (keys, not names)."""
    return kind(**row._mapping)


def columns(table: Table, leave_out: Tuple[str, ...] = ()) -> List[Any]:
    """The table's columns labelled by their keys (``run.image_staged`` reads as ``image_copied``)."""
    return [c.label(c.key) for c in table.c if c.key not in leave_out]
