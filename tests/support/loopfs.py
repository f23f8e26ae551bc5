"""Small ext4 filesystems on loop devices, and copies of their disks as a power cut would leave them.

Mounted with ``commit=600`` (nothing reaches the disk unless somebody syncs it) and ``noauto_da_alloc`` (no
rescue for files replaced by truncate-and-write), so a copy of the backing file taken while the migrator is
frozen holds exactly what the migrator made durable, plus whatever writeback happened to send: a power cut.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from typing import List, Optional

MOUNT_OPTS = "commit=600,noauto_da_alloc"


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


class LoopFS:
    def __init__(self, image: str, mountpoint: Optional[str] = None, opts: str = MOUNT_OPTS) -> None:
        self.image = image
        self.mountpoint = mountpoint or tempfile.mkdtemp(prefix="a2o-mnt-")
        self.opts = opts
        self.device: Optional[str] = None

    @classmethod
    def create(cls, workdir: str, size_mb: int = 32, inodes: Optional[int] = None, opts: str = MOUNT_OPTS):
        image = os.path.join(workdir, "disk.img")
        with open(image, "wb") as f:
            f.truncate(size_mb << 20)
        extra: List[str] = ["-N", str(inodes)] if inodes else []
        _run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", *extra, image)
        fs = cls(image, opts=opts)
        fs.mount()
        return fs

    def mount(self, readonly: bool = False) -> None:
        self.device = _run("losetup", "-f", "--show", self.image)
        opts = self.opts + (",ro" if readonly else "")
        _run("mount", "-t", "ext4", "-o", opts, self.device, self.mountpoint)

    def remount(self, opts: str) -> None:
        _run("mount", "-o", f"remount,{opts}", self.mountpoint)

    def power_cut_copy(self, dest: str) -> "LoopFS":
        """The disk as it is *now*, without syncing anything: what a power cut at this instant leaves."""
        _run("cp", "--sparse=always", self.image, dest)
        return LoopFS(dest, opts=self.opts)

    def unmount(self) -> None:
        if self.device is None:
            return
        subprocess.run(["umount", self.mountpoint], check=False, capture_output=True)
        subprocess.run(["losetup", "-d", self.device], check=False, capture_output=True)
        self.device = None

    def destroy(self) -> None:
        self.unmount()
        shutil.rmtree(self.mountpoint, ignore_errors=True)
        if os.path.exists(self.image):
            os.unlink(self.image)


def can_loop() -> Optional[str]:
    if os.geteuid() != 0:
        return "needs root for loop devices and mounts"
    if shutil.which("losetup") is None or shutil.which("mkfs.ext4") is None:
        return "losetup or mkfs.ext4 missing"
    return None
