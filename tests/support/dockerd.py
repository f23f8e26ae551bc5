"""A private dockerd for the tests: its own data root, exec root, pidfile and socket; stopped by its pid."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from typing import Optional

DOCKERD = shutil.which("dockerd") or "/usr/sbin/dockerd"
# Prefer the engine's own client (Debian's docker.io): a newer client lacks the classic builder's defaults.
DOCKER = "/usr/bin/docker" if os.path.exists("/usr/bin/docker") else (shutil.which("docker") or "docker")


def available() -> Optional[str]:
    """None when a private dockerd can run here, else the reason it cannot."""
    if os.geteuid() != 0:
        return "needs root to run dockerd"
    if not os.path.exists(DOCKERD):
        return "dockerd is not installed (apt-get install -y docker.io)"
    return None


def _mounts_under(prefix: str):
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].encode().decode("unicode_escape") for line in f]
    return [p for p in points if p == prefix or p.startswith(prefix.rstrip("/") + "/")]


class Dockerd:
    def __init__(self, data_root: str) -> None:
        self.data_root = data_root
        self.base = tempfile.mkdtemp(prefix="a2o-dk-", dir="/tmp")  # short: the socket path must fit 108 bytes
        self.exec_root = os.path.join(self.base, "exec")
        self.pidfile = os.path.join(self.base, "pid")
        self.sock = os.path.join(self.base, "sock")
        self.log = os.path.join(self.base, "log")
        self.proc: Optional[subprocess.Popen] = None

    @property
    def env(self) -> dict:
        env = dict(os.environ)
        env.update(DOCKER_HOST=f"unix://{self.sock}", DOCKER_BUILDKIT="0", DOCKER_CLI_HINTS="false")
        return env

    def start(self, timeout: float = 60, storage_driver: Optional[str] = "overlay2") -> None:
        """Start it and wait until it answers (``storage_driver`` None: none configured, the engine picks)."""
        driver = ["--storage-driver", storage_driver] if storage_driver else []
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [DOCKERD, "--data-root", self.data_root, "--exec-root", self.exec_root, "--pidfile", self.pidfile,
                 "-H", f"unix://{self.sock}", *driver, "--iptables=false", "--ip6tables=false", "--bridge=none"],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited with {self.proc.returncode}:\n{self.log_tail()}")
            res = subprocess.run([DOCKER, "version"], env=self.env, capture_output=True)
            if res.returncode == 0:
                return
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"dockerd did not answer within {timeout}s:\n{self.log_tail()}")

    def start_error(self, timeout: float = 60) -> str:
        """Start it with no storage driver configured, expecting it to exit: the line that says why."""
        try:
            self.start(timeout, storage_driver=None)
        except RuntimeError:
            lines = [line for line in self.log_tail(400).splitlines() if "failed to start daemon" in line]
            return lines[-1] if lines else self.log_tail(5)
        finally:
            self.stop()
        raise AssertionError("dockerd started")

    def log_tail(self, n: int = 40) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def docker(self, *args: str, input: Optional[bytes] = None, check: bool = True,
               timeout: float = 300) -> subprocess.CompletedProcess:
        res = subprocess.run([DOCKER, *args], env=self.env, input=input, capture_output=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} failed ({res.returncode}):\n"
                                 f"{res.stderr.decode(errors='replace')}")
        return res

    def out(self, *args: str, **kw) -> str:
        return self.docker(*args, **kw).stdout.decode()

    def stop(self) -> None:
        """SIGTERM by pid, SIGKILL after 30 s; then the leftovers: its containerd, and any mount it left."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if self.base.encode() in cmd:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for prefix in (self.exec_root, self.data_root):
            for point in sorted(_mounts_under(prefix), key=len, reverse=True):
                subprocess.run(["umount", "-l", point], capture_output=True)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


def saved_layer_digests(engine, ref):
    """sha256 of each layer tar of ``docker save``, and the image's rootfs.diff_ids."""
    data = engine.docker("save", ref).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        manifest_ = json.load(tar.extractfile("manifest.json"))[0]
        config = json.load(tar.extractfile(manifest_["Config"]))
        digests = ["sha256:" + hashlib.sha256(tar.extractfile(p).read()).hexdigest() for p in manifest_["Layers"]]
    return data, digests, config["rootfs"]["diff_ids"]


def assert_balena_root_runs(root):
    """A real dockerd on the migrated balena root: both images there, `docker save` gives the layer digests
    (diff ids), and a container sees the files the Dockerfile left (SPEC.md, "A real aufs root")."""
    engine = Dockerd(root)
    try:
        engine.start()
        repos = engine.out("image", "ls", "--format", "{{.Repository}}").split()
        assert "a2o-test" in repos and "busybox" in repos
        _data, digests, diff_ids = saved_layer_digests(engine, "a2o-test")
        assert digests == diff_ids
        out = engine.out("run", "--rm", "a2o-test", "sh", "-c",
                         "ls /tmp/f1 2>&1; ls -A /tmp/d1; ls /tmp/hlkn /tmp/slkn; readlink /tmp/slkn")
        lines = out.splitlines()
        assert "No such file" in lines[0]
        assert lines[1:] == ["d1f2", "/tmp/hlkn", "/tmp/slkn", "/tmp/d1/d1f2"]
    finally:
        engine.cleanup()
