"""A real engine on the real aufs, migrated, then a real engine on overlay2: all in the aufs guest (aufsvm.py).

Boot 1: dockerd 20.10 with ``--storage-driver aufs`` on an ext4 data disk imports a busybox root, loads a
hand-made ``docker save`` archive (PAX xattrs ``user.*``, ``security.capability``, ``system.posix_acl_access``; a
FIFO, a mostly-zero file, hardlinks, a whiteout, an opaque directory) and a 64 MiB layer (``BIG_MB``), builds an
image with the classic builder (RUN steps that delete, rename directories, rmdir then mkdir, hardlink,
chmod/chown, mkfifo, write a sparse file, and recreate ``/app`` in two successive steps), and makes containers:
c_new never started, c_ran run once (a copy-up of a hardlinked file: aufs leaves a pseudo-link in
``.wh..wh.plnk``) and committed, c_run left running (restart policy ``always``), c_big whose copy-up of the big
file is cut by a power cut (aufs's ``.wh..wh.big.XXXX`` left in its layer).  Boot 2: the aufs engine commits
c_big; everything it shows is recorded (every image's and container's view, each chain mounted by the guest as
moby mounts it; ``docker diff``; ``docker save`` layer digests; c_run's own view through ``docker exec``); the
host copies the disk three times; then scenario B on the original disk: ``stage`` three times beside the aufs
engine serving writers, with a load, a run, an rmi and a commit in between, and a power cut with the engine
up.  Boot 3: ``run --strategy hardlink``, ``run --strategy inplace``, and ``stage`` (engine serving, a container
writing) + the cutover, each on its copy; and B's cutover after its power cut.  After each: overlayfs shows
what aufs showed (except at paths the migrator's findings name: printed), dockerd on overlay2 gives the same
``docker diff`` and ``docker save`` digests (= the diff_ids), the containers start; then ``rollback --force``,
and aufs (the views, then the engine) shows the same again.

The guest talks to dockerd through its API (``tests/support/guestengine.py``): what the ``docker`` client sends,
without its seconds of start-up under TCG.  The module's tests run in order and share the boots.
"""

import hashlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile
import time

import pytest

from tests.support import aufsvm, realaufs
from tests.support.guestengine import Remote
from tests.test_engine import make_base_rootfs

pytestmark = [pytest.mark.root(reason="needs root: qemu's 9p passthrough, loop devices"), pytest.mark.engine]

ROOT = "/mnt/data/docker"
SHARE = "/run/a2o/share"
PIDFILE = "/run/a2o-engine/pid"
DISK_MB = 4096
BIG_MB = 64  # under TCG every byte costs: the load, each save and each view hash it (Go's sha256 ~10 MB/s)
PLNK = re.compile(r"^[ACD] /\.wh\.\.wh\.plnk(/|$)")

BUILD_DOCKERFILE = r"""FROM a2o/base
RUN mkdir -p /app /data/d1/sub /data/mv/inner /data/gone/deep /data/perm \
 && echo zero > /app/0 && echo one > /data/d1/f && echo k > /data/mv/inner/k && echo g > /data/gone/deep/x \
 && echo p > /data/perm/p && echo shared > /hardlinked && ln /hardlinked /data/hl2 \
 && touch /data/del1 /data/del2 && echo t > /data/mv/top
RUN rm /data/del1 && mv /data/mv /data/moved && rmdir /data/d1/sub && mkdir /data/d1/sub \
 && echo new > /data/d1/sub/n && rm -r /data/gone && mkdir /data/gone && chmod 0750 /data/perm \
 && chown 1000:1000 /data/perm/p && chmod 0604 /data/perm/p && mkfifo /data/fifo \
 && dd if=/dev/zero of=/data/sparse bs=1 count=1 seek=8M 2>/dev/null && echo tail >> /data/sparse \
 && ln /data/hl2 /data/hl3 && rm -rf /app && mkdir /app && touch /app/1
RUN rm -rf /app && mkdir /app && touch /app/2
"""
# c_ran's command: its changes the first time, nothing when started again.
RAN_CMD = ("if [ ! -e /ran ]; then echo ran > /ran && echo x >> /hardlinked && rm /data/del2 "
           "&& rm -r /data/moved/inner && mkdir -p /data/new/sub && echo n > /data/new/sub/f && chmod 700 /data/d1 "
           "&& mv /data/d1/f /data/d1/f-renamed && touch /app/3; fi")
RUN_CMD = "echo up >> /run.log; exec sleep 1000000"
# What a container sees of the paths the build and the containers changed (the engine's own view, beside
# the chains the guest mounts).
EXEC_VIEW = ("cd / && find app data hardlinked -exec stat -c '%n|%F|%a|%u|%g|%s|%Y' {} + 2>&1 | sort; "
             "find app data hardlinked -type f -exec sha256sum {} + 2>&1 | sort; ls -A /app")
WRITER_CMD = ("i=0; while :; do i=$((i+1)); echo line $i >> /var/w.log; touch /tmp/f$i; rm -f /tmp/f$((i-3)); "
              "sleep 0.2; done")

# -- timing ---------------------------------------------------------------------------------------------------

TIMES = []


class phase:
    """A timed phase: printed when it ends, and summed up at the end of the module."""

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        self.started = time.monotonic()
        print(f"\n[real-aufs] {self.name} ...", flush=True)
        return self

    def __exit__(self, *exc):
        took = time.monotonic() - self.started
        TIMES.append((self.name, took))
        print(f"[real-aufs] {self.name}: {took:.1f} s{' (failed)' if exc[0] else ''}", flush=True)


# -- the inputs, made on the host -----------------------------------------------------------------------------


def _tar_bytes(members):
    """A PAX tar of ``members``: (TarInfo, data or None)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _info(name, kind=tarfile.REGTYPE, mode=0o644, data=b"", uid=0, gid=0, xattrs=None, linkname=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.uid, info.gid = uid, gid
    info.mtime = 1_700_000_000
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.linkname = linkname
    if xattrs:
        info.pax_headers = {"SCHILY.xattr." + k: v.decode("utf-8", "surrogateescape") for k, v in xattrs.items()}
    return info, (data if kind == tarfile.REGTYPE else None)


CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)  # VFS_CAP_REVISION_2, effective, cap_net_raw
ACL = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, uid) for tag, perm, uid in (
    (0x01, 6, 0xFFFFFFFF), (0x02, 4, 1000), (0x04, 4, 0xFFFFFFFF), (0x10, 4, 0xFFFFFFFF), (0x20, 0, 0xFFFFFFFF)))


def loaded_layer():
    """The hand-made layer of a2o/loaded: xattrs of three namespaces, a FIFO, a mostly-zero file, hardlinks
    (one of them with xattrs), a whiteout and an opaque directory over the busybox layer."""
    d = tarfile.DIRTYPE
    return _tar_bytes([
        _info("x/", d, 0o755, xattrs={"user.dir": b"on a directory"}),
        _info("x/caps", mode=0o755, data=b"#!/bin/sh\necho caps\n", xattrs={"security.capability": CAPABILITY}),
        _info("x/acl", mode=0o640, data=b"acl\n", xattrs={"system.posix_acl_access": ACL, "user.note": b"n\x01"}),
        _info("x/fifo", tarfile.FIFOTYPE, 0o600),
        _info("x/sparse", data=b"\0" * (4 << 20) + b"end\n" + b"\0" * (1 << 20)),
        _info("x/hl-a", mode=0o600, data=b"linked\n", uid=1000, gid=100, xattrs={"user.linked": b"yes"}),
        _info("x/hl-b", tarfile.LNKTYPE, 0o600, uid=1000, gid=100, linkname="x/hl-a"),
        _info("x/sub/", d, 0o2775, uid=1000, gid=1000),
        _info("x/sub/hl-c", tarfile.LNKTYPE, 0o600, uid=1000, gid=100, linkname="x/hl-a"),
        _info("x/link", tarfile.SYMTYPE, 0o777, linkname="caps"),
        _info("bin/", d, 0o755),
        _info("bin/.wh.vi", mode=0o644),
        _info("tmp/", d, 0o1777),
        _info("tmp/.wh..wh..opq", mode=0o644),
        _info("tmp/new", data=b"new tmp\n"),
    ])


def big_layer(path):
    """A layer with ``data/big``: BIG_MB MiB that are not zeros (a copy-up must copy every byte)."""
    block = hashlib.sha256(b"a2o").digest() * (1 << 15)  # 1 MiB
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(*_info("data/", tarfile.DIRTYPE, 0o755)[:1])
        info = _info("data/big", mode=0o644)[0]
        info.size = BIG_MB << 20

        class Blocks(io.RawIOBase):
            left = info.size

            def readinto(self, b):
                n = min(len(b), self.left, len(block))
                b[:n] = block[:n]
                self.left -= n
                return n

        tar.addfile(info, Blocks())


def save_archive(path, tag, layers):
    """A ``docker save`` archive of one image, tagged ``tag``, with the layer tars (files) ``layers``."""
    diff_ids = []
    for layer in layers:
        h = hashlib.sha256()
        with open(layer, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        diff_ids.append("sha256:" + h.hexdigest())
    config = json.dumps({"architecture": "amd64", "os": "linux", "created": "2024-01-01T00:00:00Z",
                         "config": {"Cmd": ["sh"], "Env": ["PATH=/bin"]},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids},
                         "history": [{"created": "2024-01-01T00:00:00Z"} for _ in layers]}).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    names = [f"{d.split(':')[1]}/layer.tar" for d in diff_ids]
    manifest = json.dumps([{"Config": config_name, "RepoTags": [tag], "Layers": names}]).encode()
    with tarfile.open(path, "w") as tar:
        for layer, name in zip(layers, names):
            tar.add(layer, arcname=name)
        for name, data in ((config_name, config), ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def context_tar(dockerfile):
    return _tar_bytes([_info("Dockerfile", data=dockerfile.encode())])


def make_inputs(share, scratch):
    """Everything the guest imports, loads and builds, in the share."""
    base = make_base_rootfs(os.path.join(scratch, "rootfs"))
    files = {"base.tar": base, "build-ctx.tar": context_tar(BUILD_DOCKERFILE),
             "loaded-layer.tar": loaded_layer(),
             "later-layer.tar": _tar_bytes([_info("later/", tarfile.DIRTYPE, 0o755),
                                            _info("later/file", data=b"loaded between two stages\n"),
                                            _info("data/", tarfile.DIRTYPE, 0o755),
                                            _info("data/.wh..wh..opq"), _info("data/only", data=b"only\n")])}
    for name, data in files.items():
        with open(os.path.join(scratch, name), "wb") as f:
            f.write(data)
    shutil.copy(os.path.join(scratch, "base.tar"), os.path.join(share, "base.tar"))
    shutil.copy(os.path.join(scratch, "build-ctx.tar"), os.path.join(share, "build-ctx.tar"))
    base_tar = os.path.join(scratch, "base.tar")
    save_archive(os.path.join(share, "loaded.tar"), "a2o/loaded:latest",
                 [base_tar, os.path.join(scratch, "loaded-layer.tar")])
    save_archive(os.path.join(share, "later.tar"), "a2o/later:latest",
                 [base_tar, os.path.join(scratch, "later-layer.tar")])
    big = os.path.join(scratch, "big-layer.tar")
    big_layer(big)
    save_archive(os.path.join(share, "big.tar"), "a2o/big:latest", [base_tar, big])
    os.unlink(big)


def new_disk(path):
    with open(path, "wb") as f:
        f.truncate(DISK_MB << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", path], check=True, capture_output=True)


def copy_disk(src, dst):
    subprocess.run(["cp", "--sparse=always", src, dst], check=True)


def boot(disks, share, time_limit):
    reason = aufsvm.missing()
    if reason:
        pytest.fail(reason)
    g = aufsvm.Guest(disks=disks, share=share, time_limit=time_limit)
    try:
        return g.start()
    except BaseException:
        g.cleanup()
        raise


# -- what the engine shows, and what differs ------------------------------------------------------------------


def engine_facts(r, saves=True):
    """With an engine running: its images, containers (state), each container's ``docker diff``, each tagged
    image's ``docker save`` digests, and c_run's own view of the paths the build and the containers changed."""
    facts = {"images": r.images(), "containers": r.containers()}
    facts["diffs"] = {n: r.diff(name=n) for n in sorted(facts["containers"])}
    refs = sorted({line.split(" ", 1)[1] for line in facts["images"]} - {"<none>", "<none>:<none>"})
    facts["saves"] = r.save_digests(refs=refs) if saves else {}
    if facts["containers"].get("c_run", {}).get("state") == "running":
        facts["exec_view"] = r.exec_in(name="c_run", cmd=["sh", "-c", EXEC_VIEW])
    return facts


def saves_wrong(saves):
    """Each ``docker save`` that failed or whose layer digests are not the config's diff_ids."""
    return [f"docker save {ref}: {s}" for ref, s in saves.items() if "error" in s or s["digests"] != s["diff_ids"]]


def _entry(e):
    if e is None:
        return "absent"
    if isinstance(e[0], str):
        return repr(e)
    kind, mode, uid, gid, mtime, detail, xattrs = e
    kinds = {0o040000: "dir", 0o100000: "file", 0o120000: "symlink", 0o010000: "fifo", 0o020000: "chr",
             0o060000: "blk", 0o140000: "socket"}
    return f"{kinds.get(kind, kind)} {mode:o} {uid}:{gid} mtime={mtime} {detail!r} xattrs={xattrs!r}"


def _reported(found, chain):
    """The paths a finding of ``status --json`` for a layer of ``chain`` says may show otherwise than on aufs
    (``realaufs.allowed_paths``): ``{path: "kind in layer"}``."""
    return realaufs.allowed_paths([(f["kind"], f.get("layer"), f.get("detail") or "") for f in found], chain)


def compare_views(expected, got, chains, found=()):
    """Every difference between two sets of views, as lines in three lists: unreported, reported (a finding of
    ``status --json`` for a layer of the chain names the path or a folder above it), and aufs's own limits (a
    path aufs could not describe: ``getxattr`` of ``system.posix_acl_access`` is ENOTSUP through aufs6.1)."""
    bad, reported, aufs_limits = [], [], []
    for name in sorted(set(expected) | set(got)):
        a, b = expected.get(name), got.get(name)
        if a is None or b is None or a[0] == "mount-error" or b[0] == "mount-error":
            if a != b:
                bad.append(f"{name}: {str(a)[:300]} -> {str(b)[:300]}")
            continue
        allowed = _reported(found, chains.get(name, ()))
        (ea, ga), (eb, gb) = a, b
        for path in sorted(set(ea) | set(eb)):
            x, y = ea.get(path), eb.get(path)
            if x == y:
                continue
            line = f"{name}: /{path.decode(errors='replace')}: {_entry(x)} -> {_entry(y)}"
            by = realaufs.covered(path, allowed)
            if by:
                reported.append(f"{line}  [{by}]")
            elif x == ("error", "ENOTSUP") or y == ("error", "ENOTSUP"):
                aufs_limits.append(line)
            else:
                bad.append(line)
        kept = [sorted(sorted(p for p in grp if not realaufs.covered(p, allowed)) for grp in gs) for gs in (ga, gb)]
        kept = [[grp for grp in gs if len(grp) > 1] for gs in kept]
        if kept[0] != kept[1]:
            bad.append(f"{name}: hardlink groups {ga} -> {gb}")
        elif ga != gb:
            reported.append(f"{name}: hardlink groups {ga} -> {gb} (differ only at reported paths)")
    return bad, reported, aufs_limits


def aufs_only_diff_entries(aufs_diff, found, own_layer):
    """The entries of an aufs engine's ``docker diff`` that an overlay2 engine cannot list: aufs's own
    ``/.wh..wh.plnk`` entries; ``D <dir>/.wh.<x>``, aufs reading a leftover temporary copy ``<dir>/.wh..wh.<x>``
    (one a finding names as dropped from the container's layer) as a whiteout; and ``C <dir>`` for such a
    folder when nothing else below it changed (overlay2's diff, naive on this kernel, ignores a folder's mtime)."""
    allowed = {x for x in aufs_diff if PLNK.match(x)}
    for f in found:
        detail = f.get("detail") or ""
        parent, _, base = detail.rpartition("/")
        if f.get("layer") != own_layer or f["kind"] != "dropped-aufs-internal" or not parent \
                or not base.startswith(".wh..wh."):
            continue
        entry = f"D {parent}/.wh.{base[len('.wh..wh.'):]}"
        if entry in aufs_diff:
            allowed.add(entry)
    for x in aufs_diff:
        if x.startswith("C ") and x not in allowed:
            below = [y for y in aufs_diff if y[2:].startswith(x[2:] + "/")]
            if below and all(y in allowed for y in below):
                allowed.add(x)
    return allowed


def compare_diffs(aufs, overlay, found, own_layers):
    """``docker diff`` of each container on an aufs engine and on an overlay2 engine: lines for every
    difference but ``aufs_only_diff_entries``; and the entries allowed that way."""
    bad, allowed_seen = [], []
    for name in sorted(set(aufs) | set(overlay)):
        a, o = aufs.get(name), overlay.get(name)
        if a is None or o is None:
            bad.append(f"container {name}: {'not on aufs' if a is None else 'not on overlay2'}")
            continue
        allowed = aufs_only_diff_entries(a, found, own_layers.get(name))
        lost = [x for x in a if x not in o and x not in allowed]
        new = [x for x in o if x not in a]
        if lost or new:
            bad.append(f"docker diff {name}: only on aufs {lost}, only on overlay2 {new}")
        allowed_seen += [f"{name}: {x}" for x in a if x in allowed and x not in o]
    return bad, allowed_seen


def _exec_lines(view):
    """EXEC_VIEW's output by path: ``stat:<path>``, ``sha:<path>``, ``ls:app/<name>``."""
    out = {}
    for line in (view or {}).get("output", "").splitlines():
        if "|" in line:
            out["stat:" + line.split("|", 1)[0]] = line
        elif re.match(r"^[0-9a-f]{64}  ", line):
            out["sha:" + line[66:]] = line
        else:
            out["ls:app/" + line] = line
    return out


def compare_exec_view(expected, got, found, chain):
    """c_run's own view (``docker exec``) on two engines: (unreported, reported) differences, a difference
    reported when a finding for a layer of c_run's chain names its path or a folder above it."""
    if not got or got.get("code") != 0:
        return [f"docker exec failed: {got}"], []
    a, b = _exec_lines(expected), _exec_lines(got)
    allowed = _reported(found, chain)
    bad, reported = [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            line = f"{key}: {a.get(key)!r} -> {b.get(key)!r}"
            by = realaufs.covered(os.fsencode(key.split(":", 1)[1]), allowed)
            (reported if by else bad).append(line + (f"  [{by}]" if by else ""))
    return bad, reported


def compare_saves(expected, got):
    """Each image of ``expected`` saved on the other engine too, with the same layer digests, = its diff_ids."""
    out = saves_wrong(got)
    for ref, saved in expected.items():
        mine = got.get(ref)
        if mine is None:
            out.append(f"docker save {ref}: not saved (gone?)")
        elif "error" not in mine and mine["digests"] != saved.get("digests"):
            out.append(f"docker save {ref}: layer digests {mine['digests']}, before {saved.get('digests')}")
    return out


def acl_kept(views):
    """The loaded image's x/acl as overlayfs shows it carries the ACL of its layer tar (aufs cannot show it)."""
    entry = views["image a2o/loaded:latest"][0].get(b"x/acl")
    return entry is not None and not isinstance(entry[0], str) and (b"system.posix_acl_access", ACL) in entry[6]


def show(title, lines, limit=40):
    if lines:
        print(f"[real-aufs] {title} ({len(lines)}):\n  " + "\n  ".join(lines[:limit]), flush=True)


# -- the world: built once ------------------------------------------------------------------------------------


class Checks:
    """Failures collected through a variant, asserted at its end (all of them in one message)."""

    def __init__(self, label):
        self.label = label
        self.failures = []

    def add(self, what, lines):
        if lines:
            self.failures.append(f"{what}:\n    " + "\n    ".join(str(x)[:600] for x in lines[:30]))

    def expect(self, what, ok, detail=""):
        if not ok:
            self.failures.append(f"{what}: {detail}"[:3000])

    def done(self):
        assert not self.failures, f"{self.label}:\n  " + "\n  ".join(self.failures)


def own_layers(names):
    return {n.split(" ", 1)[1]: lid for n, lid in names.items() if n.startswith("container ")}


@pytest.fixture(scope="module")
def world():
    """Boots 1 and 2: the aufs root a real engine built, with a copy-up cut by a power cut; what the aufs
    engine and the aufs views showed; copies of the disk for the variants (``disks``).  Boot 2's guest stays up
    for scenario B (``test_staging_beside_a_serving_engine``), which ends it with a power cut."""
    base = tempfile.mkdtemp(prefix="a2o-realengine-", dir="/var/tmp")
    share = os.path.join(base, "share")
    os.makedirs(share)
    disk = os.path.join(base, "aufs.img")
    w = {"base": base, "share": share, "disk": disk, "guests": []}
    try:
        with phase("inputs and disk on the host"):
            make_inputs(share, base)
            new_disk(disk)
        with phase("boot 1: build on aufs, power cut during a copy-up"):
            g = boot([disk], share, time_limit=1500)
            w["guests"].append(g)
            r = Remote(g)
            r.mount_disk(device="/dev/vda")
            w["engine"] = r.engine_start(root=ROOT, driver="aufs")
            r.import_image(file=f"{SHARE}/base.tar", repo="a2o/base")
            r.load_image(file=f"{SHARE}/loaded.tar")
            r.load_image(file=f"{SHARE}/big.tar")
            w["build_output"] = r.build(context=f"{SHARE}/build-ctx.tar", tag="a2o/build:latest", timeout=1200)
            r.create(name="c_new", image="a2o/build", cmd=["sh", "-c", "exec sleep 1000000"])
            ran = r.run(name="c_ran", image="a2o/build", cmd=["sh", "-c", RAN_CMD])
            assert ran["code"] == 0, ran
            r.run(name="c_run", image="a2o/build", cmd=["sh", "-c", RUN_CMD], restart="always", detach=True)
            r.commit(container="c_ran", repo="a2o/ran", tag="committed")
            r.create(name="c_big", image="a2o/big", cmd=["sh", "-c", "echo x >> /data/big"])
            big_layer_id = r.layer_names(root=ROOT, driver="aufs")["container c_big"]
            r.sh(cmd="sync && echo 3 > /proc/sys/vm/drop_caches")
            g.cut_by("call", timeout=600, module="tests.support.guestengine", function="copy_up_then_cut",
                     kwargs={"container": "c_big", "layer_dir": f"{ROOT}/aufs/diff/{big_layer_id}/data",
                             "name": "big", "min_bytes": 1 << 20, "report": f"{SHARE}/cut.json"})
            with open(os.path.join(share, "cut.json")) as f:
                w["cut"] = json.load(f)
            print(f"[real-aufs] power cut during the copy-up of /data/big: {w['cut']}", flush=True)
            g.cleanup()
        with phase("boot 2: the aufs engine after the cut; commit; record"):
            g = boot([disk], share, time_limit=2400)
            w["guests"].append(g)
            w["g2"] = g
            r = Remote(g)
            r.mount_disk(device="/dev/vda")
            r.engine_start(root=ROOT, driver="aufs")
            r.commit(container="c_big", repo="a2o/big", tag="cut")
            assert r.wait_running(name="c_run") == "running"
            w["facts"] = engine_facts(r)
            w["stop"] = r.engine_stop()
        with phase("boot 2: the aufs views of every image and container"):
            w["names"] = r.layer_names(root=ROOT, driver="aufs")
            w["chains"] = r.layer_chains(root=ROOT, names=w["names"])
            w["views"] = r.views(root=ROOT, fs="aufs", names=w["names"], timeout=900)
            lids = w["names"]
            w["listings"] = {
                "c_ran": r.layer_listing(root=ROOT, lid=lids["container c_ran"]),
                "c_big": r.layer_listing(root=ROOT, lid=lids["container c_big"]),
                "a2o/big:cut": r.layer_listing(root=ROOT, lid=lids["image a2o/big:cut"]),
                "app": {lid: r.layer_listing(root=ROOT, lid=lid, rel="app")
                        for lid in w["chains"]["image a2o/build:latest"]
                        if r.sh(cmd=f"test -d {ROOT}/aufs/diff/{lid}/app && echo y || true").strip()},
            }
            r.umount_disk()
        with phase("host: three copies of the disk"):
            w["disks"] = {}
            for name in ("hardlink", "inplace", "staged"):
                w["disks"][name] = os.path.join(base, f"{name}.img")
                copy_disk(disk, w["disks"][name])
        yield w
    finally:
        for g in w["guests"]:
            g.cleanup()
        shutil.rmtree(base, ignore_errors=True)
        print("\n[real-aufs] phases:\n  " + "\n  ".join(f"{n}: {t:.0f} s" for n, t in TIMES)
              + f"\n  total: {sum(t for _n, t in TIMES):.0f} s", flush=True)


def test_what_the_aufs_engine_showed(world):
    facts = world["facts"]
    assert not saves_wrong(facts["saves"]), saves_wrong(facts["saves"])
    assert world["stop"]["clean"] and not world["stop"]["mounts_left"], world["stop"]
    names = world["names"]
    assert {"image a2o/base:latest", "image a2o/loaded:latest", "image a2o/big:latest", "image a2o/build:latest",
            "image a2o/ran:committed", "image a2o/big:cut", "container c_new", "container c_ran",
            "container c_run", "container c_big"} <= set(names), sorted(names)
    for name, seen in world["views"].items():
        assert seen[0] != "mount-error", (name, seen)
    # The copy-up was cut: aufs's temporary copy is in c_big's layer, and in the image committed from it.
    tmp = world["cut"]["tmp"]
    big_layer = {p: (k, s) for p, k, s, _n in world["listings"]["c_big"]}
    committed = {p: (k, s) for p, k, s, _n in world["listings"]["a2o/big:cut"]}
    assert f"data/{tmp}" in big_layer and "data/big" not in big_layer, sorted(big_layer)
    assert f"data/{tmp}" in committed and "data/big" not in committed, sorted(committed)
    # The hardlinked file's copy-up left a pseudo-link (no auplink here to flush it), and aufs's docker diff
    # lists it.
    assert any(p.startswith(".wh..wh.plnk/") for p, *_ in world["listings"]["c_ran"]), world["listings"]["c_ran"]
    assert any(PLNK.match(x) for x in facts["diffs"]["c_ran"]), facts["diffs"]["c_ran"]
    # aufs shows none of its internal names.
    for name, (entries, _groups) in world["views"].items():
        assert not [p for p in entries if b".wh." in p], (name, [p for p in entries if b".wh." in p])
    app = sorted(k[len("ls:"):] for k in _exec_lines(facts["exec_view"]) if k.startswith("ls:"))
    view_app = sorted(p.decode() for p in world["views"]["image a2o/build:latest"][0] if p.startswith(b"app/"))
    print(f"[real-aufs] /app recreated in two steps: c_run, a container of a2o/build, lists {app} on aufs "
          f"(docker exec ls -A /app); the image's chain mounted by the guest shows {view_app}; the layers' app "
          "folders (top first): " + "; ".join(f"{lid[:12]}: {[(p, k) for p, k, _s, _n in entries]}"
                                             for lid, entries in world["listings"]["app"].items()), flush=True)
    assert view_app == app, (view_app, app)
    print(f"[real-aufs] c_big's docker diff on aufs: {facts['diffs']['c_big']}; x/acl through aufs: "
          f"{world['views']['image a2o/loaded:latest'][0].get(b'x/acl')}", flush=True)


def stage(r, label, checks):
    res = r.migrator(args=["stage", "--root", ROOT], timeout=900)
    checks.expect(f"{label}: stage exited {res['code']}", res["code"] == 0, res["stderr"][-2000:])
    summary = [line for line in (res["stdout"] + res["stderr"]).splitlines() if "staged" in line]
    print(f"[real-aufs] {label}: stage in {res['seconds']} s: {summary[-1:] or res['stdout'][-300:]}", flush=True)
    return res


def test_staging_beside_a_serving_engine(world):
    """Scenario B, first boot: the aufs engine serves writers; ``stage`` three times with a load, a run, an
    rmi and a commit in between; a last writer; then the power is cut with the engine up."""
    g = world["g2"]
    r = Remote(g)
    checks = Checks("staging beside a serving engine")
    with phase("B: stage three times beside a serving engine, then a power cut"):
        r.mount_disk(device="/dev/vda")
        r.engine_start(root=ROOT, driver="aufs")
        r.run(name="c_w1", image="a2o/build", cmd=["sh", "-c", WRITER_CMD], detach=True)
        stage(r, "B stage 1", checks)
        r.load_image(file=f"{SHARE}/later.tar")
        b1 = r.run(name="c_b1", image="a2o/later", cmd=["sh", "-c", B1_CMD])
        checks.expect("c_b1 ran", b1["code"] == 0, b1)
        stage(r, "B stage 2", checks)
        r.rmi(ref="a2o/ran:committed")
        r.commit(container="c_w1", repo="a2o/w1", tag="snap")
        stage(r, "B stage 3", checks)
        st = r.migrator(args=["status", "--root", ROOT, "--json"])
        world["b_staged"] = json.loads(st["stdout"]).get("staged")
        r.run(name="c_w2", image="a2o/w1:snap", cmd=["sh", "-c", WRITER_CMD], detach=True)
        world["b_containers"] = r.containers()
        time.sleep(3)  # the kernel's writeback (every second here) has the engine's last commits on the disk
        g.power_cut()
        world["b_cut"] = True
    print(f"[real-aufs] B: staged before the cut: {world['b_staged']}; containers: "
          f"{ {n: c['state'] for n, c in world['b_containers'].items()} }", flush=True)
    checks.done()


B1_CMD = ("if [ ! -e /b1 ]; then touch /b1 && rm -r /later && echo changed > /data/only && mkdir /data/sub "
          "&& chmod 700 /data; fi")


@pytest.fixture(scope="module")
def bench(world):
    """Boot 3: the three copies and scenario B's disk (``/dev/vda`` hardlink, ``vdb`` inplace, ``vdc``
    staged, ``vdd`` B); the variants run one after the other."""
    world["g2"].cleanup()  # B's first boot is over (cut), or failed: its disk is ours now
    d = world["disks"]
    with phase("boot 3"):
        g = boot([d["hardlink"], d["inplace"], d["staged"], world["disk"]], world["share"], time_limit=3600)
    world["guests"].append(g)
    yield g
    g.cleanup()


def start_stopped(r, checks, to_exit, to_run):
    """Start the stopped containers at once: those of ``to_exit`` must exit 0, those of ``to_run`` keep
    running."""
    for name in to_exit + to_run:
        r.start(name=name)
    for name in to_exit:
        code = r.wait(name=name)
        checks.expect(f"{name} starts and exits 0 on overlay2", code == 0, r.logs(name=name))
    for name in to_run:
        checks.expect(f"{name} starts on overlay2", r.wait_running(name=name) == "running")


def migrate_and_check(g, world, device, label, strategy=None, staged=False):
    """One variant on its disk: the migration (``run --strategy``, or ``stage`` beside the aufs engine with a
    container writing and then the cutover ``run``), the same views, diffs, saves and containers on overlay2,
    then ``rollback --force`` and the aufs engine again."""
    r = Remote(g)
    checks = Checks(label)
    names, chains = world["names"], world["chains"]
    own = own_layers(names)
    try:
        r.mount_disk(device=device)
        if staged:
            with phase(f"{label}: stage beside the aufs engine, c_run writing"):
                r.engine_start(root=ROOT, driver="aufs")
                checks.expect("c_run restarted by the aufs engine", r.wait_running(name="c_run") == "running")
                r.exec_in(name="c_run", cmd=["sh", "-c", "rm -f /stop; i=0; while [ ! -e /stop ]; do i=$((i+1)); "
                                             "echo $i >> /var/w.log; touch /tmp/s$i; rm -f /tmp/s$((i-2)); "
                                             "sleep 0.2; done"], detach=True)
                stage(r, label, checks)
                r.exec_in(name="c_run", cmd=["touch", "/stop"])
                time.sleep(1.5)
                ref_facts = engine_facts(r, saves=False)
                stopped = r.engine_stop()
                checks.expect("the aufs engine stopped cleanly", stopped["clean"] and not stopped["mounts_left"],
                              stopped)
                ref_views = r.views(root=ROOT, fs="aufs", names=names, timeout=900)
        else:
            ref_facts, ref_views = world["facts"], world["views"]
        with phase(f"{label}: migrate"):
            args = ["run", "--root", ROOT, "--engine-pidfile", PIDFILE] + (["--strategy", strategy] if strategy
                                                                            else [])
            res = r.migrator(args=args, timeout=900)
            assert res["code"] == 0, f"{label}: run exited {res['code']}:\n{res['stderr'][-3000:]}"
            if staged:
                checks.expect("the cutover says so", "cutover:" in res["stdout"], res["stdout"][-500:])
                print(f"[real-aufs] {label}: " + "; ".join(
                    x for x in (res["stdout"] + res["stderr"]).splitlines() if "cutover" in x or "staged" in x),
                    flush=True)
            found = r.findings(root=ROOT)
            show(f"{label}: findings", [f"{f['kind']} {(f.get('layer') or '-')[:12]} {f.get('detail')}" for f in found])
        with phase(f"{label}: overlay views"):
            over = r.views(root=ROOT, fs="overlay", names=names, timeout=900)
            bad, reported, limits = compare_views(ref_views, over, chains, found)
            show(f"{label}: views differing from aufs at paths the findings name", reported)
            show(f"{label}: views aufs could not describe", limits)
            checks.add("views differing from aufs, not reported", bad)
            checks.expect("x/acl keeps its ACL on overlay2", acl_kept(over))
        with phase(f"{label}: dockerd on overlay2"):
            r.engine_start(root=ROOT, driver="overlay2")
            checks.expect("c_run restarted by the overlay2 engine", r.wait_running(name="c_run") == "running")
            facts = engine_facts(r)
            checks.expect("same images", facts["images"] == world["facts"]["images"],
                          (world["facts"]["images"], facts["images"]))
            bad, allowed = compare_diffs(ref_facts["diffs"], facts["diffs"], found, own)
            show(f"{label}: docker diff entries only aufs lists", allowed)
            checks.add("docker diff", bad)
            checks.add("docker save", compare_saves(world["facts"]["saves"], facts["saves"]))
            bad, reported = compare_exec_view(world["facts"]["exec_view"], facts.get("exec_view"), found,
                                              chains["container c_run"])
            show(f"{label}: c_run's own view (docker exec) differing from aufs at paths the findings name",
                 reported)
            checks.add("c_run's own view (docker exec)", bad)
            start_stopped(r, checks, ("c_ran", "c_big"), ("c_new",))
            r.stop(name="c_new")
            after = {n: r.diff(name=n) for n in sorted(facts["containers"])}
            stopped = r.engine_stop()
            checks.expect("the overlay2 engine stopped cleanly", stopped["clean"] and not stopped["mounts_left"],
                          stopped)
            if strategy == "inplace":  # the containers' layers are the aufs data: rollback keeps their changes
                last = r.views(root=ROOT, fs="overlay", timeout=900, names={
                    n: lid for n, lid in names.items() if n.startswith("container ")})
        with phase(f"{label}: rollback --force, aufs views"):
            res = r.migrator(args=["rollback", "--root", ROOT, "--engine-pidfile", PIDFILE, "--force"], timeout=900)
            assert res["code"] == 0, f"{label}: rollback --force exited {res['code']}:\n{res['stderr'][-3000:]}"
            back = r.views(root=ROOT, fs="aufs", names=names, timeout=900)
            if strategy == "inplace":  # images exactly as before; containers as overlay2 left them
                images = [n for n in names if n.startswith("image ")]
                bad, reported, limits = compare_views({n: ref_views[n] for n in images},
                                                      {n: back[n] for n in images}, chains)
                checks.add("image views after rollback --force", bad + reported)
                bad, reported, limits = compare_views(last, {n: back[n] for n in last}, chains, found)
                show(f"{label}: after rollback, container views differing from overlay2's last at paths the "
                     "findings name", reported)
                checks.add("container views after rollback --force, against overlay2's last", bad)
            else:
                bad, reported, limits = compare_views(ref_views, back, chains)
                checks.add("views after rollback --force", bad + reported)
        with phase(f"{label}: the aufs engine again"):
            r.engine_start(root=ROOT, driver="aufs")
            checks.expect("c_run restarted by the aufs engine", r.wait_running(name="c_run") == "running")
            again = engine_facts(r, saves=False)
            checks.expect("same images on aufs again", again["images"] == world["facts"]["images"],
                          again["images"])
            if strategy == "inplace":
                bad, _allowed = compare_diffs(again["diffs"], after, found, own)
                checks.add("docker diff on aufs after rollback, against overlay2's last", bad)
            else:
                checks.add("docker diff on aufs after rollback", [
                    f"{n}: {d} -> {again['diffs'].get(n)}" for n, d in ref_facts["diffs"].items()
                    if again["diffs"].get(n) != d])
            bad, _reported = compare_exec_view(world["facts"]["exec_view"], again.get("exec_view"), (), ())
            checks.add("c_run's own view on aufs again", bad)
            r.engine_stop()
    finally:
        _clean_up(r, label)
    checks.done()


def _clean_up(r, label):
    """The engine stopped and the disk unmounted, whatever happened (a guest that is gone: the next variant
    says so)."""
    try:
        r.engine_stop()
        r.umount_disk()
    except Exception as exc:
        print(f"[real-aufs] {label}: cleaning up: {exc}", flush=True)


def test_run_hardlink(world, bench):
    migrate_and_check(bench, world, "/dev/vda", "A hardlink", strategy="hardlink")


def test_run_inplace(world, bench):
    migrate_and_check(bench, world, "/dev/vdb", "A inplace", strategy="inplace")


def test_stage_then_cutover(world, bench):
    migrate_and_check(bench, world, "/dev/vdc", "A staged", staged=True)


def test_cutover_after_the_power_cut(world, bench):
    """Scenario B, second boot: the cutover with the engine not started, then the same checks."""
    assert world.get("b_cut"), "scenario B's first boot did not reach its power cut"
    g = bench
    r = Remote(g)
    checks = Checks("B: the cutover after a power cut")
    try:
        with phase("B: aufs views after the cut"):
            r.mount_disk(device="/dev/vdd")
            names = r.layer_names(root=ROOT, driver="aufs")
            chains = r.layer_chains(root=ROOT, names=names)
            own = own_layers(names)
            ref_views = r.views(root=ROOT, fs="aufs", names=names, timeout=900)
            for name, seen in ref_views.items():
                checks.expect(f"aufs mounts {name}", seen[0] != "mount-error", seen)
        with phase("B: the cutover"):
            res = r.migrator(args=["run", "--root", ROOT, "--engine-pidfile", PIDFILE], timeout=900)
            assert res["code"] == 0, f"B: the cutover exited {res['code']}:\n{res['stderr'][-3000:]}"
            checks.expect("the cutover says so", "cutover:" in res["stdout"], res["stdout"][-500:])
            print("[real-aufs] B: " + "; ".join(x for x in (res["stdout"] + res["stderr"]).splitlines()
                                                 if "cutover" in x or "staged" in x or "dropped" in x), flush=True)
            found = r.findings(root=ROOT)
            show("B: findings", [f"{f['kind']} {(f.get('layer') or '-')[:12]} {f.get('detail')}" for f in found])
        with phase("B: overlay views"):
            over = r.views(root=ROOT, fs="overlay", names=names, timeout=900)
            bad, reported, limits = compare_views(ref_views, over, chains, found)
            show("B: views differing from aufs at paths the findings name", reported)
            show("B: views aufs could not describe", limits)
            checks.add("views differing from aufs, not reported", bad)
            checks.expect("x/acl keeps its ACL on overlay2", acl_kept(over))
        with phase("B: dockerd on overlay2"):
            r.engine_start(root=ROOT, driver="overlay2")
            checks.expect("c_run restarted by the overlay2 engine", r.wait_running(name="c_run") == "running")
            facts = engine_facts(r)
            tags = {line.split(" ", 1)[1] for line in facts["images"]} - {"<none>"}
            before = {line.split(" ", 1)[1] for line in world["facts"]["images"]} - {"<none>"}
            checks.expect("the images: those of before, less the one removed and with the two added between the "
                          "stages", tags == before - {"a2o/ran:committed"} | {"a2o/later:latest", "a2o/w1:snap"},
                          (sorted(before), sorted(tags)))
            checks.add("docker save", compare_saves({k: v for k, v in world["facts"]["saves"].items()
                                                     if k in facts["saves"]}, facts["saves"]))
            bad, reported = compare_exec_view(world["facts"]["exec_view"], facts.get("exec_view"), found,
                                              chains["container c_run"])
            show("B: c_run's own view (docker exec) differing from aufs at paths the findings name", reported)
            checks.add("c_run's own view (docker exec)", bad)
            start_stopped(r, checks, ("c_ran", "c_big", "c_b1"), ("c_new", "c_w1", "c_w2"))
            stopped = r.engine_stop()
            checks.expect("the overlay2 engine stopped cleanly", stopped["clean"] and not stopped["mounts_left"],
                          stopped)
        with phase("B: rollback --force, aufs views, the aufs engine"):
            res = r.migrator(args=["rollback", "--root", ROOT, "--engine-pidfile", PIDFILE, "--force"], timeout=900)
            assert res["code"] == 0, f"B: rollback --force exited {res['code']}:\n{res['stderr'][-3000:]}"
            back = r.views(root=ROOT, fs="aufs", names=names, timeout=900)
            bad, reported, limits = compare_views(ref_views, back, chains)
            checks.add("views after rollback --force", bad + reported)
            r.engine_start(root=ROOT, driver="aufs")
            again = engine_facts(r, saves=False)
            checks.expect("same images on aufs again", again["images"] == facts["images"],
                          (facts["images"], again["images"]))
            bad, allowed = compare_diffs(again["diffs"], facts["diffs"], found, own)
            show("B: docker diff entries only aufs lists", allowed)
            checks.add("docker diff, aufs after rollback against overlay2", bad)
            r.engine_stop()
    finally:
        _clean_up(r, "B")
    checks.done()
