"""The single-file build: ``packaging/build-binary`` makes it, it is static, and it is the same program as the
installed package, run where there is no Python and no C library (a chroot holding only busybox).

Also: the README's set-up command, verbatim, in a freshly debootstrapped minimal Debian 12.
"""

import json
import os
import platform
import re
import shutil
import subprocess
import tempfile

import pytest

import tests.support.dockerd as dk
from migrator import __version__
from tests.conftest import cli, needs_root, unpack_fixture
from tests.support.dockerd import assert_balena_root_runs
from tests.support.hostile import c_awkward_names, c_special_files, c_symlinks_out
from tests.support.rootstate import assert_chains_match, aufs_views, whole_root
from tests.support.signature import tree_signature

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BUSYBOX = shutil.which("busybox") or "/bin/busybox"
CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"

# No pytestmark: the build installs with apt and the chroots need root, so each test of the build needs root
# through the ``binary`` fixture (conftest.py), the debootstrapped set-up is marked itself, and the README's
# check runs as any user.


class Chroot:
    """A directory holding busybox (static), its applets as links, and the binary: no Python, no libc, no
    other file. What every host has from its kernel is mounted: /proc (the binary finds itself through
    /proc/self/exe) and /dev (/dev/shm for the worker processes' semaphores)."""

    def __init__(self, top: str, binary: str) -> None:
        self.top = top
        for d in ("bin", "proc", "dev", "tmp", "work"):
            os.makedirs(os.path.join(top, d), exist_ok=True)
        os.chmod(os.path.join(top, "tmp"), 0o1777)
        shutil.copy2(BUSYBOX, os.path.join(top, "bin", "busybox"))
        subprocess.run([CHROOT, top, "/bin/busybox", "--install", "-s", "/bin"], check=True)
        shutil.copy2(binary, os.path.join(top, "bin", "aufs2overlay"))
        self.mounts = []
        for args in (["-t", "proc", "proc"], ["--rbind", "/dev"]):
            where = os.path.join(top, "proc" if args[0] == "-t" else "dev")
            subprocess.run(["mount", *args, where], check=True)
            self.mounts.append(where)

    def path(self, inside: str) -> str:
        return os.path.join(self.top, inside.lstrip("/"))

    def run(self, *args: str, check=None, env=None):
        full_env = {"PATH": "/bin", "HOME": "/", **(env or {})}
        res = subprocess.run([CHROOT, self.top, "/bin/aufs2overlay", *args], capture_output=True, text=True,
                             env=full_env)
        if check is not None:
            assert res.returncode == check, f"exit {res.returncode}\n{res.stdout}\n{res.stderr}"
        return res

    def close(self) -> None:
        for where in reversed(self.mounts):
            subprocess.run(["umount", "-R", "-l", where], check=False)


@pytest.fixture
def chroot(tmp_path, binary):
    box = Chroot(str(tmp_path / "chroot"), binary)
    try:
        yield box
    finally:
        box.close()


def test_the_build_is_static(binary):
    res = subprocess.run(["ldd", binary], capture_output=True, text=True)
    assert "not a dynamic executable" in res.stdout + res.stderr, res.stdout + res.stderr
    with open(binary, "rb") as f:
        head = f.read(64)
    assert head[:4] == b"\x7fELF"
    # no PT_INTERP: readelf lists no program interpreter
    res = subprocess.run(["readelf", "-l", binary], capture_output=True, text=True)
    assert "INTERP" not in res.stdout


def test_version_names_the_architecture_and_python(binary):
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    assert re.fullmatch(rf"aufs2overlay {re.escape(__version__)} \(single-file build, {platform.machine()}, "
                        r"Python 3\.\d+\.\d+\)\n", out), out
    assert cli("--version", check=0).stdout == f"aufs2overlay {__version__}\n"


def test_demo_in_a_busybox_only_chroot(chroot):
    assert sorted(os.listdir(chroot.top)) == ["bin", "dev", "proc", "tmp", "work"]
    assert sorted(os.listdir(chroot.path("/bin")))[:2] != [] and not os.path.exists(chroot.path("/lib"))
    res = chroot.run("demo", check=0)
    assert "verify: ok" in res.stdout and "phase:      completed" in res.stdout, res.stdout


def _in_chroot_copy(chroot, root, name):
    dest = chroot.path(f"/work/{name}")
    subprocess.run(["cp", "-a", root, dest], check=True)
    return dest, f"/work/{name}"


def test_same_results_as_the_package_on_unseen_roots(chroot, template, reference, tmp_path, strategy):
    """The sample root (the package's own run is the reference) and hostile ones; every chain, mounted by the
    kernel, shows the aufs view; rollback gives back the exact root."""
    outside, inside = _in_chroot_copy(chroot, template, f"sample-{strategy}")
    chroot.run("run", "--root", inside, "--engine-pidfile", "/nonexistent", "-q", "--strategy", strategy, check=0)
    assert tree_signature(outside) == reference["signature"]

    hostile = tmp_path / "hostile"
    hostile.mkdir()
    roots = []
    for build in (c_awkward_names, c_symlinks_out, c_special_files):
        case = hostile / build.__name__
        case.mkdir()
        root, _outside = build(case)
        roots.append(root)
    for i, root in enumerate(roots):
        outside, inside = _in_chroot_copy(chroot, root, f"hostile{i}-{strategy}")
        views = aufs_views(outside)
        before = whole_root(outside)
        chroot.run("run", "--root", inside, "--engine-pidfile", "/nonexistent", "-q", "--strategy", strategy,
                   check=0)
        assert_chains_match(outside, views)
        chroot.run("verify", "--root", inside, check=0)
        chroot.run("rollback", "--root", inside, "--engine-pidfile", "/nonexistent", "--force", "-q", check=0)
        after = whole_root(outside)
        assert after[0] == before[0] and after[1] == before[1]


@pytest.mark.engine
@pytest.mark.skipif(dk.available() is not None, reason=str(dk.available()))
def test_real_root_migrated_in_the_chroot_runs_on_dockerd(chroot):
    """The seed's real balena root, migrated by the binary inside the chroot (status --json, verify there too),
    is accepted by a real dockerd on the host; a copy taken before the engine ran rolls back exactly."""
    outside = chroot.path("/work/balena")
    unpack_fixture(outside)
    pristine = whole_root(outside)
    chroot.run("run", "--root", "/work/balena", "--engine-pidfile", "/nonexistent", "-q", check=0)
    status = json.loads(chroot.run("status", "--root", "/work/balena", "--json", check=0).stdout)
    assert status["phase"] == "completed" and len(status["layers"]) == 5
    assert all(layer["state"] == "committed" for layer in status["layers"])
    chroot.run("verify", "--root", "/work/balena", check=0)
    subprocess.run(["cp", "-a", outside, chroot.path("/work/balena-copy")], check=True)
    chroot.run("rollback", "--root", "/work/balena-copy", "--engine-pidfile", "/nonexistent", "--force", "-q",
               check=0)
    after = whole_root(chroot.path("/work/balena-copy"))
    assert after[0] == pristine[0] and after[1] == pristine[1]

    root = tempfile.mkdtemp(prefix="a2o-bin-", dir="/var/tmp")
    os.rmdir(root)
    shutil.move(outside, root)
    try:
        assert_balena_root_runs(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def small_tmpfs(tmp_path):
    mounts = []

    def make(name, options):
        path = str(tmp_path / name)
        os.makedirs(path)
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", path], check=True)
        mounts.append(path)
        return path

    yield make
    for path in mounts:
        subprocess.run(["umount", "-l", path], check=False)


def _one_error_line(res):
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("aufs2overlay: error: "), res.stderr
    return lines[0]


def test_a_noexec_or_full_temporary_directory_gets_one_line_naming_the_fix(binary, small_tmpfs, tmp_path):
    noexec = small_tmpfs("noexec", "noexec,size=256m")
    res = subprocess.run([binary, "status", "--root", str(tmp_path)], capture_output=True, text=True,
                         env={**os.environ, "TMPDIR": noexec})
    line = _one_error_line(res)
    assert res.returncode == 1 and "noexec" in line and "set TMPDIR" in line and noexec in line
    assert os.listdir(noexec) == []

    full = small_tmpfs("full", "size=8m")
    res = subprocess.run([binary, "status", "--root", str(tmp_path)], capture_output=True, text=True,
                         env={**os.environ, "TMPDIR": full})
    line = _one_error_line(res)
    assert res.returncode == 1 and "MiB free" in line and "set TMPDIR" in line
    assert os.listdir(full) == []

    no_inodes = small_tmpfs("no-inodes", "size=256m,nr_inodes=40")
    res = subprocess.run([binary, "status", "--root", str(tmp_path)], capture_output=True, text=True,
                         env={**os.environ, "TMPDIR": no_inodes})
    line = _one_error_line(res)
    assert res.returncode == 1 and "free inodes" in line and "set TMPDIR" in line, res.stderr
    assert os.listdir(no_inodes) == []

    res = subprocess.run([binary, "status", "--root", str(tmp_path)], capture_output=True, text=True,
                         env={**os.environ, "TMPDIR": str(tmp_path / "nowhere")})
    assert res.returncode == 1 and "set TMPDIR" in _one_error_line(res)

    roomy = small_tmpfs("roomy", "size=256m")
    res = subprocess.run([binary, "status", "--root", str(tmp_path)], capture_output=True, text=True,
                         env={**os.environ, "TMPDIR": roomy})
    assert res.returncode == 0, res.stderr
    assert os.listdir(roomy) == [], "the build left its unpacked files behind"


def test_programs_it_starts_get_the_hosts_environment(binary, template, tmp_path):
    """verify starts ``mount``: a stand-in first on PATH records the environment it was given."""
    root = str(tmp_path / "docker")
    subprocess.run(["cp", "-a", template, root], check=True)
    subprocess.run([binary, "run", "--root", root, "--engine-pidfile", "/nonexistent", "-q"], check=True)
    fake = tmp_path / "fakebin"
    fake.mkdir()
    record = tmp_path / "mount-env"
    script = fake / "mount"
    script.write_text(f"#!/bin/sh\nenv > {record}\nexit 1\n")
    script.chmod(0o755)
    host_env = {"PATH": f"{fake}:/usr/sbin:/usr/bin:/sbin:/bin", "LD_LIBRARY_PATH": "/host/lib",
                "A2O_HOST_ONLY": "kept"}
    subprocess.run([binary, "verify", "--root", root], capture_output=True, text=True, env=host_env)
    seen = dict(line.split("=", 1) for line in record.read_text().splitlines() if "=" in line)
    assert seen["LD_LIBRARY_PATH"] == "/host/lib"
    assert seen["A2O_HOST_ONLY"] == "kept"
    leaked = [k for k in seen if k.startswith(("_PYI", "_MEI", "STATICX")) or k.endswith("_ORIG")]
    assert not leaked, leaked

    del host_env["LD_LIBRARY_PATH"]
    subprocess.run([binary, "verify", "--root", root], capture_output=True, text=True, env=host_env)
    seen = dict(line.split("=", 1) for line in record.read_text().splitlines() if "=" in line)
    assert "LD_LIBRARY_PATH" not in seen


def copy_checkout(dest: str) -> None:
    """The files of this checkout (what git tracks; without git, all but what builds and tests leave)."""
    if os.path.isdir(os.path.join(REPO, ".git")):
        files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
        listing = ["--null", "-T", "-"]
    else:
        files, listing = None, ["--exclude=./build", "--exclude=./dist", "--exclude=./.venv", "."]
    packed = subprocess.run(["tar", "-cf", "-", *listing], cwd=REPO, input=files, capture_output=True, check=True)
    subprocess.run(["tar", "-xf", "-", "-C", dest], input=packed.stdout, check=True)


def readme_setup_block() -> str:
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    section = text.split("## Set-up on a fresh machine", 1)[1]
    return re.search(r"```\n(.*?)```", section, re.S).group(1).strip()


@needs_root
@pytest.mark.skipif(shutil.which("debootstrap") is None, reason="needs debootstrap (apt-get install debootstrap)")
def test_readme_setup_in_a_fresh_minimal_debian_12(tmp_path):
    """The first code block under the README's set-up heading, verbatim, as root in a freshly debootstrapped
    minbase Debian 12 (no python3 there), from a copy of this checkout: it ends in a completed demo."""
    target = str(tmp_path / "debian12")
    subprocess.run(["debootstrap", "--variant=minbase", "bookworm", target, "http://deb.debian.org/debian"],
                   check=True, capture_output=True)
    assert not os.path.exists(os.path.join(target, "usr", "bin", "python3"))
    src = os.path.join(target, "src")
    os.makedirs(src)
    copy_checkout(src)
    # The host's network set-up, as for any chroot: its resolver, and the certificates it trusts for the package
    # index (this site's TLS proxy among them), in a file that no package of the chroot owns.
    shutil.copy("/etc/resolv.conf", os.path.join(target, "etc", "resolv.conf"))
    os.makedirs(os.path.join(target, "etc", "ssl"), exist_ok=True)
    shutil.copy(os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt",
                os.path.join(target, "etc", "ssl", "host-ca-certificates.crt"))
    mounted = []
    try:
        for what, where, opts in (("proc", "proc", ["-t", "proc"]), ("/dev", "dev", ["--rbind"]),
                                  ("/sys", "sys", ["--rbind"])):
            subprocess.run(["mount", *opts, what, os.path.join(target, where)], check=True)
            mounted.append(os.path.join(target, where))
        block = readme_setup_block()
        res = subprocess.run([CHROOT, target, "/bin/bash", "-e", "-c", f"cd /src && {block}"],
                             capture_output=True, text=True,
                             env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                                  "HOME": "/root", "LANG": "C.UTF-8",
                                  "PIP_CERT": "/etc/ssl/host-ca-certificates.crt"})
        assert res.returncode == 0, f"{block}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        assert "verify: ok" in res.stdout and "phase:      completed" in res.stdout, res.stdout[-2000:]
    finally:
        for path in reversed(mounted):
            subprocess.run(["umount", "-R", "-l", path], check=False)


def test_readme_puts_the_operators_single_file_first():
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    first_section = text.split("\n## ", 2)[1]
    assert "build-binary" in first_section or "single file" in first_section.lower()
    with open(os.path.join(REPO, "docs", "aufs2overlay.service")) as f:
        unit = f.read()
    assert re.search(r"^ExecStart=/usr/local/bin/aufs2overlay run ", unit, re.M)
