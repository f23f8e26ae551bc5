"""A VM with a real aufs: the oracle of record for what aufs shows, and the place where real engines run on it.

The kernel is ``../shared/fixtures/aufs-kernel/bzImage`` (Linux 6.1 with aufs6.1 built in; ``A2O_AUFS_KERNEL``
names another, and that folder's README and ``build-kernel`` say how to build one).  qemu boots it under TCG
(a KVM guest hangs at boot on these machines) with this machine's root as its own, read-only over 9p, so the
guest has this checkout, its venv, dockerd 20.10 and runc; PID 1 is ``guest/init``, which runs
``guest/agent.py``.  The host talks to the agent over a virtio-serial port (``Guest.call``); a share (a folder
of the host, read-write over 9p) carries files both ways; disks are raw ext4 images on virtio (``/dev/vda``…).

Every boot has a time limit: a watchdog kills qemu when it is over, and the next call says so.  A power cut
(``power_cut``) restarts the guest's kernel at once with nothing synced; qemu (``-no-reboot``) then exits, and
what the guest had written to its disks is what they hold.
"""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from typing import Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
DEFAULT_KERNEL = os.path.join(REPO, "..", "shared", "fixtures", "aufs-kernel", "bzImage")
KERNEL = os.path.abspath(os.environ.get("A2O_AUFS_KERNEL", DEFAULT_KERNEL))
QEMU = "qemu-system-x86_64"
HEADER_SIZE = 8


def missing() -> Optional[str]:
    """None when an aufs guest can boot here, else the one line that says what is missing."""
    if os.geteuid() != 0:
        return "the aufs VM needs root (9p passthrough of owners and devices, loop mounts)"
    if shutil.which(QEMU) is None:
        return f"{QEMU} is not installed: apt-get install -y qemu-system-x86 (the README's test command does)"
    if not os.path.isfile(KERNEL):
        return (f"no aufs kernel at {KERNEL}: set A2O_AUFS_KERNEL, or build one with "
                "../shared/fixtures/aufs-kernel/build-kernel (its README says how)")
    return None


class GuestError(RuntimeError):
    """The guest failed: qemu or its kernel died, the agent raised, or the boot ran over its time limit."""


class Guest:
    """One boot of the aufs kernel.  ``disks``: raw images, in order ``/dev/vda``, ``/dev/vdb``…; ``share``:
    a host folder, ``/run/a2o/share`` in the guest (a new temporary one by default); ``time_limit``: seconds
    from the start of qemu after which the watchdog kills it."""

    def __init__(self, disks: Sequence[str] = (), share: Optional[str] = None, time_limit: float = 900,
                 memory_mb: int = 3072, cpus: int = 2) -> None:
        reason = missing()
        if reason:
            raise GuestError(reason)
        self.disks = list(disks)
        self.workdir = tempfile.mkdtemp(prefix="a2o-vm-", dir="/tmp")
        self.share = share or os.path.join(self.workdir, "share")
        os.makedirs(self.share, exist_ok=True)
        self.time_limit = time_limit
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.console = os.path.join(self.workdir, "console.log")
        self.sock_path = os.path.join(self.workdir, "ctl")
        self.proc: Optional[subprocess.Popen] = None
        self.sock: Optional[socket.socket] = None
        self.hello: Dict[str, object] = {}
        self.started = 0.0
        self.timed_out = False
        self._watchdog: Optional[threading.Timer] = None
        self._pending: Optional["Pending"] = None

    # -- the boot ------------------------------------------------------------------------------------------

    def command(self) -> List[str]:
        python = os.path.realpath(os.path.join(REPO, ".venv", "bin", "python"))
        venv_python = os.path.join(REPO, ".venv", "bin", "python")
        python = venv_python if os.path.exists(venv_python) else python
        # cache=loose: the guest keeps what it read of this machine's root (which does not change under it), so
        # an interpreter's thousands of lookups cost one round trip each once, not at every start
        append = (f"console=ttyS0 root=hostroot rootfstype=9p rootflags=trans=virtio,version=9p2000.L,"
                  f"msize=262144,cache=loose ro init={HERE}/guest/init panic=-1 quiet a2o.python={python} "
                  f"a2o.repo={REPO}")
        cmd = [QEMU, "-accel", "tcg", "-smp", str(self.cpus), "-m", str(self.memory_mb), "-no-reboot",
               "-display", "none", "-monitor", "none", "-serial", f"file:{self.console}",
               "-kernel", KERNEL, "-append", append,
               "-virtfs", "local,path=/,mount_tag=hostroot,security_model=passthrough,readonly=on,multidevs=remap",
               "-virtfs", f"local,path={self.share},mount_tag=a2oshare,security_model=passthrough,multidevs=remap",
               "-device", "virtio-serial-pci", "-chardev", f"socket,id=ctl,path={self.sock_path},server=on,wait=off",
               "-device", "virtserialport,chardev=ctl,name=a2o"]
        for disk in self.disks:
            cmd += ["-drive", f"file={disk},if=virtio,format=raw,cache=unsafe"]
        return cmd

    def start(self, boot_timeout: float = 180) -> "Guest":
        self.started = time.monotonic()
        self.timed_out = False
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=open(os.path.join(self.workdir, "qemu.err"), "wb"),
                                     start_new_session=True)
        self._watchdog = threading.Timer(self.time_limit, self._over_time)
        self._watchdog.daemon = True
        self._watchdog.start()
        deadline = time.monotonic() + boot_timeout
        while True:
            self._check_alive("while booting")
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(self.sock_path)
                break
            except OSError:
                sock.close()
            if time.monotonic() > deadline:
                self.kill()
                raise GuestError(f"qemu did not open its control socket within {boot_timeout:.0f} s"
                                 + self._tail())
            time.sleep(0.05)
        self.sock = sock
        kind, hello = self._receive(max(1.0, deadline - time.monotonic()))
        if kind != "hello":
            raise GuestError(f"the guest agent said {kind!r} first" + self._tail())
        self.hello = hello
        if not hello.get("aufs"):
            self.kill()
            raise GuestError(f"the kernel {KERNEL} ({hello.get('release')}) has no aufs")
        return self

    def _over_time(self) -> None:
        self.timed_out = True
        self.kill()

    def _check_alive(self, doing: str) -> None:
        if self.timed_out:
            raise GuestError(f"the guest ran over its time limit of {self.time_limit:.0f} s {doing}" + self._tail())
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise GuestError(f"qemu exited ({code}) {doing}" + self._tail())

    def _tail(self, lines: int = 25) -> str:
        out = []
        for path in (os.path.join(self.workdir, "qemu.err"), self.console):
            try:
                with open(path, errors="replace") as f:
                    text = f.read().splitlines()[-lines:]
            except OSError:
                continue
            if text:
                out.append(f"--- {os.path.basename(path)}:\n" + "\n".join(text))
        return ("\n" + "\n".join(out)) if out else ""

    # -- requests ------------------------------------------------------------------------------------------

    def _receive(self, timeout: float):
        assert self.sock is not None
        self.sock.settimeout(timeout)
        try:
            header = self._read(HEADER_SIZE)
            size = int.from_bytes(header, "big")
            return pickle.loads(self._read(size))
        except (socket.timeout, EOFError, OSError) as exc:
            self._check_alive(f"(waiting for the agent: {exc!r})")
            raise GuestError(f"the agent did not answer within {timeout:.0f} s" + self._tail()) from exc

    def _read(self, n: int) -> bytes:
        assert self.sock is not None
        chunks = []
        while n:
            chunk = self.sock.recv(min(n, 1 << 20))
            if not chunk:
                raise EOFError("the control socket closed")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def call(self, op: str, timeout: float = 300, **kwargs):
        """Run ``op`` in the agent and return its value; raise ``GuestError`` with the agent's traceback."""
        return self.send(op, **kwargs).result(timeout)

    def send(self, op: str, **kwargs) -> "Pending":
        """Start ``op`` in the agent and return at once: the host can work meanwhile.  The answer must be
        taken (``Pending.result``) before the next request."""
        if self._pending is not None:
            self._pending.result()
        self._check_alive(f"before {op}")
        data = pickle.dumps((op, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        assert self.sock is not None
        self.sock.sendall(len(data).to_bytes(HEADER_SIZE, "big") + data)
        self._pending = Pending(self, op)
        return self._pending

    def sh(self, cmd: str, timeout: float = 300, check: bool = True, env: Optional[dict] = None) -> str:
        """A shell command in the guest; its stdout (text).  ``check``: raise on a non-zero exit."""
        code, out, err = self.call("sh", timeout=timeout + 30, cmd=cmd, limit=timeout, env=env)
        if check and code != 0:
            raise GuestError(f"guest: `{cmd[:300]}` exited {code}:\n{err.decode(errors='replace')[-3000:]}"
                             f"\n{out.decode(errors='replace')[-1000:]}")
        return out.decode(errors="replace")

    # -- the end -------------------------------------------------------------------------------------------

    def power_cut(self, wait: float = 60) -> None:
        """Cut the power: nothing the guest's kernel holds in memory reaches its disks."""
        assert self.sock is not None
        data = pickle.dumps(("power_cut", {}), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self.sock.sendall(len(data).to_bytes(HEADER_SIZE, "big") + data)
        except OSError:
            pass
        self._wait_exit(wait)

    def cut_by(self, op: str, timeout: float = 300, wait: float = 60, **kwargs) -> None:
        """Send ``op``, a request that ends in a power cut the guest makes itself (at a moment only the guest
        can catch); return once qemu has exited.  Raise ``GuestError`` when the agent answers instead (the op
        could not cut: its answer says why) or the guest runs over its time limit."""
        self._check_alive(f"before {op}")
        data = pickle.dumps((op, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        assert self.sock is not None and self.proc is not None
        self.sock.sendall(len(data).to_bytes(HEADER_SIZE, "big") + data)
        try:
            kind, value = self._receive(timeout)
        except GuestError:
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired as exc:
                raise GuestError(f"{op}: the agent stopped answering but qemu did not exit" + self._tail()) from exc
            if self.timed_out:
                raise
            self._close()
            return
        raise GuestError(f"{op} answered ({kind}) instead of cutting the power: {value!r}")

    def power_off(self, wait: float = 120) -> None:
        """A clean shutdown: the agent syncs, the kernel powers off."""
        try:
            self.call("power_off", timeout=wait)
        except GuestError:
            pass
        self._wait_exit(wait)

    def _wait_exit(self, wait: float) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            self.kill()
        self._close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close()

    def _close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "Guest":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()


class Pending:
    """A request sent to the agent, its answer not yet read."""

    def __init__(self, guest: Guest, op: str) -> None:
        self.guest = guest
        self.op = op
        self.done = False
        self.value: object = None

    def result(self, timeout: float = 900):
        if not self.done:
            self.done = True
            self.guest._pending = None
            kind, value = self.guest._receive(timeout)
            if kind != "ok":
                raise GuestError(f"{self.op} failed in the guest:\n{value}")
            self.value = value
        return self.value


def ext4_image(path: str, trees: Dict[str, str], size_mb: int = 0) -> None:
    """An ext4 filesystem in the file ``path`` holding a copy of each host folder of ``trees`` (name in the
    image -> folder), made with ``cp -a``: owners, modes, nanosecond times, xattrs (``trusted.*`` too),
    devices, sockets, hardlink groups and holes as they are (``mkfs.ext4 -d`` would cut times to seconds)."""
    if not size_mb:
        used = sum(_du(t) for t in trees.values())
        size_mb = max(64, 3 * used // (1 << 20) + 32)
    with open(path, "wb") as f:
        f.truncate(size_mb << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-I", "256", "-O", "^has_journal", "-E", "root_owner=0:0",
                    path], check=True, capture_output=True)
    mnt = tempfile.mkdtemp(prefix="a2o-img-")
    subprocess.run(["mount", "-o", "loop", path, mnt], check=True, capture_output=True)
    try:
        for name, tree in trees.items():
            os.makedirs(os.path.dirname(os.path.join(mnt, name)), exist_ok=True)
            res = subprocess.run(["cp", "-a", "--sparse=always", tree, os.path.join(mnt, name)],
                                 capture_output=True, text=True)
            if res.returncode != 0:
                raise GuestError(f"copying {tree} into the image: {res.stderr.strip()}")
    finally:
        subprocess.run(["umount", mnt], check=True, capture_output=True)
        os.rmdir(mnt)


def _du(tree: str) -> int:
    out = subprocess.run(["du", "-s", "--block-size=1", tree], capture_output=True, text=True).stdout.split()
    return int(out[0]) if out else 0
