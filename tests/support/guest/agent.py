"""The agent in the aufs guest: answers the host's requests over a virtio-serial port (tests/support/aufsvm.py).

Each request is a pickled ``(op, kwargs)`` framed by its length; each answer ``("ok", value)`` or ``("error",
traceback text)``.  The ops: ``sh`` (a shell command, its exit code and output), ``views`` (mount chains of
branches with the real aufs or overlayfs and describe what each shows, entry by entry), ``power_cut`` (the
kernel reboots at once, nothing synced: qemu, started with ``-no-reboot``, exits) and ``power_off`` (sync,
then off).  Test code: it runs as PID 1's child in a throwaway VM, trusting the host it serves.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import pickle
import shutil
import stat
import struct
import subprocess
import sys
import traceback
from typing import Dict, List, Optional, Tuple

from tests.support.manifest import described

HEADER = struct.Struct(">Q")
PORT_NAME = "a2o"
_libc = ctypes.CDLL(None, use_errno=True)


def _port() -> str:
    base = "/sys/class/virtio-ports"
    for dev in sorted(os.listdir(base)):
        with open(os.path.join(base, dev, "name")) as f:
            if f.read().strip() == PORT_NAME:
                return os.path.join("/dev", dev)
    raise RuntimeError("no virtio port named " + PORT_NAME)


def mount(source: str, target: str, fstype: str, options: str, flags: int = 0) -> None:
    if _libc.mount(source.encode(), os.fsencode(target), fstype.encode(), flags, options.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount -t {fstype} -o {options[:300]}: {os.strerror(err)}", target)


def umount(target: str) -> None:
    if _libc.umount2(os.fsencode(target), 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


MS_REMOUNT = 32
MS_RDONLY = 1
PAGE = 4096


def mount_aufs(target: str, branches: List[Tuple[str, str]]) -> None:
    """aufs as moby's driver mounts it (``aufs.go``, ``aufsMount``): ``br:<top>=rw:<lower>=ro+wh:…`` with
    ``dio,xino=/dev/shm/aufs.xino,dirperm1``; branches that do not fit in a page are appended by remounts."""
    opts = "dio,xino=/dev/shm/aufs.xino,dirperm1"
    data = "br:" + ":".join(f"{path}={perm}" for path, perm in branches[:1])
    rest = list(branches[1:])
    while rest and len(data) + len(rest[0][0]) + 8 + len(opts) < PAGE - 64:
        path, perm = rest.pop(0)
        data += f":{path}={perm}"
    mount("none", target, "aufs", f"{data},{opts}")
    for path, perm in rest:
        mount("none", target, "aufs", f"append:{path}={perm}", MS_REMOUNT)


def view(top: str) -> Tuple[Dict[bytes, tuple], List[List[bytes]]]:
    """What the mount at ``top`` shows: every path (``.`` for the top) described as ``manifest.describe``
    does, or ``("error", errno name)`` where the kernel refuses the name (aufs answers EIO for some broken
    branches); and the hardlink groups (paths of one inode, two or more)."""
    top_b = os.fsencode(top)
    entries: Dict[bytes, tuple] = {}
    inodes: Dict[Tuple[int, int], List[bytes]] = {}
    pending = [b""]
    while pending:
        rel = pending.pop()
        path = os.path.join(top_b, rel) if rel else top_b
        try:
            st = os.lstat(path)
            entries[rel or b"."] = described(path, st)
        except OSError as exc:
            entries[rel or b"."] = ("error", errno.errorcode.get(exc.errno, str(exc.errno)))
            continue
        if not stat.S_ISDIR(st.st_mode):
            inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
            continue
        try:
            names = os.listdir(path)
        except OSError as exc:
            entries[(rel or b".") + b"/ (listing)"] = ("error", errno.errorcode.get(exc.errno, str(exc.errno)))
            continue
        for name in names:
            pending.append(os.path.join(rel, name) if rel else name)
    groups = sorted(sorted(paths) for paths in inodes.values() if len(paths) > 1)
    return entries, groups


def op_views(image: str, chains: Dict[str, dict], writable: bool = True) -> Dict[str, object]:
    """Mount ``image`` (an ext4 filesystem in a file of the share), then each chain in turn and its view.
    A chain is ``{"fs": "aufs", "branches": [(path, perm), ...]}`` (paths relative to the image; a first
    branch of ``None`` is an empty writable directory on tmpfs standing for a new container's layer, given the
    attributes of the next branch's root) or ``{"fs": "overlay", "lower": "l/A:l/B", "top": "<id>/diff",
    "cwd": "overlay2"}``.  A chain whose mount fails gives ``("mount-error", message)``."""
    fsdir = "/mnt/a2o-fs"
    mnt = "/mnt/a2o-view"
    for d in (fsdir, mnt):
        os.makedirs(d, exist_ok=True)
    out: Dict[str, object] = {}
    with Loop(image) as loop:
        mount(loop, fsdir, "ext4", "" if writable else "noload", 0 if writable else MS_RDONLY)
        try:
            for name, chain in chains.items():
                out[name] = _one_view(fsdir, mnt, chain)
        finally:
            umount(fsdir)
    return out


class Loop:
    """A loop device over a file, by ioctl (a process costs a third of a second under TCG)."""

    GET_FREE, SET_FD, CLR_FD = 0x4C82, 0x4C00, 0x4C01

    def __init__(self, image: str) -> None:
        self.image = image
        self.path = ""

    def __enter__(self) -> str:
        ctl = os.open("/dev/loop-control", os.O_RDWR)
        try:
            n = fcntl.ioctl(ctl, self.GET_FREE)
        finally:
            os.close(ctl)
        self.path = f"/dev/loop{n}"
        self.fd = os.open(self.path, os.O_RDWR)
        backing = os.open(self.image, os.O_RDWR)
        try:
            fcntl.ioctl(self.fd, self.SET_FD, backing)
        finally:
            os.close(backing)
        return self.path

    def __exit__(self, *exc) -> None:
        try:
            fcntl.ioctl(self.fd, self.CLR_FD, 0)
        finally:
            os.close(self.fd)


def views_in(fsdir: str, chains: Dict[str, dict]) -> Dict[str, object]:
    """``op_views`` on a filesystem already mounted at ``fsdir`` (an engine's data disk): the chains' paths are
    relative to ``fsdir``."""
    mnt = "/mnt/a2o-view"
    os.makedirs(mnt, exist_ok=True)
    return {name: _one_view(fsdir, mnt, chain) for name, chain in chains.items()}


def _one_view(fsdir: str, mnt: str, chain: dict) -> object:
    scratch = None
    try:
        if chain["fs"] == "aufs":
            branches = []
            for path, perm in chain["branches"]:
                if path is None:
                    scratch = _scratch_like(os.path.join(fsdir, chain["branches"][1][0]))
                    branches.append((scratch, perm))
                else:
                    branches.append((os.path.join(fsdir, path), perm))
            mount_aufs(mnt, branches)
        else:
            os.makedirs("/tmp/a2o-empty", exist_ok=True)  # a read-only overlay needs two layers at least
            lowers = [chain["top"]] + ([chain["lower"]] if chain.get("lower") else []) + ["/tmp/a2o-empty"]
            cwd = os.getcwd()
            os.chdir(os.path.join(fsdir, chain.get("cwd", "")))
            try:
                mount("overlay", mnt, "overlay", "lowerdir=" + ":".join(lowers), MS_RDONLY)
            finally:
                os.chdir(cwd)
    except OSError as exc:
        return ("mount-error", str(exc))
    try:
        return view(mnt)
    finally:
        umount(mnt)
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


_scratch_count = 0


def _scratch_like(root: str) -> str:
    """An empty writable branch on tmpfs with the mode, owner and times of ``root``: the new container's layer
    a container of an image has above the image's layers (aufs shows the top branch's root attributes)."""
    global _scratch_count
    _scratch_count += 1
    path = f"/tmp/a2o-scratch-{_scratch_count}"
    os.mkdir(path)
    st = os.lstat(root)
    os.chown(path, st.st_uid, st.st_gid)
    os.chmod(path, stat.S_IMODE(st.st_mode))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    return path


def op_sh(cmd: str, limit: Optional[float] = None, env: Optional[dict] = None) -> Tuple[int, bytes, bytes]:
    res = subprocess.run(["/bin/sh", "-c", cmd], capture_output=True, timeout=limit,
                         env=dict(os.environ, **(env or {})))
    return res.returncode, res.stdout, res.stderr


def op_call(module: str, function: str, kwargs: Optional[dict] = None) -> object:
    """Call ``function`` of ``module`` (one of ``tests.support``, e.g. ``guestengine``) with ``kwargs``: test
    helpers that run in the guest and keep their state (a started engine) in this process between requests."""
    import importlib

    if not module.startswith("tests.support."):
        raise ValueError(f"not a test support module: {module}")
    return getattr(importlib.import_module(module), function)(**(kwargs or {}))


def op_power_cut() -> None:
    """A power cut: the kernel restarts at once, syncing nothing (``-no-reboot`` turns that into qemu's exit)."""
    with open("/proc/sysrq-trigger", "w") as f:
        f.write("b")


def op_power_off() -> None:
    os.sync()
    with open("/proc/sysrq-trigger", "w") as f:
        f.write("o")


OPS = {"sh": op_sh, "views": op_views, "power_cut": op_power_cut, "power_off": op_power_off,
       "ping": lambda: "pong", "views_in": views_in, "call": op_call}


def _read_exact(fd: int, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def _send(fd: int, obj: object) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    data = HEADER.pack(len(data)) + data
    while data:
        data = data[os.write(fd, data):]


def main() -> int:
    fd = os.open(_port(), os.O_RDWR)
    uname = os.uname()
    with open("/proc/filesystems") as f:
        filesystems = f.read().split()
    _send(fd, ("hello", {"release": uname.release, "aufs": "aufs" in filesystems, "pid": os.getpid()}))
    while True:
        try:
            (size,) = HEADER.unpack(_read_exact(fd, HEADER.size))
            op, kwargs = pickle.loads(_read_exact(fd, size))
        except EOFError:
            return 0
        try:
            result = ("ok", OPS[op](**kwargs))
        except BaseException:  # noqa: B036  every failure goes back to the host as text
            result = ("error", traceback.format_exc())
        _send(fd, result)
        if op == "power_off":
            return 0


if __name__ == "__main__":
    sys.exit(main())
