"""Real-engine acceptance: a real dockerd accepts the migrated root, and every image and container is intact.

1. A private dockerd (overlay2) builds images with real RUN steps and makes containers; everything an engine
   can tell about them is recorded; the engine stops.
2. The root is turned into the root the aufs driver would have written (tests/support/aufsbuilder.py).
3. ``aufs2overlay run`` migrates it; dockerd starts on it with overlay2 and must see the same things.
4. The engine stops; ``rollback --force`` gives back the aufs root exactly as built in step 2.

The tests in this module run in order and share one engine root.
"""

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time

import pytest

from migrator.scan.proof import RACY_NS
from tests.conftest import STRATEGIES, WORKDIR, cli, needs_root, unpack_fixture
from tests.support import dockerd as dk
from tests.support import engineops
from tests.support.aufsbuilder import build_aufs_root, chain_ids
from tests.support.dockerd import assert_balena_root_runs, saved_layer_digests
from tests.support.manifest import diff_manifests, link_groups, manifest
from tests.support.rootstate import wait_stopped

pytestmark = [needs_root, pytest.mark.engine,
              pytest.mark.skipif(dk.available() is not None, reason=str(dk.available()))]

BUSYBOX = shutil.which("busybox") or "/bin/busybox"

APP_DOCKERFILE = """FROM a2o/base
RUN mkdir -p /data/d1 /data/keep/sub /deep/a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p \\
 && echo one > /data/d1/f && echo two > /data/f2 && echo three > /data/keep/sub/k \\
 && mkfifo /data/fifo && ln /data/f2 /data/hl && ln -s /data/f2 /data/sl && ln -s ../../etc /data/up \\
 && echo suid > /data/suid && chmod 4755 /data/suid && mkdir -m 2775 /data/sgid && chmod 1777 /data/d1 \\
 && echo deep > /deep/a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p/file && touch /data/empty
RUN rm /data/f2 && rm -r /data/d1 && mkdir /data/d1 && echo new > /data/d1/g && rm /bin/vi
RUN rm -r /data/keep && echo top > /data/top
"""
OTHER_DOCKERFILE = """FROM a2o/base
RUN echo other > /other && rm -r /tmp
"""
# Pulled while ``stage`` runs, in the staging test (its own layer sits on the app's, whiteouts included).
THIRD_DOCKERFILE = """FROM a2o/app
RUN echo third > /third && rm -r /data/d1 && mkdir -p /data/keep3 && echo k > /data/keep3/k
"""
# What a container sees, minus what the engine mounts afresh at every start (/proc, /sys, /dev, /etc/hosts…).
VIEW = ("find / -xdev ! -path / ! -path /proc ! -path /sys ! -path /dev ! -path /etc/hosts ! -path /etc/hostname "
        "! -path /etc/resolv.conf ! -path /.dockerenv ! -path /etc ! -path /etc/mtab "
        "-exec stat -c '%n %F %a %u %g %s %Y %N' {} + | sort; "
        "cat /data/d1/g /data/hl /data/suid 2>&1; cat /other 2>&1; true")
RAN_CMD = ("if [ ! -e /data/added ]; then echo added > /data/added; rm /data/hl; rm -r /deep/a/b; "
           "echo more >> /data/d1/g; mkdir -p /data/newdir; fi; exec sleep 1000")


def export_listing(data: bytes):
    out = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar.getmembers():
            digest = hashlib.sha256(tar.extractfile(m).read()).hexdigest() if m.isfile() else None
            out.append((m.name, m.type, m.mode, m.uid, m.gid, m.size, int(m.mtime), m.linkname,
                        m.devmajor, m.devminor, digest))
    return sorted(out)


def image_ids(engine):
    lines = engine.out("image", "ls", "-a", "--no-trunc", "--format", "{{.ID}} {{.Repository}}:{{.Tag}}")
    return sorted(lines.splitlines())


def make_base_rootfs(dest):
    """A minimal busybox root filesystem, as a tar for ``docker import``."""
    os.makedirs(os.path.join(dest, "bin"))
    shutil.copy2(os.path.realpath(BUSYBOX), os.path.join(dest, "bin", "busybox"))
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            os.symlink("busybox", os.path.join(dest, "bin", applet))
    for d, mode in (("etc", 0o755), ("tmp", 0o1777), ("root", 0o700), ("proc", 0o555), ("sys", 0o555),
                    ("dev", 0o755), ("var", 0o755), ("home", 0o755)):
        os.makedirs(os.path.join(dest, d), exist_ok=True)
        os.chmod(os.path.join(dest, d), mode)
    with open(os.path.join(dest, "etc", "passwd"), "w") as f:
        f.write("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(dest, arcname=".")
    return buf.getvalue()


@pytest.fixture(scope="module")
def world():
    """Steps 1 and 2: the recorded facts and the aufs root."""
    base = tempfile.mkdtemp(prefix="a2o-engine-", dir="/var/tmp")
    root = os.path.join(base, "docker")
    engine = dk.Dockerd(root)
    facts = {"root": root, "base": base}
    try:
        engine.start()
        engine.docker("import", "-", "a2o/base:latest", input=make_base_rootfs(os.path.join(base, "rootfs")))
        for tag, dockerfile in (("a2o/app:latest", APP_DOCKERFILE), ("a2o/other:latest", OTHER_DOCKERFILE),
                                ("a2o/third:latest", THIRD_DOCKERFILE)):
            ctx = os.path.join(base, "ctx-" + tag.split("/")[1].split(":")[0])
            os.makedirs(ctx)
            with open(os.path.join(ctx, "Dockerfile"), "w") as f:
                f.write(dockerfile)
            engine.docker("build", "-q", "-t", tag, ctx)
        engine.docker("tag", "a2o/app:latest", "a2o/app:v1")
        engine.docker("create", "--name", "c_new", "a2o/app", "sh", "-c", "exec sleep 1000")
        engine.docker("run", "-d", "--name", "c_ran", "a2o/app", "sh", "-c", RAN_CMD)
        engine.docker("run", "--name", "c_vol", "-v", "vol1:/vol", "a2o/app", "sh", "-c", "echo voldata > /vol/v")
        facts["ran_view"] = engine.out("exec", "c_ran", "sh", "-c", VIEW)
        engine.docker("stop", "-t", "1", "c_ran")
        facts["images"] = image_ids(engine)
        facts["saves"] = {}
        facts["digests"] = {}
        for ref in ("a2o/base:latest", "a2o/app:latest", "a2o/other:latest", "a2o/third:latest"):
            data, digests, diff_ids = saved_layer_digests(engine, ref)
            assert digests == diff_ids
            facts["saves"][ref] = data
            facts["digests"][ref] = digests
        facts["views"] = {ref: engine.out("run", "--rm", ref, "sh", "-c", VIEW)
                          for ref in ("a2o/app:latest", "a2o/other:latest", "a2o/third:latest")}
        facts["containers"] = {}
        for name in ("c_new", "c_ran", "c_vol"):
            cid = engine.out("inspect", "-f", "{{.Id}}", name).strip()
            facts["containers"][name] = {
                "id": cid,
                "diff": sorted(engine.out("diff", name).splitlines()),
                "export": export_listing(engine.docker("export", name).stdout),
            }
    finally:
        engine.cleanup()
    build_aufs_root(root, facts["saves"])
    facts["aufs_manifest"] = manifest(os.path.join(root, "aufs"))
    facts["image_aufs_manifest"] = manifest(os.path.join(root, "image", "aufs"))
    facts["configs"] = {}
    for c in facts["containers"].values():
        with open(os.path.join(root, "containers", c["id"], "config.v2.json"), "rb") as f:
            facts["configs"][c["id"]] = f.read()
    yield facts
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module", params=STRATEGIES)
def migrated(world, request):
    """Step 3, once per strategy: migrate a copy of the aufs root, then a dockerd with overlay2 on the result."""
    root = os.path.join(world["base"], f"docker-{request.param}")
    subprocess.run(["cp", "-a", world["root"], root], check=True)
    res = cli("run", "--root", root, "--engine-pidfile", "/nonexistent", "--strategy", request.param)
    assert res.returncode == 0, res.stderr
    cli("verify", "--root", root, check=0)
    engine = dk.Dockerd(root)
    engine.strategy = request.param
    try:
        engine.start()
        yield engine
    finally:
        engine.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def test_the_aufs_root_is_real_aufs(world):
    aufs = world["aufs_manifest"]
    assert any(p.endswith(b".wh..wh..opq") for p in aufs)
    assert any(p.endswith(b"/.wh.f2") for p in aufs)
    assert any(b".wh..wh.plnk/" in p for p in aufs)


def test_same_images_and_tags(world, migrated):
    assert image_ids(migrated) == world["images"]


def test_saved_layers_match_diff_ids(world, migrated):
    for ref, digests in world["digests"].items():
        _data, got, diff_ids = saved_layer_digests(migrated, ref)
        assert got == diff_ids == digests, ref


def test_images_show_the_same_files(world, migrated):
    for ref, expected in world["views"].items():
        assert migrated.out("run", "--rm", ref, "sh", "-c", VIEW) == expected, ref
    data = migrated.out("run", "--rm", "a2o/app", "ls", "-A", "/data").split()
    assert "f2" not in data and "keep" not in data and {"d1", "hl", "sl", "fifo", "suid", "top"} <= set(data)
    assert migrated.out("run", "--rm", "a2o/app", "ls", "-A", "/data/d1").split() == ["g"]
    assert migrated.docker("run", "--rm", "a2o/app", "test", "-e", "/bin/vi", check=False).returncode == 1


def test_containers_diff_and_export_unchanged(world, migrated):
    for name, c in world["containers"].items():
        assert sorted(migrated.out("diff", name).splitlines()) == c["diff"], name
        got = export_listing(migrated.docker("export", name).stdout)
        assert got == c["export"], (name, [x for x in got if x not in c["export"]][:5],
                                    [x for x in c["export"] if x not in got][:5])


def test_stopped_containers_start_and_see_their_changes(world, migrated):
    migrated.docker("start", "c_ran")
    try:
        assert migrated.out("exec", "c_ran", "sh", "-c", VIEW) == world["ran_view"]
        # Writes in place into the container's own layer: they must not reach the aufs data (rollback).
        migrated.docker("exec", "c_ran", "sh", "-c", "echo appended >> /data/added && chmod 600 /data/added")
    finally:
        migrated.docker("stop", "-t", "1", "c_ran")
    migrated.docker("start", "c_new")
    migrated.docker("stop", "-t", "1", "c_new")


def test_volume_data_is_there(migrated):
    assert migrated.out("run", "--rm", "-v", "vol1:/vol", "a2o/base", "cat", "/vol/v") == "voldata\n"


def test_build_from_a_migrated_image(world, migrated):
    ctx = os.path.join(world["base"], f"ctx-new-{migrated.strategy}")
    os.makedirs(ctx)
    with open(os.path.join(ctx, "Dockerfile"), "w") as f:
        f.write("FROM a2o/app\nRUN cat /data/d1/g > /built && rm /data/top\n")
    migrated.docker("build", "-q", "-t", "a2o/new", ctx)
    assert migrated.out("run", "--rm", "a2o/new", "sh", "-c", "cat /built; ls /data") .split("\n")[0] == "new"


def test_rm_and_rmi_remove_migrated_layers(world, migrated):
    root = migrated.data_root
    c_new = world["containers"]["c_new"]["id"]
    mount_id = open(os.path.join(root, "image", "overlay2", "layerdb", "mounts", c_new, "mount-id")).read()
    assert os.path.isdir(os.path.join(root, "overlay2", mount_id))
    migrated.docker("rm", "c_new")
    assert not os.path.exists(os.path.join(root, "overlay2", mount_id))
    assert not os.path.exists(os.path.join(root, "overlay2", mount_id + "-init"))
    top_other = world["digests"]["a2o/other:latest"]
    before = set(os.listdir(os.path.join(root, "overlay2")))
    migrated.docker("rmi", "a2o/other")
    after = set(os.listdir(os.path.join(root, "overlay2")))
    assert len(before - after) == 1 and len(top_other) == 2  # its own layer went, the shared base stayed


def test_rollback_force_returns_the_aufs_root(world, migrated):
    migrated.stop()
    root = migrated.data_root
    res = cli("rollback", "--root", root, "--engine-pidfile", "/nonexistent", "--force")
    if migrated.strategy == "inplace":
        # The engine removed a layer the migration had moved (rmi above): its aufs data is gone with it, and
        # rollback says so rather than give back an aufs root with a hole in it.
        assert res.returncode == 3 and "gone" in res.stderr, res.stderr
        assert os.path.isdir(os.path.join(root, "overlay2"))
        return
    assert res.returncode == 0, res.stderr
    aufs_now = manifest(os.path.join(root, "aufs"))
    assert aufs_now == world["aufs_manifest"], diff_manifests(world["aufs_manifest"], aufs_now)
    assert manifest(os.path.join(root, "image", "aufs")) == world["image_aufs_manifest"]
    assert not os.path.exists(os.path.join(root, "overlay2"))
    assert not os.path.exists(os.path.join(root, "image", "overlay2"))
    c_new = world["containers"]["c_new"]["id"]
    for cid, data in world["configs"].items():
        path = os.path.join(root, "containers", cid, "config.v2.json")
        if cid == c_new:
            assert not os.path.exists(path)  # removed by the engine after completion: nothing to restore
            continue
        with open(path, "rb") as f:
            assert f.read() == data


def test_inplace_rollback_of_an_engine_root_is_exact(world):
    """In place, then rolled back before an engine ran: the engine's aufs root comes back exactly, hardlinks
    among the aufs whiteouts included; then the same root migrates again and the engine starts on it."""
    root = os.path.join(world["base"], "docker-inplace-rollback")
    subprocess.run(["cp", "-a", world["root"], root], check=True)
    try:
        before = manifest(root, skip={WORKDIR}), link_groups(root, skip={WORKDIR})
        cli("run", "--root", root, "--engine-pidfile", "/nonexistent", "--strategy", "inplace", check=0)
        cli("rollback", "--root", root, "--engine-pidfile", "/nonexistent", "--force", check=0)
        after = manifest(root, skip={WORKDIR}), link_groups(root, skip={WORKDIR})
        assert after[0] == before[0], diff_manifests(before[0], after[0])
        assert after[1] == before[1]
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_real_balena_root_runs_on_dockerd(tmp_path, strategy):
    root = tempfile.mkdtemp(prefix="a2o-balena-", dir="/var/tmp")
    shutil.rmtree(root)
    unpack_fixture(root)
    try:
        cli("run", "--root", root, "--engine-pidfile", "/nonexistent", "--strategy", strategy, check=0)
        assert_balena_root_runs(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)




def _own_layers(root, repo):
    """An image's id (hex) and the layers only it holds, ``(cache id, chain hex)`` bottom first."""
    image_dir = os.path.join(root, "image", "aufs")
    with open(os.path.join(image_dir, "repositories.json")) as f:
        repos = json.load(f)["Repositories"]
    chains_of = {}
    for name, tags in repos.items():
        image_hex = next(iter(tags.values())).split(":")[1]
        with open(os.path.join(image_dir, "imagedb", "content", "sha256", image_hex)) as f:
            chains_of[name] = (image_hex, [c.split(":")[1] for c in chain_ids(json.load(f)["rootfs"]["diff_ids"])])
    image_hex, chains = chains_of[repo]
    shared = {c for name, (_h, cs) in chains_of.items() if name != repo for c in cs}
    own = []
    for chain in chains:
        if chain not in shared:
            with open(os.path.join(image_dir, "layerdb", "sha256", chain, "cache-id")) as f:
                own.append((f.read().strip(), chain))
    return image_hex, own


def test_staged_while_the_engine_works_then_the_cutover_runs_on_dockerd(world):
    """The engine's work while ``stage`` runs, on disk as moby does it (tests/support/engineops.py): a pull of
    a2o/third (taken out of the root first), an rmi of a2o/other, a write in c_ran's read-write layer; then the
    cutover, and dockerd 20.10 sees every image (the pulled one too) and container as they were, the removed
    image gone, ``docker save`` giving the diff ids."""
    base = tempfile.mkdtemp(prefix="a2o-staged-", dir="/var/tmp")
    root = os.path.join(base, "docker")
    subprocess.run(["cp", "-a", world["root"], root], check=True)
    third_hex, third_own = _own_layers(root, "a2o/third")
    other_hex, other_own = _own_layers(root, "a2o/other")
    assert len(third_own) == 1 and len(other_own) == 1
    stash = engineops.take_out_image(root, "a2o/third", third_hex, third_own, os.path.join(base, "pull"))
    c_ran = world["containers"]["c_ran"]["id"]
    with open(os.path.join(root, "image", "aufs", "layerdb", "mounts", c_ran, "mount-id")) as f:
        ran_layer = f.read().strip()
    time.sleep(RACY_NS / 1e9 + 0.2)  # the copy's directories are new: stage trusts them after this
    engine = dk.Dockerd(root)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "migrator", "stage", "--root", root],
                                env=dict(os.environ, AUFS2OVERLAY_STOP_AT="2"), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        wait_stopped(proc)
        engineops.pull(root, stash)
        engineops.remove_image(root, "a2o/other", other_hex, other_own)
        engineops.write_in_container(root, ran_layer, "data/written-while-staged", b"staged\n")
        os.killpg(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        res = cli("run", "--root", root, "--engine-pidfile", "/nonexistent", check=0)
        assert "cutover:" in res.stdout and "staged layers kept" in res.stderr, res.stderr
        cli("verify", "--root", root, check=0)
        engine.start()
        expected = [line for line in world["images"] if "a2o/other" not in line]
        assert image_ids(engine) == expected
        assert engine.docker("image", "inspect", "a2o/other", check=False).returncode != 0
        for ref, digests in world["digests"].items():
            if ref != "a2o/other:latest":
                _data, got, diff_ids = saved_layer_digests(engine, ref)
                assert got == diff_ids == digests, ref
        for ref in ("a2o/app:latest", "a2o/third:latest"):
            assert engine.out("run", "--rm", ref, "sh", "-c", VIEW) == world["views"][ref], ref
        for name, c in world["containers"].items():
            diff = sorted(engine.out("diff", name).splitlines())
            if name == "c_ran":
                assert diff == sorted(c["diff"] + ["A /data/written-while-staged"]), diff
            else:
                assert diff == c["diff"], name
                assert export_listing(engine.docker("export", name).stdout) == c["export"], name
    finally:
        engine.cleanup()
        shutil.rmtree(base, ignore_errors=True)


def test_a_staged_root_never_makes_dockerd_refuse(world):
    """With no storage driver configured, dockerd 20.10 fails on a staged root exactly as on the unstaged one
    here (no aufs in this kernel), never with "several valid graphdrivers": the staging area is named after
    no driver."""
    base = tempfile.mkdtemp(prefix="a2o-staged-", dir="/var/tmp")
    try:
        errors = []
        for name in ("plain", "staged"):
            root = os.path.join(base, name)
            subprocess.run(["cp", "-a", world["root"], root], check=True)
            if name == "staged":
                time.sleep(RACY_NS / 1e9 + 0.2)
                cli("stage", "--root", root, "-q", check=0)
                assert os.listdir(os.path.join(root, ".aufs2overlay", "staging"))
            errors.append(dk.Dockerd(root).start_error())
        assert errors[0] == errors[1], errors
        assert "several valid graphdrivers" not in errors[1]
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def trixie(tmp_path_factory):
    """A fresh Debian 13 chroot with its docker.io (dockerd 26, which has no aufs driver), proc, sys and dev
    mounted; ``/work`` in it is a directory of the host."""
    if shutil.which("debootstrap") is None:
        pytest.skip("needs debootstrap (apt-get install debootstrap)")
    target = str(tmp_path_factory.mktemp("trixie") / "root")
    res = subprocess.run(["debootstrap", "--variant=minbase", "--include=docker.io,ca-certificates", "trixie", target,
                          "http://deb.debian.org/debian"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    work = os.path.join(tmp_path_factory.mktemp("trixie-work"))
    mounted = []
    try:
        for what, where, opts in (("proc", "proc", ["-t", "proc"]), ("/dev", "dev", ["--rbind"]),
                                  ("/sys", "sys", ["--rbind"]), (work, "work", ["--bind"])):
            os.makedirs(os.path.join(target, where), exist_ok=True)
            subprocess.run(["mount", *opts, what, os.path.join(target, where)], check=True)
            mounted.append(os.path.join(target, where))
        yield {"target": target, "work": work}
    finally:
        for path in reversed(mounted):
            subprocess.run(["umount", "-R", "-l", path], check=False)


def _dockerd_in_chroot(trixie, root_in_chroot):
    """Start the chroot's dockerd on ``root_in_chroot`` with no storage driver configured; what it reports
    (its version, its driver, its images), then stop it by its pid."""
    chroot = ["chroot", trixie["target"]]
    run = f"/run/a2o-{os.path.basename(root_in_chroot)}"
    docker = [dk.DOCKER, "-H", f"unix://{trixie['target']}{run}.sock"]  # the host's client: the API negotiates
    log = open(os.path.join(trixie["work"], os.path.basename(root_in_chroot) + ".log"), "wb")
    proc = subprocess.Popen(chroot + ["dockerd", "--data-root", root_in_chroot, "--exec-root", run + "-exec",
                                      "--pidfile", run + ".pid", "-H", f"unix://{run}.sock", "--iptables=false",
                                      "--ip6tables=false", "--bridge=none"],
                            stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(docker + ["version"], capture_output=True).returncode != 0:
            assert proc.poll() is None and time.monotonic() < deadline, open(log.name).read()[-3000:]
            time.sleep(0.3)
        version = subprocess.run(docker + ["version", "--format", "{{.Server.Version}}"], capture_output=True,
                                 text=True, check=True).stdout.strip()
        driver = subprocess.run(docker + ["info", "--format", "{{.Driver}}"], capture_output=True, text=True,
                                check=True).stdout.strip()
        images = subprocess.run(docker + ["images", "-q"], capture_output=True, text=True, check=True).stdout.split()
        return version, driver, images
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()


def test_dockerd_26_starts_on_a_staged_root_as_on_the_unstaged_one(world, trixie):
    """Debian 13's dockerd (26, no aufs driver) on a root that is staged starts exactly as on the same root
    unstaged: it knows no driver there but overlay2, and the staging area is named after none."""
    seen = []
    for name in ("plain", "staged"):
        root = os.path.join(trixie["work"], name)
        subprocess.run(["cp", "-a", world["root"], root], check=True)
        if name == "staged":
            time.sleep(RACY_NS / 1e9 + 0.2)
            cli("stage", "--root", root, "-q", check=0)
            staged = manifest(os.path.join(root, ".aufs2overlay", "staging"))
        seen.append(_dockerd_in_chroot(trixie, f"/work/{name}"))
    assert seen[0] == seen[1], seen
    assert seen[1][0].startswith("26.") and seen[1][1] == "overlay2", seen
    assert manifest(os.path.join(trixie["work"], "staged", ".aufs2overlay", "staging")) == staged
