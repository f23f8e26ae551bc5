"""A real engine inside the aufs guest (``aufsvm.py``), driven from the host through the agent's ``call`` op.

The functions here run in the guest's agent process (``guest/agent.py``, ``op_call``): a private dockerd 20.10
(``/usr/sbin/dockerd``) on the data disk with its own exec root, pidfile and socket, spoken to over its socket
with the Engine API (the ``docker`` client is what an operator types, but each of its runs costs seconds of Go
start-up under TCG; its requests are these ones), the migrator run as operators run it (``python -m migrator``
in its own process), and what aufs or overlayfs shows for each image and container (the agent's ``view``,
each chain mounted as moby mounts it).

The host side is ``Remote``: ``Remote(guest).engine_start(root=..., driver="aufs")`` calls ``engine_start`` in
the guest and returns its value.  Test code: it trusts the host it serves.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import tarfile
import time
import urllib.parse
from typing import Dict, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The engine's programs, copied once a boot from the host's root (9p: a Go program there takes seconds to
# start under TCG, pages read over 9p) to a tmpfs, and found there first: dockerd, the containerd it starts,
# the shim containerd starts per container, the runc the shim runs.
PROGRAMS = ("/usr/sbin/dockerd", "/usr/bin/containerd", "/usr/bin/containerd-shim-runc-v2", "/usr/sbin/runc",
            "/usr/bin/docker-init")
BIN = "/run/a2o-bin"
DOCKERD = BIN + "/dockerd"
API = "/v1.41"
BASE = "/run/a2o-engine"  # short: the socket path must fit in 108 bytes
SOCK = BASE + "/sock"
PIDFILE = BASE + "/pid"
EXEC_ROOT = BASE + "/exec"
SHARE = "/run/a2o/share"
KINDS = {0: "C", 1: "A", 2: "D"}


# -- the host's side ------------------------------------------------------------------------------------------


class Remote:
    """Calls the functions of this module in the guest: ``Remote(g).name(**kwargs)``.  ``timeout`` (seconds,
    600 unless given) bounds the call, and is passed on to a function that takes one (the host then waits a
    minute more for its answer)."""

    def __init__(self, guest) -> None:
        self.guest = guest

    def __getattr__(self, name: str):
        import inspect

        takes_timeout = "timeout" in inspect.signature(globals()[name]).parameters

        def call(timeout: float = 600, **kwargs):
            if takes_timeout:
                kwargs["timeout"] = timeout
            return self.guest.call("call", timeout=timeout + (60 if takes_timeout else 0), module=__name__,
                                   function=name, kwargs=kwargs)
        return call


# -- the engine ---------------------------------------------------------------------------------------------


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


class EngineError(RuntimeError):
    pass


_engine: Dict[str, object] = {}


def _log_tail(n: int = 30) -> str:
    path = _engine.get("log")
    try:
        with open(str(path), errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def request(method: str, path: str, body=None, query=None, headers: Optional[dict] = None,
            timeout: float = 300, expect: Tuple[int, ...] = (200, 201, 204, 304)):
    """One Engine API request; returns the open response (status checked against ``expect``)."""
    url = API + path + ("?" + urllib.parse.urlencode(query) if query else "")
    conn = _UnixConnection(SOCK, timeout)
    hdrs = dict(headers or {})
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    conn.request(method, url, body=body, headers=hdrs)
    resp = conn.getresponse()
    if resp.status not in expect:
        text = resp.read().decode(errors="replace")
        conn.close()
        raise EngineError(f"{method} {url}: {resp.status} {text.strip()}")
    return resp


def api(method: str, path: str, body=None, query: Optional[dict] = None, timeout: float = 300, **kw):
    """A request whose answer is JSON (or empty): the decoded answer."""
    resp = request(method, path, body, query, timeout=timeout, **kw)
    data = resp.read()
    return json.loads(data) if data.strip() else None


def _json_stream(resp) -> List[dict]:
    """A JSON-lines progress answer (build, import, load); raises on an ``error`` message."""
    messages = []
    buf = b""
    while True:
        chunk = resp.read(65536)
        if not chunk:
            break
        buf += chunk
    decoder = json.JSONDecoder()
    text = buf.decode(errors="replace")
    pos = 0
    while pos < len(text):
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            break
        obj, pos = decoder.raw_decode(text, pos)
        messages.append(obj)
        if "error" in obj or "errorDetail" in obj:
            raise EngineError(f"{obj.get('error') or obj.get('errorDetail')}\n"
                              + "".join(m.get("stream", "") for m in messages)[-3000:])
    return messages


def prepare(writeback_ms: int = 1000) -> None:
    """Once a boot: the engine's programs on tmpfs (``PROGRAMS``), and the kernel's periodic writeback every
    ``writeback_ms``, dirty data written back once that old (Linux's defaults: 5 s and 30 s), so that what a
    power cut loses is the last second or so, as on a device that has been up a while."""
    if not os.path.isdir(BIN):
        os.makedirs(BIN + ".tmp", exist_ok=True)
        for program in PROGRAMS:
            subprocess.run(["cp", "-L", program, os.path.join(BIN + ".tmp", os.path.basename(program))], check=True)
        os.rename(BIN + ".tmp", BIN)
    for name in ("dirty_writeback_centisecs", "dirty_expire_centisecs"):
        with open(f"/proc/sys/vm/{name}", "w") as f:
            f.write(str(writeback_ms // 10))


def engine_start(root: str, driver: str, timeout: float = 240) -> Dict[str, object]:
    """Start dockerd on ``root`` with ``--storage-driver driver``; wait until it answers; what it says it runs."""
    if _engine.get("proc") is not None and _engine["proc"].poll() is None:  # type: ignore[union-attr]
        raise EngineError("an engine is already running")
    prepare()
    os.makedirs(BASE, exist_ok=True)
    log = f"/var/log/a2o-dockerd-{int(time.time() * 1000)}.log"
    started = time.monotonic()
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [DOCKERD, "--data-root", root, "--exec-root", EXEC_ROOT, "--pidfile", PIDFILE, "-H", f"unix://{SOCK}",
             "--storage-driver", driver, "--iptables=false", "--ip6tables=false", "--bridge=none",
             "--userland-proxy=false", "--log-level", "warn"],
            stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True,
            env=dict(os.environ, PATH=BIN + ":" + os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")))
    _engine.update(proc=proc, log=log, root=root, driver=driver)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise EngineError(f"dockerd ({driver}) exited with {proc.returncode}:\n{_log_tail()}")
        try:
            resp = request("GET", "/_ping", timeout=5)
            if resp.read() == b"OK":
                break
        except (OSError, EngineError, http.client.HTTPException):
            pass
        if time.monotonic() > deadline:
            engine_stop()
            raise EngineError(f"dockerd ({driver}) did not answer within {timeout} s:\n{_log_tail()}")
        time.sleep(0.2)
    info = api("GET", "/info")
    if info["Driver"] != driver:
        raise EngineError(f"dockerd runs {info['Driver']}, not {driver}")
    return {"driver": info["Driver"], "version": api("GET", "/version")["Version"],
            "seconds": round(time.monotonic() - started, 1), "pid": proc.pid, "pidfile": PIDFILE}


def engine_stop(timeout: float = 120) -> Dict[str, object]:
    """SIGTERM by its pid, as an operator's ``systemctl stop`` does; wait for it (SIGKILL after ``timeout``).
    Returns how it went, and the aufs mounts still there afterwards (none after a clean stop)."""
    proc = _engine.get("proc")
    out: Dict[str, object] = {"clean": True}
    if proc is None:
        return out
    started = time.monotonic()
    if proc.poll() is None:  # type: ignore[union-attr]
        proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        try:
            proc.wait(timeout=timeout)  # type: ignore[union-attr]
        except subprocess.TimeoutExpired:
            proc.kill()  # type: ignore[union-attr]
            proc.wait()  # type: ignore[union-attr]
            out["clean"] = False
    out["code"] = proc.returncode  # type: ignore[union-attr]
    out["seconds"] = round(time.monotonic() - started, 1)
    _engine["proc"] = None
    out["processes_left"] = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except (OSError, ValueError):
            continue
        if pid.isdigit() and BASE.encode() in cmd:
            out["processes_left"].append(cmd.replace(b"\0", b" ").decode(errors="replace")[:120])
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
    root = str(_engine.get("root"))
    out["mounts_left"] = [p for p in _mounts() if p.startswith(root + "/") or p.startswith(EXEC_ROOT)]
    for point in sorted(out["mounts_left"], key=len, reverse=True):  # type: ignore[arg-type]
        subprocess.run(["umount", "-l", point], capture_output=True)
    out["log_warnings"] = _log_tail(400).count("level=error")
    return out


def _mounts() -> List[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4].encode().decode("unicode_escape") for line in f]


def engine_log(lines: int = 60) -> str:
    return _log_tail(lines)


# -- images and containers ------------------------------------------------------------------------------------


def _upload(method: str, path: str, file: str, query: dict, timeout: float) -> List[dict]:
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        resp = request(method, path, body=f, query=query, timeout=timeout,
                       headers={"Content-Type": "application/x-tar", "Content-Length": str(size)})
        return _json_stream(resp)


def import_image(file: str, repo: str, tag: str = "latest", timeout: float = 300) -> str:
    """``docker import FILE repo:tag``."""
    msgs = _upload("POST", "/images/create", file, {"fromSrc": "-", "repo": repo, "tag": tag}, timeout)
    return "".join(m.get("status", "") for m in msgs).strip()


def load_image(file: str, timeout: float = 600) -> str:
    """``docker load -i FILE``."""
    msgs = _upload("POST", "/images/load", file, {"quiet": "1"}, timeout)
    return "".join(m.get("stream", "") for m in msgs).strip()


def build(context: str, tag: str, timeout: float = 900) -> str:
    """``DOCKER_BUILDKIT=0 docker build --network none --rm --force-rm -t TAG`` of the context tar ``context``:
    the classic builder, each RUN step a container committed by the layer store."""
    msgs = _upload("POST", "/build", context, {"t": tag, "networkmode": "none", "rm": "1", "forcerm": "1",
                                                  "version": "1"}, timeout)
    return "".join(m.get("stream", "") for m in msgs)


def create(name: str, image: str, cmd: List[str], restart: Optional[str] = None) -> str:
    host = {"NetworkMode": "none"}
    if restart:
        host["RestartPolicy"] = {"Name": restart}
    body = {"Image": image, "Cmd": cmd, "StopTimeout": 1, "HostConfig": host}
    return api("POST", "/containers/create", body, {"name": name})["Id"]


def start(name: str) -> None:
    api("POST", f"/containers/{name}/start")


def wait(name: str, timeout: float = 300) -> int:
    return api("POST", f"/containers/{name}/wait", timeout=timeout)["StatusCode"]


def stop(name: str) -> None:
    api("POST", f"/containers/{name}/stop", query={"t": "1"}, timeout=120)


def run(name: str, image: str, cmd: List[str], restart: Optional[str] = None, detach: bool = False,
        timeout: float = 300) -> Dict[str, object]:
    """``docker run [-d] --name NAME IMAGE CMD``; without ``detach`` it waits for the exit: code and output."""
    cid = create(name, image, cmd, restart)
    start(cid)
    if detach:
        return {"id": cid}
    code = wait(cid, timeout)
    return {"id": cid, "code": code, "output": logs(cid)}


def logs(name: str) -> str:
    data = request("GET", f"/containers/{name}/logs", query={"stdout": "1", "stderr": "1"}).read()
    return _demux(data).decode(errors="replace")


def _demux(data: bytes) -> bytes:
    out, pos = [], 0
    while pos + 8 <= len(data):
        _kind, size = struct.unpack(">BxxxL", data[pos:pos + 8])
        out.append(data[pos + 8:pos + 8 + size])
        pos += 8 + size
    return b"".join(out)


def exec_in(name: str, cmd: List[str], detach: bool = False, timeout: float = 300) -> Dict[str, object]:
    """``docker exec [-d] NAME CMD``: its exit code and output (stdout and stderr together)."""
    eid = api("POST", f"/containers/{name}/exec", {"AttachStdout": not detach, "AttachStderr": not detach,
                                                   "Cmd": cmd})["Id"]
    if detach:
        api("POST", f"/exec/{eid}/start", {"Detach": True, "Tty": False})
        return {"id": eid}
    resp = request("POST", f"/exec/{eid}/start", {"Detach": False, "Tty": False}, timeout=timeout)
    data = resp.read()
    code = api("GET", f"/exec/{eid}/json")["ExitCode"]
    return {"code": code, "output": _demux(data).decode(errors="replace")}


def commit(container: str, repo: str, tag: str = "latest") -> str:
    return api("POST", "/commit", query={"container": container, "repo": repo, "tag": tag}, timeout=600)["Id"]


def rmi(ref: str) -> list:
    return api("DELETE", f"/images/{ref}")


def diff(name: str) -> List[str]:
    """``docker diff NAME``, sorted."""
    changes = api("GET", f"/containers/{name}/changes") or []
    return sorted(f"{KINDS[c['Kind']]} {c['Path']}" for c in changes)


def containers() -> Dict[str, Dict[str, object]]:
    """Every container by name: id, image, state."""
    out = {}
    for c in api("GET", "/containers/json", query={"all": "1"}):
        out[c["Names"][0].lstrip("/")] = {"id": c["Id"], "image": c["Image"], "state": c["State"]}
    return out


def images() -> List[str]:
    """Every image, ``<id> <repo:tag>`` per tag (``<id> <none>`` for an untagged one), sorted."""
    out = []
    for img in api("GET", "/images/json", query={"all": "1"}):
        for tag in [t for t in img.get("RepoTags") or [] if t != "<none>:<none>"] or ["<none>"]:
            out.append(f"{img['Id']} {tag}")
    return sorted(out)


def save_digests(refs: List[str], timeout: float = 900) -> Dict[str, Dict[str, object]]:
    """``docker save REF...`` (one archive, as the engine writes it for several images), read as it streams:
    for each ref, the sha256 of each of its layer tars in its manifest's order and its config's
    ``rootfs.diff_ids``; or the error the stream ended with (then each ref is saved alone, to say which)."""
    out, failed = _save(refs, timeout)
    if failed and len(refs) > 1:
        return {ref: _save([ref], timeout)[0][ref] for ref in refs}
    return out


def _save(refs: List[str], timeout: float) -> Tuple[Dict[str, Dict[str, object]], bool]:
    resp = request("GET", "/images/get", query=[("names", ref) for ref in refs], timeout=timeout)
    digests: Dict[str, str] = {}
    links: Dict[str, str] = {}
    jsons: Dict[str, object] = {}
    try:
        with tarfile.open(fileobj=resp, mode="r|") as tar:
            for member in tar:
                if member.issym() and member.name.endswith("layer.tar"):
                    links[member.name] = os.path.normpath(os.path.join(os.path.dirname(member.name),
                                                                       member.linkname))
                elif member.isfile() and member.name.endswith("layer.tar"):
                    h = hashlib.sha256()
                    f = tar.extractfile(member)
                    assert f is not None
                    while True:
                        chunk = f.read(1 << 20)
                        if not chunk:
                            break
                        h.update(chunk)
                    digests[member.name] = "sha256:" + h.hexdigest()
                elif member.isfile() and member.name.endswith(".json"):
                    f = tar.extractfile(member)
                    assert f is not None
                    jsons[member.name] = json.loads(f.read())
    except (tarfile.TarError, OSError, http.client.HTTPException, ValueError) as exc:
        return {ref: {"error": f"{type(exc).__name__}: {exc}"} for ref in refs}, True
    out: Dict[str, Dict[str, object]] = {}
    for entry in jsons.get("manifest.json") or []:  # type: ignore[union-attr]
        config = jsons[entry["Config"]]
        layers = [digests.get(links.get(p, p), "missing:" + p) for p in entry["Layers"]]
        for tag in entry.get("RepoTags") or []:
            out[tag] = {"digests": layers, "diff_ids": config["rootfs"]["diff_ids"]}  # type: ignore[index]
    for ref in refs:
        out.setdefault(ref, {"error": "not in the saved archive's manifest"})
    return out, False


def wait_running(name: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while True:
        state = api("GET", f"/containers/{name}/json")["State"]
        if state["Running"] or time.monotonic() > deadline:
            return "running" if state["Running"] else state["Status"]
        time.sleep(0.5)


# -- what aufs and overlayfs show ------------------------------------------------------------------------------


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def chain_ids(diff_ids: List[str]) -> List[str]:
    chains = [diff_ids[0]]
    for d in diff_ids[1:]:
        chains.append("sha256:" + hashlib.sha256(f"{chains[-1]} {d}".encode()).hexdigest())
    return chains


def layer_names(root: str, driver: str) -> Dict[str, str]:
    """Every tagged image's top layer and every container's own layer: ``{"image <repo:tag>" | "container
    <name>": cache id}``, read from the image and layer stores of ``driver`` (as an engine reads them)."""
    idir = os.path.join(root, "image", driver)
    out = {}
    with open(os.path.join(idir, "repositories.json")) as f:
        repos = json.load(f).get("Repositories", {})
    for tags in repos.values():
        for ref, image_id in tags.items():
            if "@" in ref:
                continue
            config = json.loads(_read(os.path.join(idir, "imagedb", "content", "sha256", image_id.split(":")[1])))
            top = chain_ids(config["rootfs"]["diff_ids"])[-1].split(":")[1]
            out["image " + ref] = _read(os.path.join(idir, "layerdb", "sha256", top, "cache-id")).strip()
    mounts = os.path.join(idir, "layerdb", "mounts")
    for cid in sorted(os.listdir(mounts)) if os.path.isdir(mounts) else []:
        with open(os.path.join(root, "containers", cid, "config.v2.json")) as f:
            name = json.load(f)["Name"].lstrip("/")
        out["container " + name] = _read(os.path.join(mounts, cid, "mount-id")).strip()
    return out


def layer_chains(root: str, names: Dict[str, str]) -> Dict[str, List[str]]:
    """Each name's layer and its ancestors (``aufs/layers``), top first."""
    out = {}
    for name, lid in names.items():
        with open(os.path.join(root, "aufs", "layers", lid)) as f:
            out[name] = [lid] + [line for line in f.read().split("\n") if line]
    return out


def chain_specs(root: str, names: Dict[str, str], fs: str) -> Dict[str, dict]:
    """The agent's ``views`` requests for ``names`` (from ``layer_names``): with ``fs`` "aufs", each layer's
    chain from ``aufs/layers`` as moby mounts it, read-only below a new empty writable branch (a container's own
    layer too: mounting it writable would add aufs's bookkeeping entries to the root being migrated); with
    "overlay", ``overlay2/<id>/diff`` on top of its ``lower`` file's layers, read-only."""
    specs = {}
    for name, lid in names.items():
        if fs == "aufs":
            with open(os.path.join(root, "aufs", "layers", lid)) as f:
                ancestors = [line for line in f.read().split("\n") if line]
            dirs = [os.path.join("aufs", "diff", x) for x in [lid] + ancestors]
            specs[name] = {"fs": "aufs", "branches": [(None, "rw")] + [(d, "ro+wh") for d in dirs]}
        else:
            lower_file = os.path.join(root, "overlay2", lid, "lower")
            lower = _read(lower_file) if os.path.exists(lower_file) else ""
            specs[name] = {"fs": "overlay", "top": f"{lid}/diff", "lower": lower, "cwd": "overlay2"}
    return specs


def views(root: str, fs: str, names: Optional[Dict[str, str]] = None, driver: str = "aufs") -> Dict[str, object]:
    """What ``fs`` shows for each image and container of ``root`` (the engine stopped): ``{name: (entries,
    hardlink groups)}`` as the agent's ``view`` gives them, the top directory's mtime left out (aufs moves it
    when it creates its bookkeeping entries in the new writable branch)."""
    agent = _agent()
    names = names if names is not None else layer_names(root, driver)
    out: Dict[str, object] = {}
    for name, spec in chain_specs(root, names, fs).items():
        seen = agent.views_in(root, {name: spec})[name]
        if isinstance(seen, tuple) and seen and seen[0] == "mount-error":
            out[name] = seen
            continue
        entries, groups = seen  # type: ignore[misc]
        top = entries.get(b".")
        if top and top[0] != "error":
            entries[b"."] = top[:4] + (None,) + top[5:]
        out[name] = (entries, groups)
    return out


def _agent():
    """The running agent's module (``python -m tests.support.guest.agent``): its code as it was at boot, with
    the modules it had imported then (a second copy imported now could disagree with them)."""
    main = sys.modules.get("__main__")
    if main is not None and hasattr(main, "views_in"):
        return main
    from tests.support.guest import agent

    return agent


def layer_listing(root: str, lid: str, rel: str = "") -> List[Tuple[str, str, int, int]]:
    """The raw entries of ``aufs/diff/<lid>/<rel>`` (or any folder under the root when ``lid`` is a path):
    name, type, size, link count; recursively."""
    top = os.path.join(root, "aufs", "diff", lid, rel) if not lid.startswith("/") else os.path.join(lid, rel)
    out = []
    for dirpath, dirs, files in os.walk(top):
        for name in sorted(dirs + files):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            kind = "dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else \
                "symlink" if stat.S_ISLNK(st.st_mode) else "fifo" if stat.S_ISFIFO(st.st_mode) else \
                "chr" if stat.S_ISCHR(st.st_mode) else "other"
            out.append((os.path.relpath(path, top), kind, st.st_size, st.st_nlink))
    return sorted(out)


# -- the migrator, the disk, the power ------------------------------------------------------------------------


def migrator(args: List[str], timeout: float = 900, env: Optional[dict] = None) -> Dict[str, object]:
    """``aufs2overlay ARGS`` (``migrator.cli.main``, what ``python -m migrator`` runs) in a child forked from
    the agent, which imported the migrator once: a new interpreter costs a quarter of a minute under TCG, the
    command itself a few seconds.  Exit code, standard output and error, seconds."""
    import tempfile

    from migrator import cli

    started = time.monotonic()
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the agent
        code = 70
        try:
            os.setsid()
            os.chdir(REPO)
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            os.environ.update(env or {})
            try:
                code = cli.main(list(args))
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 2
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = started + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise TimeoutError(f"aufs2overlay {' '.join(args)} ran over {timeout} s")
        time.sleep(0.05)
    texts = []
    for f in (out, err):
        f.seek(0)
        texts.append(f.read().decode(errors="replace"))
        f.close()
    return {"code": os.waitstatus_to_exitcode(status), "stdout": texts[0], "stderr": texts[1],
            "seconds": round(time.monotonic() - started, 1)}


def findings(root: str) -> List[Dict[str, str]]:
    """``status --root ROOT --json``'s findings."""
    res = migrator(["status", "--root", root, "--json"], timeout=300)
    return json.loads(str(res["stdout"]))["findings"]


def mount_disk(device: str, mnt: str = "/mnt/data") -> None:
    """Mount the data disk, its journal committed every second (ext4's default: 5 s)."""
    os.makedirs(mnt, exist_ok=True)
    subprocess.run(["mount", "-o", "commit=1", device, mnt], check=True, capture_output=True)


def umount_disk(mnt: str = "/mnt/data") -> None:
    os.sync()
    subprocess.run(["umount", mnt], check=True, capture_output=True)


def sh(cmd: str, timeout: float = 300) -> str:
    res = subprocess.run(["/bin/sh", "-c", cmd], capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise EngineError(f"`{cmd}` exited {res.returncode}: {res.stderr[-2000:]}")
    return res.stdout


def copy_up_then_cut(container: str, layer_dir: str, name: str, min_bytes: int, report: str,
                     timeout: float = 300) -> Dict[str, object]:
    """Start ``container`` (whose command appends to ``name``, a big file of a lower layer) and cut the power
    while aufs copies it up: as soon as ``layer_dir`` (the container's writable branch, the file's folder in it)
    holds aufs's temporary copy (``.wh..wh.<name>.XXXX``) of at least ``min_bytes``, ``sync`` (what the
    kernel's periodic writeback could have done by then) and, the copy still under way, the power goes.  What
    was seen is written to ``report`` (on the share) first.  Returns (instead of cutting) when the copy-up
    could not be caught."""
    prefix = ".wh..wh." + name + "."
    start(container)
    deadline = time.monotonic() + timeout
    seen: Dict[str, object] = {}
    while time.monotonic() < deadline:
        try:
            entries = os.listdir(layer_dir)
        except FileNotFoundError:
            entries = []
        if name in entries:
            return {"error": f"the copy-up finished before the cut ({seen or 'no temporary copy seen'})"}
        tmp = [e for e in entries if e.startswith(prefix)]
        if tmp:
            try:
                size = os.lstat(os.path.join(layer_dir, tmp[0])).st_size
            except FileNotFoundError:
                continue
            seen = {"tmp": tmp[0], "size_seen": size}
            if size >= min_bytes:
                os.sync()
                entries = os.listdir(layer_dir)
                if name in entries or tmp[0] not in entries:
                    return {"error": f"the copy-up finished during the sync ({seen})"}
                seen["size_at_cut"] = os.lstat(os.path.join(layer_dir, tmp[0])).st_size
                with open(report, "w") as f:
                    json.dump(seen, f)
                    f.flush()
                    os.fsync(f.fileno())
                with open("/proc/sysrq-trigger", "w") as f:
                    f.write("b")
                time.sleep(60)
        time.sleep(0.005)
    return {"error": f"no copy-up seen within {timeout} s ({seen})"}
