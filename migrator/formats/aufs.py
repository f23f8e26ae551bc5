"""Reading the aufs driver's data: which layers exist, their ancestry, and whether it is sane enough to migrate.

Nothing here writes.  Every check that can refuse the migration runs before anything is created, so a refusal
leaves the root exactly as it was.

The layout, as moby's aufs driver leaves it (``daemon/graphdriver/aufs``)::

    aufs/diff/<id>/            a layer's content; ``.wh.<name>`` whites out <name> below it,
                               ``.wh..wh..opq`` makes its directory opaque, other ``.wh..wh.*`` are aufs's own
    aufs/diff/<id>-removing    a removal the engine did not finish
    aufs/layers/<id>           the layer's ancestors, nearest first, one per line
    aufs/mnt/<id>              mount points (empty when the engine is stopped)
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from typing import Dict, List, Set, Tuple

from migrator.errors import Refused
from migrator.formats.overlay2 import MAX_LOWERS

WH_PREFIX = ".wh."
WH_META_PREFIX = ".wh..wh."
OPAQUE_MARKER = ".wh..wh..opq"
# What a ``.wh.`` name is (``whiteout_kind``); an ordinary name is None.
WHITEOUT = "whiteout"  # .wh.<name>: <name> is deleted in this layer
OPAQUE = "opaque"  # .wh..wh..opq: nothing below this directory shows through
INTERNAL = "internal"  # .wh..wh.<other>: aufs's own bookkeeping (.wh..wh.aufs, .wh..wh.plnk, .wh..wh.orph)
_KINDS = {str: (WH_PREFIX, WH_META_PREFIX, OPAQUE_MARKER),
          bytes: (WH_PREFIX.encode(), WH_META_PREFIX.encode(), OPAQUE_MARKER.encode())}


def whiteout_kind(name: "str | bytes") -> "str | None":
    """What an entry named ``name`` (str or bytes) is to aufs: WHITEOUT, OPAQUE, INTERNAL, or None."""
    prefix, meta, opaque = _KINDS[type(name)]
    if not name.startswith(prefix):
        return None
    if name == opaque:
        return OPAQUE
    return INTERNAL if name.startswith(meta) else WHITEOUT


def whiteout_target(name: "str | bytes") -> "str | bytes":
    """The name a WHITEOUT entry deletes."""
    return name[len(WH_PREFIX):]


LAYERS_FILE_MAX = 1 << 20
REMOVING_SUFFIX = "-removing"
# Ids are directory names the engine generated: hex cache-ids, "<id>-init", BuildKit's own ids.  Anything
# with bytes outside this set is not an engine's layer and is refused rather than guessed at.
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")


@dataclass
class AufsLayer:
    id: str
    ancestors: List[str]  # nearest parent first
    writable: bool = False  # a container's own layer: overlay2 will write into it in place
    times: Tuple[int, int] = (0, 0)  # atime and mtime of aufs/diff/<id>, in ns

    @property
    def parent(self) -> "str | None":
        return self.ancestors[0] if self.ancestors else None


@dataclass
class Discovery:
    layers: List[AufsLayer] = field(default_factory=list)  # parents before children
    findings: List[Tuple[str, str]] = field(default_factory=list)  # (kind, detail), reported and recorded

    @property
    def parents(self) -> Set[str]:
        return {layer.parent for layer in self.layers if layer.parent}


def valid_id(name: str) -> bool:
    return bool(_ID_RE.match(name)) and not name.endswith(".") and ".." not in name


def _lstat(path: str) -> "os.stat_result | None":
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def read_small(path: str, limit: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ValueError(f"larger than {limit} bytes")
    return data


def layer_store_references(root: str, files: Tuple[str, ...] = ("cache-id", "mount-id", "init-id")) -> Set[str]:
    """Layer ids the image layer store names in ``files`` (``cache-id`` of image layers, ``mount-id`` of
    containers' writable layers, ``init-id`` of their init layers)."""
    refs: Set[str] = set()
    layerdb = os.path.join(root, "image", "aufs", "layerdb")
    for sub, all_names in (("sha256", ("cache-id",)), ("mounts", ("mount-id", "init-id"))):
        names = [n for n in all_names if n in files]
        base = os.path.join(layerdb, sub)
        try:
            entries = os.listdir(base)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            if entry.endswith(REMOVING_SUFFIX):
                continue  # the layer store renames an entry so before it removes the layer
            for name in names:
                try:
                    refs.add(read_small(os.path.join(base, entry, name), 4096).decode("ascii").strip())
                except (OSError, ValueError, UnicodeDecodeError):
                    continue
    return refs


def layer_store_container_ids(root: str) -> Set[str]:
    """Containers the aufs layer store knows (``image/aufs/layerdb/mounts/<id>``)."""
    try:
        return set(os.listdir(os.path.join(root, "image", "aufs", "layerdb", "mounts")))
    except (FileNotFoundError, NotADirectoryError):
        return set()


def parse_layers_file(data: bytes) -> List[str]:
    """``aufs/layers/<id>``: one ancestor id a line, nearest parent first; empty for a base layer."""
    text = data.decode("ascii")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for line in lines:
        if not valid_id(line):
            raise ValueError(f"bad ancestor line {line!r}")
    return lines


def discover(root: str, skip_broken_chains: bool = False) -> Discovery:
    """Read ``aufs/diff`` and ``aufs/layers``, validate the whole graph, and return the layers parents-first.

    ``skip_broken_chains`` (the operator accepted missing storage): a layer whose ancestor has no diff is left
    out and reported, instead of refusing the migration; nothing could mount it on either driver.
    """
    diff_dir = os.path.join(root, "aufs", "diff")
    layers_dir = os.path.join(root, "aufs", "layers")
    result = Discovery()
    st = _lstat(diff_dir)
    if st is None:
        return result
    if not stat.S_ISDIR(st.st_mode):
        raise Refused(f"{diff_dir} is not a directory")
    root_dev = os.lstat(root).st_dev

    candidates: Dict[str, List[str]] = {}
    times: Dict[str, Tuple[int, int]] = {}
    missing_layers_file: List[str] = []
    for name in sorted(os.listdir(diff_dir)):
        path = os.path.join(diff_dir, name)
        est = os.lstat(path)
        if stat.S_ISLNK(est.st_mode):
            raise Refused(f"aufs/diff/{name} is a symlink; refusing to follow it out of the layer store")
        if not stat.S_ISDIR(est.st_mode):
            result.findings.append(("skipped-unexpected-file", f"aufs/diff/{name}"))
            continue
        if name.endswith(REMOVING_SUFFIX):
            result.findings.append(("skipped-removing-layer", f"aufs/diff/{name}"))
            continue
        if not valid_id(name):
            raise Refused(f"aufs/diff/{name!r} is not a layer id this tool recognises; move it out of aufs/diff")
        if est.st_dev != root_dev:
            raise Refused(f"aufs/diff/{name} is on another filesystem than {root}; hardlinks cannot cross it")
        times[name] = (est.st_atime_ns, est.st_mtime_ns)
        lpath = os.path.join(layers_dir, name)
        lst = _lstat(lpath)
        if lst is None:
            missing_layers_file.append(name)
            continue
        if not stat.S_ISREG(lst.st_mode):
            raise Refused(f"aufs/layers/{name} is not a regular file")
        try:
            candidates[name] = parse_layers_file(read_small(lpath, LAYERS_FILE_MAX))
        except (ValueError, UnicodeDecodeError) as exc:
            raise Refused(f"aufs/layers/{name} is garbled ({exc})") from None

    if missing_layers_file:
        refs = layer_store_references(root)
        for name in missing_layers_file:
            if name in refs:
                raise Refused(f"layer {name} has no aufs/layers/{name} but the layer store uses it; "
                              "its ancestry is unknown")
            result.findings.append(("skipped-layer-without-layers-file", f"aufs/diff/{name}"))

    for name in candidates:
        seen, current = {name}, candidates[name]
        while current:
            parent = current[0]
            if parent in seen:
                raise Refused(f"layer {name} has a cycle in its ancestry (through {parent})")
            seen.add(parent)
            current = candidates.get(parent, [])

    if skip_broken_chains:
        for name in sorted(candidates):
            gone = [a for a in candidates[name] if a not in candidates]
            if gone:
                result.findings.append(("skipped-layer-missing-ancestor", f"aufs/diff/{name} (its ancestor "
                                                                           f"{gone[0]} has no aufs/diff/{gone[0]})"))
        candidates = {name: a for name, a in candidates.items() if all(x in candidates for x in a)}

    for name, ancestors in candidates.items():
        if len(ancestors) > MAX_LOWERS:
            raise Refused(f"layer {name} has {len(ancestors)} ancestors; overlay2 allows at most {MAX_LOWERS}")
        if name in ancestors or len(set(ancestors)) != len(ancestors):
            raise Refused(f"layer {name} has a cycle in its ancestry (aufs/layers/{name})")
        for ancestor in ancestors:
            if ancestor not in candidates:
                raise Refused(f"layer {name} names ancestor {ancestor}, which has no usable aufs/diff/{ancestor}")
        if ancestors and candidates[ancestors[0]] != ancestors[1:]:
            raise Refused(f"aufs/layers/{name} disagrees with aufs/layers/{ancestors[0]} about the ancestry")

    ordered = sorted(candidates.items(), key=lambda item: (len(item[1]), item[0]))
    writable = layer_store_references(root, ("mount-id",))
    result.layers = [AufsLayer(id=name, ancestors=ancestors, writable=name in writable, times=times[name])
                     for name, ancestors in ordered]
    return result
