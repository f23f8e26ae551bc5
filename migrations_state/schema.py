"""SQLAlchemy schema of the state database.

One ``run`` row (the migration as a whole), one ``layer`` row per directory of ``aufs/diff/``, one
``container`` row per container, and ``finding`` rows for what the migrator saw and reports (aufs internals
dropped, garbage layers skipped, links that had to become copies).  Nothing else is the truth about how far a
migration got: the in-memory state machines are rebuilt from these rows on every start.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from sqlalchemy import ForeignKey, Integer, LargeBinary, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from migrations_state.machine import DISCOVERED

SCHEMA_VERSION = 3  # 3: staging (the layer's proof, the run's cutover time); a 2 is upgraded on open


class Base(DeclarativeBase):
    pass


class RunRecord(Base):
    __tablename__ = "run"

    id: Mapped[int] = mapped_column(primary_key=True)
    schema_version: Mapped[int] = mapped_column(Integer, default=SCHEMA_VERSION)
    phase: Mapped[str] = mapped_column(String(32))
    strategy: Mapped[str] = mapped_column(String(16))
    root: Mapped[str] = mapped_column(Text)
    created_at: Mapped[str] = mapped_column(String(40))
    updated_at: Mapped[str] = mapped_column(String(40))
    # The image store's copy (``image/overlay2.temp/``) is complete (the column keeps its first name).
    image_copied: Mapped[bool] = mapped_column("image_staged", default=False)
    rollback_from: Mapped[Optional[str]] = mapped_column(String(32), nullable=True)
    last_error: Mapped[Optional[str]] = mapped_column(Text, nullable=True)
    # Seconds from the start of the ``run`` that completed the migration to its completion: the engine's
    # downtime when the layers were staged before (``stage``), the whole conversion otherwise.
    cutover_seconds: Mapped[Optional[float]] = mapped_column(nullable=True)


class LayerRecord(Base):
    __tablename__ = "layer"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, index=True)
    parent: Mapped[Optional[str]] = mapped_column(String(200), nullable=True)
    # Ancestors nearest first, "\n"-joined, exactly as aufs/layers/<id> lists them.
    ancestors: Mapped[str] = mapped_column(Text, default="")
    link_id: Mapped[str] = mapped_column(String(26), unique=True)
    has_child: Mapped[bool] = mapped_column(default=False)
    # A container's writable layer: overlay2 writes into it in place, so its files are copied, not hardlinked
    # (a write through a hardlink would change the aufs data that rollback must return).
    writable: Mapped[bool] = mapped_column(default=False)
    state: Mapped[str] = mapped_column(String(32), index=True)
    # Times of aufs/diff/<id> at discovery: the in-place strategy moves that directory and gives them back.
    atime_ns: Mapped[int] = mapped_column(Integer, default=0)
    mtime_ns: Mapped[int] = mapped_column(Integer, default=0)
    entries: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[Optional[str]] = mapped_column(Text, nullable=True)
    # A layer staged while the engine ran (``stage``): the aufs directories it is linked from, NUL-separated
    # relative paths in walk order, and the digest of their inodes and ctimes taken before any was linked
    # (``scan/proof.py``); the cutover keeps the staged layer only if the digest still holds.  Deferred: only
    # the cutover reads them.
    proof_dirs: Mapped[Optional[bytes]] = mapped_column(LargeBinary, nullable=True, deferred=True)
    proof: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)

    @classmethod
    def discovered(cls, layer_id: str, seq: int, ancestors: Sequence[str], link_id: str, has_child: bool,
                   writable: bool, times: Tuple[int, int], **more: object) -> "LayerRecord":
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


class ContainerRecord(Base):
    __tablename__ = "container"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    state: Mapped[str] = mapped_column(String(16))
    # The config.v2.json exactly as found, with its metadata, so rollback restores it byte for byte.
    original: Mapped[Optional[bytes]] = mapped_column(LargeBinary, nullable=True)
    mode: Mapped[int] = mapped_column(Integer, default=0o600)
    uid: Mapped[int] = mapped_column(Integer, default=0)
    gid: Mapped[int] = mapped_column(Integer, default=0)
    atime_ns: Mapped[int] = mapped_column(Integer, default=0)
    mtime_ns: Mapped[int] = mapped_column(Integer, default=0)
    note: Mapped[Optional[str]] = mapped_column(Text, nullable=True)


class WhiteoutDirRecord(Base):
    """A directory of a layer that holds aufs whiteouts or an opaque marker, found by the link step and recorded
    with the ``linked`` state, so the whiteout step visits only these directories (and can resume)."""

    __tablename__ = "whiteout_dir"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    layer_id: Mapped[str] = mapped_column(ForeignKey("layer.id"), index=True)
    path: Mapped[bytes] = mapped_column(LargeBinary)  # relative to the layer's root, b"" for the root itself


class ChangeRecord(Base):
    """In-place strategy: one change to what was aufs data, journaled before it is made (``inplace.Change``)."""

    __tablename__ = "change"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    layer_id: Mapped[str] = mapped_column(ForeignKey("layer.id"), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    dir: Mapped[bytes] = mapped_column(LargeBinary)
    name: Mapped[Optional[bytes]] = mapped_column(LargeBinary, nullable=True)
    action: Mapped[str] = mapped_column(String(16))
    target: Mapped[Optional[bytes]] = mapped_column(LargeBinary, nullable=True)
    stash: Mapped[Optional[str]] = mapped_column(String(20), nullable=True)
    kind: Mapped[int] = mapped_column(Integer, default=0)
    mode: Mapped[int] = mapped_column(Integer, default=0)
    uid: Mapped[int] = mapped_column(Integer, default=0)
    gid: Mapped[int] = mapped_column(Integer, default=0)
    atime_ns: Mapped[int] = mapped_column(Integer, default=0)
    mtime_ns: Mapped[int] = mapped_column(Integer, default=0)
    xattr_before: Mapped[Optional[bytes]] = mapped_column(LargeBinary, nullable=True)
    xattrs: Mapped[Optional[bytes]] = mapped_column(LargeBinary, nullable=True)


class ChangedDirRecord(Base):
    """In-place strategy: the times of a directory the journaled changes touch, as they were before."""

    __tablename__ = "changed_dir"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    layer_id: Mapped[str] = mapped_column(ForeignKey("layer.id"), index=True)
    dir: Mapped[bytes] = mapped_column(LargeBinary)
    atime_ns: Mapped[int] = mapped_column(Integer)
    mtime_ns: Mapped[int] = mapped_column(Integer)


class SavedTimeRecord(Base):
    """Times of directories the run changes entries in (ROOT, image/, containers/<id>/), for an exact rollback."""

    __tablename__ = "saved_time"

    path: Mapped[str] = mapped_column(Text, primary_key=True)  # relative to the engine root; "." is the root
    atime_ns: Mapped[int] = mapped_column(Integer)
    mtime_ns: Mapped[int] = mapped_column(Integer)


class FindingRecord(Base):
    __tablename__ = "finding"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    layer_id: Mapped[Optional[str]] = mapped_column(ForeignKey("layer.id"), nullable=True)
    kind: Mapped[str] = mapped_column(String(40))
    detail: Mapped[str] = mapped_column(Text)
