"""Is a container engine using this root right now?  (A migration under a running engine loses data.)"""

from __future__ import annotations

import os
from typing import Iterable, List, Optional, Sequence, Tuple

from migrator.errors import Refused

DEFAULT_PIDFILES = (
    "/var/run/docker.pid",
    "/run/docker.pid",
    "/var/run/balena-engine.pid",
    "/run/balena-engine.pid",
    "/var/run/balena.pid",
    "/run/balena.pid",
)
ENGINE_NAMES = ("dockerd", "balena")


def _unescape_mountinfo(field: str) -> str:
    return field.encode().decode("unicode_escape").encode("latin-1").decode("utf-8", "surrogateescape")


def mounts_under(root: str) -> List[str]:
    """Mount points below the engine's layer and container directories (an engine running, or crashed)."""
    root = os.path.realpath(root)
    watched = tuple(os.path.join(root, d) + "/" for d in ("aufs/mnt", "overlay2", "containers"))
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            mountpoint = _unescape_mountinfo(line.split()[4])
            if mountpoint.startswith(watched):
                found.append(mountpoint)
    return found


def live_engine_pids(pidfiles: Iterable[str]) -> List[str]:
    """``pidfile: pid (exe)`` for each pidfile whose pid is a live engine process (stale pidfiles are ignored)."""
    live = []
    for pidfile in pidfiles:
        try:
            with open(pidfile, encoding="ascii", errors="replace") as f:
                pid = int(f.read().strip() or 0)
        except (OSError, ValueError):
            continue
        if pid <= 0:
            continue
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            continue
        if any(name in os.path.basename(exe) for name in ENGINE_NAMES):
            live.append(f"{pidfile}: pid {pid} ({exe})")
    return live


def running_engine(root: str, pidfiles: Iterable[str]) -> List[str]:
    """Every sign that an engine runs on ``root``; empty when none."""
    return [f"mounted: {m}" for m in mounts_under(root)] + live_engine_pids(pidfiles)


def kind(root: str) -> Tuple[str, str]:
    """docker or balena-engine, and why: balena-engine's roots are named after it (/var/lib/balena-engine;
    balenaOS's /mnt/data/docker is a docker-named root of balena-engine but its pidfile says so)."""
    if "balena" in os.path.basename(os.path.normpath(root)):
        return "balena-engine", f"the root is named {os.path.basename(os.path.normpath(root))}"
    for pidfile in (p for p in DEFAULT_PIDFILES if "balena" in p):
        if os.path.exists(pidfile):
            return "balena-engine", f"{pidfile} exists"
    return "docker", "the root is not named after balena-engine and no balena-engine pidfile exists"


def pidfiles_or_default(pidfiles: Optional[Sequence[str]]) -> Sequence[str]:
    return pidfiles if pidfiles is not None else DEFAULT_PIDFILES


def refuse_if_running(root: str, pidfiles: Optional[Sequence[str]]) -> None:
    """Refused while an engine uses ``root`` (``pidfiles``: None for the defaults)."""
    signs = running_engine(root, pidfiles_or_default(pidfiles))
    if signs:
        raise Refused(f"an engine is using {root} ({signs[0]}); stop it first")
