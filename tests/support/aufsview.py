"""What a container sees through an aufs chain, modelled on aufs6.1's own code, and judged by the real aufs.

Test code, written from ``fs/aufs`` (``../shared/fixtures/aufs-kernel/aufs6.1-standalone.tar.gz``), not from the
migrator; the real-aufs judge (``tests/fuzz/judge.py`` with ``tests/support/aufsvm.py``) holds it against the
kernel on every generated root, so the host-only suites can use it where a VM would cost too much.

The branches are mounted as moby's driver mounts them (``br:<top>=rw:<lower>=ro+wh:…``): every branch takes
whiteouts.  An image's chain is seen through a new, empty container layer on top (``scratch``); a container's
chain has the container's own layer on top.  The rules, each from the function named:

* listing a directory (``vdir.c``, ``fillvdir`` / ``au_do_read_vdir``): the directory's branches are read top
  down; a name is listed once, from the first branch that has it, unless a ``.wh.<name>`` of an upper branch (or
  earlier in the same branch's order) whites it out.  ``.wh.`` names longer than the prefix are never listed;
  they white out in every branch but the directory's lowest.  ``.wh.`` itself (nothing after the prefix) is
  listed as an ordinary name.
* looking a name up (``dentry.c``, ``au_lkup_dentry`` / ``au_do_lookup``): a name starting ``.wh.`` is EPERM, one
  longer than 242 bytes (``AUFS_MAX_NAMELEN``) ENAMETOOLONG.  Branch by branch where the parent is a directory:
  a ``.wh.<name>`` that is not a regular file is EIO; a regular one ends the lookup (and hides the name in its
  own branch too; if that branch is the first one looked at, the name there makes it EIO: "both of real entry
  and whiteout found").  The first entry found decides the type; a non-directory ends the lookup; for a
  directory, entries of another type further down are *skipped* and the directories below them merged too.  A
  directory's ``.wh..wh..opq`` (EIO when not a regular file) ends its merge at its branch (at the lowest such
  branch the lookup met: ``di_bdiropq`` is overwritten by each), but never at a branch's root, which aufs does
  not look up.
* what an entry shows (``i_op.c``, ``au_cpup_attr_all``): the topmost branch's inode; names of one inode show
  one inode number, also across branches (the real aufs says so: its xino table is per filesystem).

A name listed whose lookup fails is *unreachable*: it appears in ``ls`` and ``stat`` fails.  Which of those
aufs lists can depend on the order of a branch's directory (a ``.wh.<name>`` beside its ``<name>``), so views
are compared by what is reachable, and the unreachable names aufs shows by inclusion.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

from tests.support.manifest import Entry, describe

WH = b".wh."
OPQ = b".wh..wh..opq"
MAX_NAMELEN = 255 - 2 * len(WH) - 1 - 4  # AUFS_MAX_NAMELEN: room for .wh..wh.<name>.<4 hex>


@dataclass
class View:
    """A chain's view: the reachable entries (``.`` the top), the unreachable names listed with the errno
    their lookup fails with, and the hardlink groups among the reachable entries."""

    entries: Dict[bytes, Entry] = field(default_factory=dict)
    unreachable: Dict[bytes, str] = field(default_factory=dict)
    groups: List[List[bytes]] = field(default_factory=list)


class _Refused(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = errno.errorcode[code]


Branch = Tuple[bytes, bool]  # a directory of one branch; whether it is the first branch the lookup looked at


def _lstat(path: bytes) -> Optional[os.stat_result]:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _wh_test(directory: bytes, name: bytes) -> bool:
    """``au_wh_test``: a whiteout named ``name`` in ``directory``; EIO when it is not a regular file."""
    st = _lstat(os.path.join(directory, name))
    if st is None:
        return False
    if not stat.S_ISREG(st.st_mode):
        raise _Refused(errno.EIO)
    return True


def _lookup(parents: List[bytes], name: bytes) -> Optional[Tuple[bytes, List[bytes]]]:
    """``au_lkup_dentry`` of ``name`` in a directory merged from ``parents`` (top first): None when there is
    nothing, else (the topmost entry's path, and for a directory the directories it merges); ``_Refused``."""
    if name.startswith(WH):
        raise _Refused(errno.EPERM)
    if len(name) > MAX_NAMELEN:
        raise _Refused(errno.ENAMETOOLONG)
    allow_neg, recorded, first, kind = True, False, None, None
    merged: List[bytes] = []
    opaque_at = None
    for parent in parents:
        whiteout = _wh_test(parent, WH + name)
        path = os.path.join(parent, name)
        st = _lstat(path)
        if whiteout:
            if allow_neg and st is None:
                recorded = True
            break
        if st is None:
            if allow_neg:
                recorded, allow_neg = True, False
            continue
        if kind is not None and stat.S_IFMT(st.st_mode) != kind:
            continue  # another type below a directory: skipped, and the lookup goes on
        recorded, allow_neg = True, False
        if first is None:
            first, kind = path, stat.S_IFMT(st.st_mode)
        if kind != stat.S_IFDIR:
            break
        merged.append(path)
        if _wh_test(path, OPQ):  # di_bdiropq: each opaque directory found overwrites it (a new dentry is
            opaque_at = len(merged)  # negative, so the loop does not stop at the first: "isdir" is false)
    if first is None:
        if not recorded:
            raise _Refused(errno.EIO)  # both of real entry and whiteout found
        return None
    return first, merged[:opaque_at] if opaque_at else merged


def _listing(dirs: List[bytes]) -> Tuple[List[bytes], Set[bytes]]:
    """``au_do_read_vdir``: the names a directory merged from ``dirs`` (top first) lists; and those it lists
    or not by the order of a branch's directory (a ``.wh.<name>`` beside its ``<name>``: listed when the name
    comes first)."""
    listed: List[bytes] = []
    maybe: Set[bytes] = set()
    seen: Set[bytes] = set()
    whited: Set[bytes] = set()
    for i, directory in enumerate(dirs):
        whiteouts_count = i != len(dirs) - 1
        names = os.listdir(directory)
        here = {n[len(WH):] for n in names if len(n) > len(WH) and n.startswith(WH)} if whiteouts_count else set()
        for name in names:
            if len(name) <= len(WH) or not name.startswith(WH):
                if name not in seen and name not in whited:
                    seen.add(name)
                    if name in here:
                        maybe.add(name)
                    else:
                        listed.append(name)
        whited |= here
    return listed, maybe


def aufs_view(branches: List[str]) -> View:
    """The view of ``branches`` (paths, top first, as mounted; the top one is the container's layer)."""
    roots = [os.fsencode(p) for p in branches]
    view = View(entries={b".": describe(roots[0])})
    inodes: Dict[Tuple[int, int], List[bytes]] = {}
    pending: List[Tuple[bytes, List[bytes]]] = [(b"", roots)]
    while pending:
        rel, dirs = pending.pop()
        listed, maybe = _listing(dirs)
        for name in listed + sorted(maybe):
            child = os.path.join(rel, name) if rel else name
            try:
                found = _lookup(dirs, name)
            except _Refused as exc:
                view.unreachable[child] = exc.code
                continue
            if found is None:
                view.unreachable[child] = "ENOENT"
                continue
            assert name not in maybe, f"{child!r} whited out in its own branch, yet found"
            path, merged = found
            view.entries[child] = describe(path)
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode):
                pending.append((child, merged))
            else:  # one inode number for one inode, whichever branches name it (the xino file is per filesystem)
                inodes.setdefault((st.st_dev, st.st_ino), []).append(child)
    view.groups = sorted(sorted(paths) for paths in inodes.values() if len(paths) > 1)
    return view


def normalized(entries: Dict[bytes, tuple]) -> Tuple[Dict[bytes, tuple], Dict[bytes, str]]:
    """A kernel's view (``guest/agent.py``'s ``view``) split as ``View`` holds it: reachable entries, and the
    unreachable names with their errno."""
    reachable, unreachable = {}, {}
    for path, entry in entries.items():
        if entry and entry[0] == "error":
            unreachable[path] = entry[1]
        else:
            reachable[path] = entry
    return reachable, unreachable
