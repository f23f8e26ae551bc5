"""Can this kernel run overlay2 on this filesystem?  Tried, not guessed.

In a temporary directory on the engine root's filesystem (removed afterwards; the root's times are put back),
the probe checks that directory entries carry ``d_type`` (overlayfs needs it to find whiteouts), that
``trusted.*`` xattrs can be set (the opaque marker), that a 0/0 device can be made (a whiteout), and then mounts
an overlay of a lower and an upper directory and checks that the whiteout hides a lower file and the opaque
directory hides the lower directory's content.

The probe is a change to the root, so it is journaled like one: before it creates its directory it keeps the
root's times in an xattr of the root (``ROOT_TIMES``: setting or removing an xattr leaves a directory's times
alone), durably. A probe cut off before it put everything back (a crash, a failed ``unlink`` or ``utimensat``)
is undone by the next probe, or by ``rollback`` (``undo_earlier_probe``): its directory removed, the root's
times put back, the xattr removed.
"""

from __future__ import annotations

import ctypes
import os
import stat
import tempfile
from dataclasses import dataclass, field
from typing import List

import xattr

from migrator.fs import fsio

_libc = ctypes.CDLL(None, use_errno=True)
_libc.opendir.restype = ctypes.c_void_p
_libc.opendir.argtypes = [ctypes.c_char_p]
_libc.readdir64.restype = ctypes.c_void_p
_libc.readdir64.argtypes = [ctypes.c_void_p]
_libc.closedir.argtypes = [ctypes.c_void_p]
_DT_UNKNOWN = 0
# struct dirent64, the same on every architecture (readdir's struct dirent is not: 32-bit ARM has 4-byte
# d_ino and d_off): d_ino (8), d_off (8), d_reclen (2), d_type (1), d_name
_DIRENT_TYPE_OFFSET = 18
_MNT_DETACH = 2
PREFIX = ".aufs2overlay-probe-"
ROOT_TIMES = b"trusted.aufs2overlay.probe-times"  # "atime_ns mtime_ns" of the root before a probe


@dataclass
class ProbeResult:
    ran: bool = False  # False: it could not start (not root, a read-only root); the flags below mean nothing
    d_type: bool = False
    trusted_xattrs: bool = False
    whiteout_devices: bool = False
    overlay_mount: bool = False
    problems: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def has_d_type(path: str) -> bool:
    """True when readdir reports entry types in ``path`` (it must hold at least one entry)."""
    d = _libc.opendir(os.fsencode(path))
    if not d:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    try:
        while True:
            ent = _libc.readdir64(d)
            if not ent:
                return False
            name = ctypes.string_at(ent + _DIRENT_TYPE_OFFSET + 1)
            if name not in (b".", b".."):
                return ctypes.c_ubyte.from_address(ent + _DIRENT_TYPE_OFFSET).value != _DT_UNKNOWN
    finally:
        _libc.closedir(d)


def probe(root: str) -> ProbeResult:
    """Try everything overlay2 needs, on ``root``'s filesystem; leave nothing behind."""
    result = ProbeResult()
    if os.geteuid() != 0:
        result.problems.append("not root: the overlay probe (mknod, trusted.* xattrs, mount) needs root")
        return result
    undo_earlier_probe(root)
    st = os.lstat(root)
    try:
        xattr.set(root, ROOT_TIMES, f"{st.st_atime_ns} {st.st_mtime_ns}".encode(), nofollow=True)
        fsio.fsync_path(root)
        base = tempfile.mkdtemp(prefix=PREFIX, dir=root)
    except OSError as exc:
        result.problems.append(f"the overlay probe cannot run in {root} ({exc.strerror})")
        undo_earlier_probe(root)
        return result
    result.ran = True
    try:
        _try(base, result)
    except OSError as exc:
        result.problems.append(f"the overlay probe cannot run in {root} ({exc.strerror})")
    finally:
        undo_earlier_probe(root)  # a failure here is raised: the next probe or a rollback finishes it
    return result


def leftover_dirs(root: str) -> List[str]:
    """The directories of probes in ``root`` that did not clean up after themselves."""
    return [os.path.join(root, name) for name in os.listdir(root) if name.startswith(PREFIX)]


def undo_earlier_probe(root: str) -> bool:
    """Remove what a probe left in ``root`` and put the root's times back; True when there was anything.
    Idempotent: every step checks before it acts, and the kept times go last."""
    leftovers = leftover_dirs(root)
    for path in leftovers:
        fsio.remove_tree(path)
    try:
        kept = xattr.get(root, ROOT_TIMES, nofollow=True)
    except OSError:
        kept = None  # none kept (ENODATA), or no xattrs here at all: no probe got as far as its directory
    if kept is None and not leftovers:
        return False
    if kept is not None:
        atime_ns, mtime_ns = (int(t) for t in kept.split())
        os.utime(root, ns=(atime_ns, mtime_ns), follow_symlinks=False)
        fsio.fsync_path(root)
        xattr.remove(root, ROOT_TIMES, nofollow=True)
    fsio.fsync_path(root)
    return True


def _try(base: str, result: ProbeResult) -> None:
    lower, upper, work, merged = (os.path.join(base, n) for n in ("lower", "upper", "work", "merged"))
    for d in (lower, upper, work, merged, os.path.join(lower, "d"), os.path.join(upper, "d")):
        os.mkdir(d, 0o700)
    for path in (os.path.join(lower, "kept"), os.path.join(lower, "gone"), os.path.join(lower, "d", "hidden"),
                 os.path.join(upper, "d", "shown")):
        open(path, "wb").close()
    result.d_type = has_d_type(lower)
    if not result.d_type:
        result.problems.append("the filesystem does not report d_type (ext4 and xfs with ftype=1 do): "
                               "overlayfs cannot find whiteouts on it")
    try:
        xattr.set(os.path.join(upper, "d"), b"trusted.overlay.opaque", b"y")
        result.trusted_xattrs = True
    except OSError as exc:
        result.problems.append(f"trusted.* xattrs cannot be set here ({exc.strerror})")
    try:
        os.mknod(os.path.join(upper, "gone"), stat.S_IFCHR | 0o600, os.makedev(0, 0))
        result.whiteout_devices = True
    except OSError as exc:
        result.problems.append(f"whiteout devices cannot be made here ({exc.strerror})")
    options = f"lowerdir={lower},upperdir={upper},workdir={work}".encode()
    if _libc.mount(b"overlay", merged.encode(), b"overlay", 0, options) != 0:
        err = ctypes.get_errno()
        result.problems.append(f"the kernel cannot mount overlay here ({os.strerror(err)}; is the overlay module "
                               "loaded?)")
        return
    try:
        seen = sorted(os.listdir(merged)), sorted(os.listdir(os.path.join(merged, "d")))
    finally:
        _libc.umount2(merged.encode(), _MNT_DETACH)
    result.overlay_mount = True
    if result.trusted_xattrs and result.whiteout_devices and seen != (["d", "kept"], ["shown"]):
        result.problems.append(f"overlay mounted but ignored whiteouts or the opaque marker (saw {seen})")
