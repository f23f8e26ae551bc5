"""Can this kernel run overlay2 on this filesystem?  Tried, not guessed.

In a temporary directory on the engine root's filesystem (removed afterwards; the root's times are put back),
the probe checks that directory entries carry ``d_type`` (overlayfs needs it to find whiteouts), that
``trusted.*`` xattrs can be set (the opaque marker), that a 0/0 device can be made (a whiteout), and then mounts
an overlay of a lower and an upper directory and checks that the whiteout hides a lower file and the opaque
directory hides the lower directory's content.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from typing import List

import xattr

from migrator import fsio

_libc = ctypes.CDLL(None, use_errno=True)
_libc.opendir.restype = ctypes.c_void_p
_libc.opendir.argtypes = [ctypes.c_char_p]
_libc.readdir.restype = ctypes.c_void_p
_libc.readdir.argtypes = [ctypes.c_void_p]
_libc.closedir.argtypes = [ctypes.c_void_p]
_DT_UNKNOWN = 0
_DIRENT_TYPE_OFFSET = 18  # struct dirent on LP64 glibc: d_ino (8), d_off (8), d_reclen (2), d_type (1), d_name
_MNT_DETACH = 2


@dataclass
class ProbeResult:
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
            ent = _libc.readdir(d)
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
    st = os.lstat(root)
    try:
        base = tempfile.mkdtemp(prefix=".aufs2overlay-probe-", dir=root)
    except OSError as exc:
        result.problems.append(f"the overlay probe cannot run in {root} ({exc.strerror})")
        return result
    try:
        _try(base, result)
    except OSError as exc:
        result.problems.append(f"the overlay probe cannot run in {root} ({exc.strerror})")
    finally:
        shutil.rmtree(base, ignore_errors=True)
        os.utime(root, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        fsio.fsync_path(root)
    return result


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
