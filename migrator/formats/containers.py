"""Containers' ``config.v2.json``: find the ones on aufs, switch their ``Driver``, and put them back.

The file is edited as bytes: only the top-level ``"Driver"`` value changes, every other byte (key order,
number spelling, escapes) stays, unlike a round trip through a JSON library.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from json.decoder import scanstring
from typing import Callable, Dict, List, Mapping, Optional, Tuple

from migrations_state.machine import PENDING, SKIPPED
from migrator.errors import Refused
from migrator.fs import fsio

CONFIG = "config.v2.json"
CONFIG_MAX = 64 << 20
AUFS_DRIVER_VALUES = ("aufs", "")  # dockerd 20.10 reads an empty Driver as aufs
_WS = re.compile(r"[ \t\n\r]*")


@dataclass
class FoundContainer:
    id: str
    original: Optional[bytes]
    st: Optional[os.stat_result]
    state: str  # pending (to switch) or skipped
    note: Optional[str] = None


def locate_driver(text: str) -> Tuple[str, int, int]:
    """The top-level ``Driver`` value and its span in ``text`` (the last one wins, as in Go's decoder)."""
    decoder = json.JSONDecoder()
    i = _WS.match(text, 0).end()
    if text[i:i + 1] != "{":
        raise ValueError("not a JSON object")
    i = _WS.match(text, i + 1).end()
    found = None
    if text[i:i + 1] == "}":
        raise ValueError("no Driver key")
    while True:
        if text[i:i + 1] != '"':
            raise ValueError(f"expected a key at offset {i}")
        key, i = scanstring(text, i + 1)
        i = _WS.match(text, i).end()
        if text[i:i + 1] != ":":
            raise ValueError(f"expected ':' at offset {i}")
        i = _WS.match(text, i + 1).end()
        start = i
        value, i = decoder.raw_decode(text, i)
        if key == "Driver":
            found = (value, start, i)
        i = _WS.match(text, i).end()
        if text[i:i + 1] == ",":
            i = _WS.match(text, i + 1).end()
            continue
        if text[i:i + 1] == "}":
            break
        raise ValueError(f"expected ',' or '}}' at offset {i}")
    if _WS.match(text, i + 1).end() != len(text):
        raise ValueError("trailing data after the object")
    if found is None:
        raise ValueError("no Driver key")
    if not isinstance(found[0], str):
        raise ValueError("Driver is not a string")
    return found


def with_driver(data: bytes, driver: str) -> bytes:
    text = data.decode("utf-8")
    _value, start, end = locate_driver(text)
    return (text[:start] + json.dumps(driver) + text[end:]).encode("utf-8")


def read_config(path: str, dir_fd: Optional[int] = None) -> Tuple[bytes, os.stat_result]:
    return fsio.read_small(path, CONFIG_MAX, dir_fd=dir_fd)


@dataclass(frozen=True)
class ContainerFacts:
    """``containers/<id>/`` as read once (``read_containers``)."""

    id: str
    is_dir: bool
    config: Optional[bytes] = None  # None: no config.v2.json (or not a directory)
    st: Optional[os.stat_result] = None
    driver: Optional[str] = None  # the top-level Driver; None when there is no readable config
    problem: str = ""  # why the config is unreadable
    dead: bool = False  # marked dead or being removed: its removal had begun

    @property
    def on_aufs(self) -> bool:
        return self.driver in AUFS_DRIVER_VALUES


def read_containers(root_fd: int, unreadable: List[Tuple[str, str]]) -> Dict[str, ContainerFacts]:
    """Every ``containers/<id>/`` of the root open as ``root_fd``, its config read through ``fsio.read_small``;
    a config that is not a small regular file is also added to ``unreadable`` (its path, why)."""
    base, _state = fsio.open_dir_found("containers", root_fd)
    if base is None:
        return {}
    found = {}
    try:
        for cid in sorted(os.listdir(base)):
            fd, state = fsio.open_dir_found(cid, base)
            if fd is None:
                if state == fsio.NOT_A_DIRECTORY:
                    found[cid] = ContainerFacts(cid, False)
                continue
            try:
                found[cid] = _read_container(cid, fd, unreadable)
            finally:
                os.close(fd)
    finally:
        os.close(base)
    return found


def _read_container(cid: str, fd: int, unreadable: List[Tuple[str, str]]) -> ContainerFacts:
    try:
        data, st = read_config(CONFIG, fd)
    except FileNotFoundError:
        return ContainerFacts(cid, True)
    except fsio.NotSmallFile as exc:
        unreadable.append((f"containers/{cid}/{CONFIG}", str(exc)))
        return ContainerFacts(cid, True, problem=str(exc))
    try:
        driver = locate_driver(data.decode("utf-8"))[0]
    except ValueError as exc:  # UnicodeDecodeError is one
        return ContainerFacts(cid, True, data, st, problem=str(exc))
    return ContainerFacts(cid, True, data, st, driver, dead=_dead(data))


def _dead(data: bytes) -> bool:
    """Marked dead (``State.Dead``) or being removed (``State.RemovalInProgress``)."""
    try:
        doc = json.loads(data)
    except ValueError:
        return False
    state = doc.get("State") if isinstance(doc, dict) else None
    return isinstance(state, dict) and bool(state.get("Dead") or state.get("RemovalInProgress"))


def find_containers(facts: Mapping[str, ContainerFacts],
                    kept_original: Callable[[str], Optional[Tuple[bytes, os.stat_result]]] = lambda c: None
                    ) -> Tuple[List[FoundContainer], List[Tuple[str, str]]]:
    """What a migration does with each container; an unreadable config refuses the migration.

    ``kept_original(cid)`` gives the original config an earlier attempt kept before switching it (when that
    attempt's state database was lost): such a container is still pending, with that original.
    """
    found: List[FoundContainer] = []
    findings: List[Tuple[str, str]] = []
    for cid, c in facts.items():
        if not c.is_dir:
            findings.append(("skipped-unexpected-file", f"containers/{cid}"))
        elif c.problem:
            raise Refused(f"containers/{cid}/{CONFIG} is unreadable ({c.problem}); fix or remove that container")
        elif c.config is None:
            findings.append(("container-without-config", f"containers/{cid}"))
            found.append(FoundContainer(cid, None, None, SKIPPED, "no config.v2.json"))
        else:
            kept = kept_original(cid) if c.driver == "overlay2" else None
            if kept is not None:
                found.append(FoundContainer(cid, kept[0], kept[1], PENDING, "switched by an earlier attempt"))
            elif c.on_aufs:
                found.append(FoundContainer(cid, c.config, c.st, PENDING))
            else:
                found.append(FoundContainer(cid, c.config, c.st, SKIPPED, f"Driver is {c.driver!r}"))
    return found, findings


def switch(root: str, cid: str, original: bytes, mode: int, uid: int, gid: int) -> None:
    """Atomically replace the config by the original with ``"Driver": "overlay2"``; a re-run is a no-op."""
    cdir = os.path.join(root, "containers", cid)
    wanted = with_driver(original, "overlay2")
    current, _st = read_config(os.path.join(cdir, CONFIG))
    if current == wanted:
        return
    if current != original:
        raise Refused(f"containers/{cid}/{CONFIG} changed since the migration began (did an engine run?); "
                      "roll back with 'aufs2overlay rollback' and start again")
    fd = fsio.open_dir(cdir)
    try:
        fsio.atomic_write(fd, CONFIG, wanted, mode, owner=(uid, gid))
    finally:
        os.close(fd)


def restore(root: str, cid: str, original: bytes, mode: int, uid: int, gid: int,
            times_ns: Tuple[int, int]) -> bool:
    """Put the config back byte for byte, with its mode, owner and times; a re-run is a no-op.

    Returns False when the container's directory is gone (an engine removed the container after the
    migration completed): there is nothing left to put the config into.
    """
    cdir = os.path.join(root, "containers", cid)
    if not os.path.isdir(cdir) or os.path.islink(cdir):
        return False
    path = os.path.join(cdir, CONFIG)
    fd = fsio.open_dir(cdir)
    try:
        fsio.discard_temp(fd, CONFIG)  # a switch cut off between its temp file and its rename
        try:
            current, st = read_config(path)
            if (current == original and stat.S_IMODE(st.st_mode) == mode and (st.st_uid, st.st_gid) == (uid, gid)
                    and st.st_mtime_ns == times_ns[1]):
                return True
        except FileNotFoundError:
            pass
        fsio.atomic_write(fd, CONFIG, original, mode, owner=(uid, gid), times_ns=times_ns)
    finally:
        os.close(fd)
    return True


def keep_originals(originals: str, found: List[FoundContainer]) -> None:
    """Copies of the configs about to be switched, with their metadata, durable before the database exists."""
    pending = [c for c in found if c.state == PENDING and c.original is not None]
    if not pending:
        return
    os.makedirs(originals, mode=0o700, exist_ok=True)
    fd = fsio.open_dir(originals)
    try:
        for c in pending:
            fsio.atomic_write(fd, f"{c.id}.{CONFIG}", c.original, c.st.st_mode & 0o7777,
                              owner=(c.st.st_uid, c.st.st_gid), times_ns=(c.st.st_atime_ns, c.st.st_mtime_ns))
    finally:
        os.close(fd)
    fsio.fsync_path(os.path.dirname(originals))


def kept_original(originals: str, cid: str, dir_fd: Optional[int] = None) -> "tuple | None":
    """(bytes, stat) of the kept original config of ``cid`` in ``originals`` (below ``dir_fd``), if there is
    one that says aufs."""
    path = os.path.join(originals, f"{cid}.{CONFIG}")
    try:
        data, st = read_config(path, dir_fd)
        driver = locate_driver(data.decode("utf-8"))[0]
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return (data, st) if driver in AUFS_DRIVER_VALUES else None
