"""What a container sees, for ``verify``: the aufs union of a chain, and a mounted overlay, as comparable lists.

Both views describe each path by type, permission bits, owner, mtime (not of symlinks), size, symlink target,
device numbers and xattrs (but ``trusted.overlay.*``, which overlayfs hides).  File content is not compared:
image layers are hardlinks (the same inode on both sides) and a writable layer is a copy made with its data.
aufs's rules: for each name the topmost layer that has it decides; ``.wh.<name>`` hides ``<name>`` below its
own layer, ``.wh..wh..opq`` hides a directory's content below (not at a layer's root, which aufs never looks
up, so never tests for the marker: ``fs/aufs/dentry.c``), a directory merges with the directories of the
same name below until a non-directory is met, and every ``.wh.`` name is invisible.
"""

from __future__ import annotations

import os
import stat
from typing import Dict, Iterator, List, Sequence, Tuple

from migrator.formats import aufs
from migrator.fs import tree

Meta = Tuple


def describe(path: bytes) -> Meta:
    st = os.lstat(path)
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        detail: object = os.readlink(path)
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        detail = (os.major(st.st_rdev), os.minor(st.st_rdev))
    elif stat.S_ISREG(mode):
        detail = st.st_size
    else:
        detail = None
    xattrs: tuple = ()
    if not stat.S_ISLNK(mode):
        names = [n for n in _xattr_names(path) if not n.startswith(tree.OVERLAY_XATTR_PREFIX)]
        xattrs = tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False)) for n in names))
    return (stat.S_IFMT(mode), stat.S_IMODE(mode), st.st_uid, st.st_gid,
            None if stat.S_ISLNK(mode) else st.st_mtime_ns, detail, xattrs)


def _xattr_names(path: bytes) -> List[bytes]:
    try:
        return [os.fsencode(n) for n in os.listxattr(path, follow_symlinks=False)]
    except OSError:
        return []


def aufs_view(layers: List[str], images: Sequence[bool] = ()) -> Dict[bytes, Meta]:
    """The merged view of ``layers`` (topmost first) under aufs's rules, as the migration keeps them
    (``images``: which layers are images', whose aufs internals holding data stay: ``aufs.keeps_for_tar_split``)."""
    roots = [os.fsencode(p) for p in layers]
    image_roots = {r for r, image in zip(roots, images) if image}
    view: Dict[bytes, Meta] = {b".": describe(roots[0])}
    pending = [(b"", roots)]
    while pending:
        rel, contributors = pending.pop()
        decided: Dict[bytes, list] = {}
        blocked: set = set()
        for directory in contributors:
            names = os.listdir(directory)
            kinds = {n: aufs.whiteout_kind(n) for n in names}
            if rel and any(directory.startswith(r + b"/") for r in image_roots):
                kinds.update((n, None) for n, k in kinds.items() if k == aufs.INTERNAL and aufs.kept_in(directory, n))
            hidden = {aufs.whiteout_target(n) for n in names if kinds[n] == aufs.WHITEOUT}
            for name in names:
                if kinds[name] is not None or name in blocked:
                    continue
                path = os.path.join(directory, name)
                is_dir = stat.S_ISDIR(os.lstat(path).st_mode)
                if name not in decided:
                    decided[name] = [path, is_dir]
                    if not is_dir:
                        blocked.add(name)
                elif is_dir:
                    decided[name].append(path)
                else:
                    blocked.add(name)
            blocked |= hidden
            if aufs.OPAQUE in kinds.values() and rel:  # aufs never honours the marker at a branch's root
                break
        for name, (path, is_dir, *below) in decided.items():
            child = os.path.join(rel, name) if rel else name
            view[child] = describe(path)
            if is_dir:
                pending.append((child, [path] + below))
    return view


def mounted_view(top: str) -> Dict[bytes, Meta]:
    """Every path below a mounted overlay (``top`` included, as ``.``)."""
    top_b = os.fsencode(top)
    view = {b".": describe(top_b)}
    for dirpath, dirs, files in os.walk(top_b):
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            view[os.path.relpath(path, top_b)] = describe(path)
    return view


def differences(expected: Dict[bytes, Meta], got: Dict[bytes, Meta]) -> Iterator[str]:
    for path in sorted(set(expected) | set(got)):
        a, b = expected.get(path), got.get(path)
        if a == b:
            continue
        name = path.decode("utf-8", "backslashreplace")
        if a is None:
            yield f"{name}: shown by overlay2, not by aufs"
        elif b is None:
            yield f"{name}: shown by aufs, missing in overlay2"
        else:
            fields = ("type", "mode", "uid", "gid", "mtime", "size/target/device", "xattrs")
            changed = [f"{f} {x!r} != {y!r}" for f, x, y in zip(fields, a, b) if x != y]
            yield f"{name}: " + "; ".join(changed)
