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
from typing import Dict, List, Mapping, Set, Tuple

from migrator.fs import fsio

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


# What each aufs entry of a directory becomes in overlay2 (``whiteout_actions``): the one decision both
# strategies apply (the hardlink linker makes it in the new tree, the in-place journal records it, then makes
# it) and the survey counts.
MAKE_WHITEOUT = "make-whiteout"  # .wh.<name>, <name> absent here: a 0/0 character device named <name>
SET_OPAQUE = "set-opaque"  # .wh..wh..opq: trusted.overlay.opaque=y on the directory itself
OPAQUE_CHILD = "opaque-child"  # .wh.<name> beside its own directory <name>: that directory becomes opaque
KEEP_ENTRY = "keep-entry"  # .wh.<name> beside its own non-directory <name>: the entry stays, nothing is made
DROP_BAD = "drop-bad"  # .wh. of "", "." or "..": whites out nothing
DROP_INTERNAL = "drop-internal"  # .wh..wh.<other>: aufs's own bookkeeping, not carried over
DROP_UNNEEDED = "drop-unneeded"  # .wh.<name> in a directory merged with nothing below: hides nothing (lowerview)
KEEP_INTERNAL = "keep-internal"  # .wh..wh.<other> below an image layer's root holding data: the layer's tar
#                                  names it, and ``docker save`` reads it (``keeps_for_tar_split``)

# The finding each action is reported as (None: none).
FINDING = {MAKE_WHITEOUT: None, SET_OPAQUE: None, OPAQUE_CHILD: "whiteout-beside-entry",
           KEEP_ENTRY: "whiteout-beside-entry", DROP_BAD: "ignored-bad-whiteout",
           DROP_INTERNAL: "dropped-aufs-internal", DROP_UNNEEDED: "whiteout-hides-nothing",
           KEEP_INTERNAL: "aufs-internal-kept-for-tar-split"}
_BAD_TARGETS = {str: ("", ".", ".."), bytes: (b"", b".", b"..")}

# aufs looks up no name longer than this (``AUFS_MAX_NAMELEN``: room for ``.wh..wh.<name>.<4 hex>``): it
# lists such a name and answers ENAMETOOLONG to every lookup of it.
MAX_NAMELEN = 255 - 2 * len(WH_PREFIX) - 1 - 4

# The findings that name a path whose view after the migration is not what aufs showed (docs/design.md,
# "Where the view differs from aufs"): where overlayfs cannot show aufs's view without changing what the
# layer holds, the migration keeps what the layer's own tar says, as every other engine shows it, and says so.
VIEW_DIFFERS = (
    "whiteout-beside-entry",  # aufs hides <name> (EIO in a container's own layer); the layer's <name> is kept
    "ignored-bad-whiteout",  # aufs lists ".wh." itself and cannot open it; not carried over
    "device-0-0-reads-as-whiteout",  # aufs shows the device; overlayfs reads it as a whiteout
    "name-too-long-for-aufs",  # aufs lists it and cannot open it (ENAMETOOLONG); overlayfs shows it
    "opaque-marker-not-a-regular-file",  # aufs answers EIO for the directory; it is migrated opaque
    "whiteout-not-a-regular-file",  # aufs answers EIO for the name (in a layer above too); it is whited out
    "aufs-merged-through-non-directory",  # aufs merges the directory past a lower non-directory; overlayfs stops
    "aufs-merged-below-opaque",  # aufs merges an opaque directory down to the lowest opaque one below it
    "aufs-internal-kept-for-tar-split",  # aufs hides it; the layer's tar names its data, so it is kept
    "layers-file-repaired",  # aufs mounted the layer with the ancestry its broken layers file gave
    "hardlink-into-another-layer-copied",  # aufs showed one inode; a container's layer is copied, not linked
)


@dataclass(frozen=True)
class WhiteoutAction:
    """What the aufs entry ``name`` of a directory becomes: ``action``, on ``target`` (a name in the same
    directory; None for the directory itself or nothing)."""

    name: "str | bytes"
    action: str
    target: "str | bytes | None"

    @property
    def finding(self) -> "str | None":
        return FINDING[self.action]

    @property
    def named(self) -> "str | bytes":
        """The name the finding names: the entry whose view it is about (the kept entry beside a whiteout),
        else the aufs entry itself."""
        return self.target if self.action in (OPAQUE_CHILD, KEEP_ENTRY) else self.name


def whiteout_actions(entries: Mapping, merged: bool = True, kept: Set = frozenset()) -> List[WhiteoutAction]:
    """The actions for the aufs entries of one directory, from ``entries``: every name in it (str or bytes)
    and whether it is a directory, and whether the directory is ``merged`` with one below it (``lowerview``;
    where it is not, a whiteout device would be listed as an entry, and it would hide nothing); ``kept``:
    the aufs internals below an image layer's root that hold data (``keeps_for_tar_split``).  Pure: it reads
    nothing, so every caller decides alike."""
    actions = []
    for name in entries:
        kind = whiteout_kind(name)
        if kind is None:
            continue
        target = None
        if kind == OPAQUE:
            action = SET_OPAQUE
        elif kind == INTERNAL:
            action = KEEP_INTERNAL if name in kept else DROP_INTERNAL
        else:
            target = whiteout_target(name)
            if target in _BAD_TARGETS[type(name)]:
                action, target = DROP_BAD, None
            elif target in entries:
                action = OPAQUE_CHILD if entries[target] else KEEP_ENTRY
            else:
                action = MAKE_WHITEOUT if merged else DROP_UNNEEDED
        actions.append(WhiteoutAction(name, action, target))
    return actions


def keeps_for_tar_split(dir_fd: int, name: "str | bytes") -> bool:
    """Whether the aufs internal ``name`` (below a layer's root) holds data: a regular file that is not empty,
    or a directory with one somewhere below it.

    aufs names the copy it makes during a copy-up, and a directory it is removing, ``.wh..wh.<name>.<4 hex>``;
    a power cut in between leaves it, and ``docker commit`` puts it into an image layer, since moby's aufs
    ``Diff`` leaves out ``.wh..wh.*`` only at the layer's root.  ``docker save`` on overlay2 then reads every
    file of the layer's tar-split that has data, through the layer's mounted view: drop it, and the image can
    no longer be saved or pushed.  Empty files and directories are never read, so only data keeps it."""
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    if stat.S_ISREG(st.st_mode):
        return st.st_size > 0
    if not stat.S_ISDIR(st.st_mode):
        return False
    fd = fsio.open_dir(os.fsdecode(name), dir_fd, noatime=True)
    try:
        with os.scandir(fd) as it:
            return any(keeps_for_tar_split(fd, e.name) for e in it
                       if e.is_dir(follow_symlinks=False) or e.is_file(follow_symlinks=False))
    finally:
        os.close(fd)


PLINK_DIR = WH_META_PREFIX + "plnk"


def pseudo_link_inodes(layer_fd: int) -> Set[int]:
    """The inodes of a writable layer that hold a pseudo-link (``.wh..wh.plnk/<aufs inode>.<inode>``, aufs's
    ``plink.c``): a hardlinked lower file copied up into the layer, whose other names aufs showed as the copy
    while mounted.  moby runs ``auplink <mnt> flush`` at unmount to make them real hardlinks in the layer; after
    a power cut, or without ``auplink`` (moby only warns), they stay, and at the next mount those other names
    show the lower file again.  The migration shows what that next mount shows; these name the copies."""
    try:
        fd = fsio.open_dir(PLINK_DIR, layer_fd, noatime=True)
    except OSError:
        return set()
    try:
        found = set()
        for name in os.listdir(fd):
            inode = name.rpartition(".")[2]
            if inode.isdigit():
                found.add(int(inode))
        return found
    finally:
        os.close(fd)


def kept_in(directory: "str | bytes", name: "str | bytes") -> bool:
    """``keeps_for_tar_split`` of ``name`` in the directory at the path ``directory``."""
    fd = fsio.open_dir(os.fsdecode(directory), noatime=True)
    try:
        return keeps_for_tar_split(fd, name)
    finally:
        os.close(fd)


LAYERS_FILE_MAX = 1 << 20
REMOVING_SUFFIX = "-removing"
# Ids are directory names the engine generated: hex cache-ids, "<id>-init", BuildKit's own ids.  Anything
# with bytes outside this set is not an engine's layer and is refused rather than guessed at.
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")


def is_removing(name: str) -> bool:
    """The ``-removing`` rule, for every name of the root: a removal the engine began and did not finish.  The
    aufs driver renames ``diff/<id>`` to ``<id>-removing`` before deleting it; the layer store renames
    ``sha256/<chain>`` to ``<chain>-<random>-removing``.  Such a name is debris, never a layer or a user of one."""
    return name.endswith(REMOVING_SUFFIX)


def removed_id(name: str) -> str:
    """The layer id ``aufs/diff/<id>-removing`` was."""
    return name[:-len(REMOVING_SUFFIX)]


@dataclass(frozen=True)
class DiffEntry:
    """An entry of ``aufs/diff/`` as ``lstat`` saw it.  Two readings compare equal while the entry is the same
    inode and nothing changed its metadata or names (its ctime); the access time is kept but not compared."""

    name: str
    kind: str  # DIR, SYMLINK or OTHER
    dev: int
    ino: int
    ctime_ns: int
    mtime_ns: int
    atime_ns: int = field(compare=False)


DIR, SYMLINK, OTHER = "dir", "symlink", "other"


@dataclass(frozen=True)
class LayersFile:
    """``aufs/layers/<id>``: the ancestors, nearest first; None with the ``problem`` when it is garbled."""

    ancestors: "Tuple[str, ...] | None"
    problem: str = ""


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
    layer_findings: List[Tuple[str, str, str]] = field(default_factory=list)  # (kind, layer id, detail): likewise

    @property
    def parents(self) -> Set[str]:
        return {layer.parent for layer in self.layers if layer.parent}


def valid_id(name: str) -> bool:
    return bool(_ID_RE.match(name)) and not name.endswith(".") and ".." not in name


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


def read_diff_dir(root_fd: int) -> Tuple[str, Dict[str, DiffEntry]]:
    """``aufs/diff/`` of the root open as ``root_fd``: whether it is ``present``, ``missing`` or ``not a
    directory``, and its entries by name."""
    fd, state = fsio.open_dir_found(os.path.join("aufs", "diff"), root_fd)
    if fd is None:
        return state, {}
    entries = {}
    try:
        with os.scandir(fd) as it:
            for entry in it:
                st = entry.stat(follow_symlinks=False)
                kind = DIR if stat.S_ISDIR(st.st_mode) else SYMLINK if stat.S_ISLNK(st.st_mode) else OTHER
                entries[entry.name] = DiffEntry(entry.name, kind, st.st_dev, st.st_ino, st.st_ctime_ns,
                                                st.st_mtime_ns, st.st_atime_ns)
    finally:
        os.close(fd)
    return "present", dict(sorted(entries.items()))


def read_layers_files(root_fd: int, unreadable: List[Tuple[str, str]]) -> Dict[str, LayersFile]:
    """Every ``aufs/layers/<id>`` of the root open as ``root_fd`` (those being removed left out), parsed; a file
    that is not a small regular file is added to ``unreadable`` (its path, why)."""
    fd, _state = fsio.open_dir_found(os.path.join("aufs", "layers"), root_fd)
    if fd is None:
        return {}
    found = {}
    try:
        with os.scandir(fd) as it:
            regular = {entry.name: entry.is_file(follow_symlinks=False) for entry in it}
        for name in sorted(regular):
            if is_removing(name):
                continue
            try:
                data = fsio.read_small(name, LAYERS_FILE_MAX, dir_fd=fd, regular=regular[name])[0]
            except FileNotFoundError:
                continue
            except fsio.NotSmallFile as exc:
                unreadable.append((f"aufs/layers/{name}", str(exc)))
                continue
            try:
                found[name] = LayersFile(tuple(parse_layers_file(data)))
            except ValueError as exc:  # UnicodeDecodeError is one
                found[name] = LayersFile(None, str(exc))
    finally:
        os.close(fd)
    return found


def count_layers(diff_dir: str) -> int:
    """The layer directories of ``aufs/diff`` (those being removed left out), by a plain listing: what
    "staged: N of M layers" counts against (``status`` says it without reading the root's facts)."""
    try:
        with os.scandir(diff_dir) as it:
            return sum(1 for e in it if e.is_dir(follow_symlinks=False) and not is_removing(e.name))
    except (FileNotFoundError, NotADirectoryError):
        return 0
