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
from typing import Callable, List, Optional, Tuple

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


def read_config(path: str) -> Tuple[bytes, os.stat_result]:
    return fsio.read_regular(path, CONFIG_MAX)


def any_on_aufs(root: str) -> bool:
    """Whether any readable ``config.v2.json`` says aufs (a quick look that never refuses: used to tell a root
    with nothing to migrate from one whose storage is missing)."""
    base = os.path.join(root, "containers")
    try:
        names = os.listdir(base)
    except (FileNotFoundError, NotADirectoryError):
        return False
    for cid in names:
        try:
            data, _st = read_config(os.path.join(base, cid, CONFIG))
            if locate_driver(data.decode("utf-8"))[0] in AUFS_DRIVER_VALUES:
                return True
        except (OSError, ValueError, UnicodeDecodeError):
            continue
    return False


def find_containers(root: str, kept_original: Callable[[str], Optional[Tuple[bytes, os.stat_result]]] = lambda c: None
                    ) -> Tuple[List[FoundContainer], List[Tuple[str, str]]]:
    """Every ``containers/<id>/``; an unreadable config of an aufs container refuses the migration.

    ``kept_original(cid)`` gives the original config an earlier attempt kept before switching it (when that
    attempt's state database was lost): such a container is still pending, with that original.
    """
    base = os.path.join(root, "containers")
    found: List[FoundContainer] = []
    findings: List[Tuple[str, str]] = []
    try:
        names = sorted(os.listdir(base))
    except FileNotFoundError:
        return found, findings
    for cid in names:
        cdir = os.path.join(base, cid)
        if not stat.S_ISDIR(os.lstat(cdir).st_mode):
            findings.append(("skipped-unexpected-file", f"containers/{cid}"))
            continue
        path = os.path.join(cdir, CONFIG)
        if not fsio.lexists(path):
            findings.append(("container-without-config", f"containers/{cid}"))
            found.append(FoundContainer(cid, None, None, SKIPPED, "no config.v2.json"))
            continue
        try:
            data, st = read_config(path)
            driver, _s, _e = locate_driver(data.decode("utf-8"))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise Refused(f"containers/{cid}/{CONFIG} is unreadable ({exc}); fix or remove that container") from None
        kept = kept_original(cid) if driver == "overlay2" else None
        if kept is not None:
            found.append(FoundContainer(cid, kept[0], kept[1], PENDING, "switched by an earlier attempt"))
        elif driver in AUFS_DRIVER_VALUES:
            found.append(FoundContainer(cid, data, st, PENDING))
        else:
            found.append(FoundContainer(cid, data, st, SKIPPED, f"Driver is {driver!r}"))
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


def kept_original(originals: str, cid: str) -> "tuple | None":
    """(bytes, stat) of the kept original config of ``cid``, if there is one that says aufs."""
    path = os.path.join(originals, f"{cid}.{CONFIG}")
    try:
        data, st = read_config(path)
        driver = locate_driver(data.decode("utf-8"))[0]
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return (data, st) if driver in AUFS_DRIVER_VALUES else None
