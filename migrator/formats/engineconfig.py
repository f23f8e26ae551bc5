"""``run --set-engine-config PATH``: the engine's ``daemon.json`` says ``"storage-driver": "overlay2"`` once the
migration completes, and says what it said before after a rollback.

An engine that still knows aufs (dockerd 20.10–23.x, balena-engine), started without an explicit driver, finds
both ``aufs/`` and ``overlay2/`` and refuses to start: until ``cleanup``, the driver must be set.  Engines
without aufs (dockerd 24 and later) pick ``overlay2/`` by themselves on a migrated root, and the setting is
harmless there (docs/operator-guide.md, "Start the engine on overlay2", for an engine upgraded at the same
time).
The file as found (or its absence) is kept in the work area before the migration starts, with its mode, owner
and times; the new file is written atomically (temp, fsync, rename, fsync dir) during the switch; rollback,
with or without the state database, puts the kept bytes back the same way (or removes the file it created).
"""

from __future__ import annotations

import json
import os
import stat
from typing import Optional

from migrator.errors import Refused
from migrator.fs import fsio
from migrator.paths import Paths

KEPT = "engine-config.json"
CONFIG_MAX = 1 << 20
DRIVER_KEY = "storage-driver"


def _kept_path(paths: Paths) -> str:
    return os.path.join(paths.workdir, "originals", KEPT)


def _read(path: str) -> Optional[tuple]:
    try:
        return fsio.read_small(path, CONFIG_MAX)
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise Refused(f"engine config {path} is not a regular file ({exc})") from None


def switched_bytes(original: Optional[bytes], path: str) -> bytes:
    """The config with the driver set to overlay2 (every other key kept); refused if it is not a JSON object."""
    try:
        doc = json.loads(original.decode("utf-8")) if original and original.strip() else {}
    except (UnicodeDecodeError, ValueError) as exc:
        raise Refused(f"engine config {path} is not valid JSON ({exc}); fix it or leave out "
                      "--set-engine-config") from None
    if not isinstance(doc, dict):
        raise Refused(f"engine config {path} is not a JSON object")
    doc[DRIVER_KEY] = "overlay2"
    return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


def check(path: str) -> None:
    """Refuse, before anything is written, a config this tool could not edit."""
    path = os.path.abspath(path)
    if not os.path.isdir(os.path.dirname(path)):
        raise Refused(f"the directory of engine config {path} does not exist")
    found = _read(path)
    switched_bytes(found[0] if found else None, path)


def managed_path(paths: Paths) -> Optional[str]:
    kept = _kept(paths)
    return kept["path"] if kept else None


def forget(paths: Paths) -> None:
    """A new run without --set-engine-config: drop what an earlier, rolled-back run kept."""
    if fsio.lexists(_kept_path(paths)):
        os.unlink(_kept_path(paths))
        fsio.fsync_path(os.path.dirname(_kept_path(paths)))


def keep_original(paths: Paths, path: str) -> None:
    """Before the migration starts: keep the config as found (or that it was absent), durably."""
    path = os.path.abspath(path)
    check(path)
    found = _read(path)
    parent = os.lstat(os.path.dirname(path))
    record = {"path": path, "existed": found is not None,
              "parent_times_ns": [parent.st_atime_ns, parent.st_mtime_ns]}
    if found is not None:
        data, st = found
        record.update(original=data.hex(), mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
                      atime_ns=st.st_atime_ns, mtime_ns=st.st_mtime_ns)
    os.makedirs(os.path.dirname(_kept_path(paths)), mode=0o700, exist_ok=True)
    fd = fsio.open_dir(os.path.dirname(_kept_path(paths)))
    try:
        fsio.atomic_write(fd, KEPT, json.dumps(record).encode("ascii"), 0o600)
    finally:
        os.close(fd)


def _kept(paths: Paths) -> Optional[dict]:
    try:
        with open(_kept_path(paths), "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


def switch(paths: Paths) -> Optional[str]:
    """During the switch: write the config with overlay2 (idempotent); return its path, if one is managed."""
    kept = _kept(paths)
    if kept is None:
        return None
    path = kept["path"]
    original = bytes.fromhex(kept["original"]) if kept["existed"] else None
    wanted = switched_bytes(original, path)
    current = _read(path)
    if current is None or current[0] != wanted:
        fd = fsio.open_dir(os.path.dirname(path))
        try:
            fsio.atomic_write(fd, os.path.basename(path), wanted, kept.get("mode", 0o644),
                              owner=(kept["uid"], kept["gid"]) if kept["existed"] else None)
        finally:
            os.close(fd)
    return path


def restore(paths: Paths) -> Optional[str]:
    """At rollback: the config as it was, byte for byte with its metadata, or absent again, and its directory's
    times as they were; idempotent."""
    kept = _kept(paths)
    if kept is None:
        return None
    path = kept["path"]
    parent, name = os.path.split(path)
    fd = fsio.open_dir(parent)
    try:
        fsio.discard_temp(fd, name)  # a switch cut off between its temp file and its rename
        if not kept["existed"]:
            if fsio.lexists(path):
                os.unlink(name, dir_fd=fd)
        else:
            fsio.atomic_write(fd, name, bytes.fromhex(kept["original"]), kept["mode"],
                              owner=(kept["uid"], kept["gid"]), times_ns=(kept["atime_ns"], kept["mtime_ns"]))
        os.utime(fd, ns=tuple(kept["parent_times_ns"]))
        os.fsync(fd)
    finally:
        os.close(fd)
    return path
