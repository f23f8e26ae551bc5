"""What a container sees, for ``verify``: the view a chain of aufs layers must give once migrated, and what a
mounted overlay shows, as comparable lists.

Both views describe each path by type, permission bits, owner, mtime (not of symlinks), size, symlink target,
device numbers and xattrs (but ``trusted.overlay.*``, which overlayfs hides).  File content is not compared:
image layers are hardlinks (the same inode on both sides) and a writable layer is a copy made with its data.
The expected view follows the one merge model of the migration (``formats/lowerview.py``: which directories
of the ancestors each directory merges with); within a directory, the topmost layer that has a name decides
it, ``.wh.<name>`` hides ``<name>`` below its own layer (the layer's own ``<name>`` beside it stays), and every
``.wh.`` name is left out but an aufs internal an image layer keeps (``aufs.keeps_for_tar_split``).  Where aufs
itself showed otherwise, the migration says so in a finding (docs/design.md, "Where the view differs from
aufs"): ``verify`` checks the conversion, not aufs's quirks.
"""

from __future__ import annotations

import os
import stat
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from migrator.formats import aufs, lowerview
from migrator.fs import fsio, tree

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
    """The view the migrated chain ``layers`` (aufs data, topmost first) must give (``images``: which layers
    are images', whose aufs internals holding data stay)."""
    top = fsio.open_dir(layers[0], noatime=True)
    merge = lowerview.root([lowerview.Lower(p) for p in layers[1:]])
    owners = {path: image for path, image in zip(layers, images)}
    view: Dict[bytes, Meta] = {b".": describe(os.fsencode(layers[0]))}
    try:
        _view_of(top, merge, b"", view, owners, bool(images and images[0]))
    finally:
        os.close(top)
        merge.close()
    return view


def _view_of(own: Optional[int], merge: lowerview.Merge, rel: bytes, view: Dict[bytes, Meta],
             owners: Dict[str, bool], own_image: bool) -> None:
    """The entries of directory ``rel``: from the layer's own directory ``own`` (None: it has none there) and
    the ancestors' directories ``merge`` holds, nearest first."""
    sources = ([(own, own_image)] if own is not None else []) + [(fd, owners.get(lower.path, False))
                                                                   for fd, lower in merge.dirs]
    decided: Dict[bytes, Tuple[int, int, bool]] = {}  # name -> (source index, its directory fd, a directory?)
    hidden: set = set()
    whited_in_own: set = set()
    for i, (fd, image) in enumerate(sources):
        names = tree.entry_kinds(fd, as_bytes=True)
        kinds = {n: aufs.whiteout_kind(n) for n in names}
        kept = {n for n, k in kinds.items() if k == aufs.INTERNAL and image and rel and aufs.keeps_for_tar_split(fd, n)}
        for name, kind in kinds.items():
            if (kind is None or name in kept) and name not in decided and name not in hidden:
                decided[name] = (i, fd, names[name])
        whiteouts = {aufs.whiteout_target(n) for n, k in kinds.items() if k == aufs.WHITEOUT}
        if i == 0 and own is not None:
            whited_in_own = whiteouts
        hidden |= whiteouts
    for name, (i, fd, is_dir) in sorted(decided.items()):
        child = rel + b"/" + name if rel else name
        view[child] = describe(b"/proc/self/fd/%d/%s" % (fd, name))
        if not is_dir:
            continue
        own_child = fsio.open_dir(os.fsdecode(name), fd, noatime=True) if i == 0 and own is not None else None
        try:
            opaque = own_child is not None and lowerview.layer_marks(own, name, own_child)[1]
            sub = merge.child(name, own_child is not None and name in whited_in_own, opaque)
            try:
                _view_of(own_child, sub, child, view, owners, own_image)
            finally:
                sub.close()
        finally:
            if own_child is not None:
                os.close(own_child)


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
