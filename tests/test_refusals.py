"""Bad input and unsafe situations: one clear line, a documented exit code, and the root left untouched."""

import fcntl
import os
import shutil
import subprocess

import pytest

from migrator import sample
from tests.conftest import cli, needs_root, run_args
from tests.support.manifest import manifest

# No pytestmark: a root built by ``sample`` has files of other owners, and a ``run`` that gets past its refusals
# probes overlay (mknod, trusted.* xattrs, a mount), so those tests say ``@needs_root`` (or get it from their
# fixture); a root that is no root at all, or holds no aufs, is refused or left alone as any user.

LID = sample.layer_id


def build(tmp_path, layers, images=None, containers=None):
    root = str(tmp_path / "docker")
    sample.build_aufs_root(root, layers, images or {}, containers or {})
    return root


def small_chain(depth):
    ids = [LID(f"layer{i}") for i in range(depth)]
    layers = {}
    for i, lid in enumerate(ids):
        layers[lid] = (list(reversed(ids[:i])), [(b"f%d" % i, "file", {"data": b"x"})])
    return ids, layers


def assert_refused(root, *extra, code=3, words=()):
    before = manifest(root)
    res = cli(*run_args(root), *extra)
    assert res.returncode == code, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("aufs2overlay: error: "), res.stderr
    for word in words:
        assert word in lines[0]
    assert "Traceback" not in res.stderr
    assert manifest(root) == before, "a refused run changed the root"
    return lines[0]


def test_no_aufs_is_nothing_to_migrate(tmp_path):
    root = tmp_path / "docker"
    root.mkdir()
    res = cli(*run_args(str(root)), check=0)
    assert "nothing to migrate" in res.stdout
    assert os.listdir(root) == []


def test_missing_root_is_a_usage_error(tmp_path):
    res = cli(*run_args(str(tmp_path / "nope")))
    assert res.returncode == 2 and "not a directory" in res.stderr


@needs_root
def test_empty_aufs_migrates_to_empty_overlay2(tmp_path):
    root = tmp_path / "docker"
    (root / "aufs" / "diff").mkdir(parents=True)
    (root / "aufs" / "layers").mkdir()
    cli(*run_args(str(root)), check=0)
    assert os.listdir(root / "overlay2") == ["l"]


@needs_root
def test_mounted_layer_means_a_running_engine(tmp_path):
    ids, layers = small_chain(2)
    root = build(tmp_path, layers)
    mnt = os.path.join(root, "aufs", "mnt", ids[1])
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", mnt], check=True)
    try:
        assert_refused(root, words=("engine", "stop it"))
    finally:
        subprocess.run(["umount", mnt], check=True)


@needs_root
def test_live_engine_pidfile(tmp_path):
    ids, layers = small_chain(1)
    root = build(tmp_path, layers)
    fake = tmp_path / "dockerd"
    shutil.copy("/bin/sleep", fake)
    proc = subprocess.Popen([str(fake), "30"])
    try:
        pidfile = tmp_path / "docker.pid"
        pidfile.write_text(str(proc.pid))
        before = manifest(root)
        res = cli("run", "--root", root, "--engine-pidfile", str(pidfile))
        assert res.returncode == 3 and "engine" in res.stderr
        assert manifest(root) == before
    finally:
        proc.kill()
        proc.wait()
    # A stale pidfile (no such process any more) does not block.
    cli("run", "--root", root, "--engine-pidfile", str(pidfile), "-q", check=0)


@needs_root
@pytest.mark.parametrize("existing", ["overlay2", "image/overlay2"])
def test_foreign_overlay2_is_refused(tmp_path, existing):
    ids, layers = small_chain(2)
    root = build(tmp_path, layers, {"img": ids})
    os.makedirs(os.path.join(root, existing))
    assert_refused(root, words=(existing + "/", "not this migration's"))


@needs_root
def test_chain_deeper_than_overlay2_allows(tmp_path):
    ids, layers = small_chain(130)
    root = build(tmp_path, layers)
    assert_refused(root, words=("129 ancestors", "128"))


@needs_root
def test_chain_of_exactly_128_lowers_is_fine(tmp_path):
    ids, layers = small_chain(129)
    root = build(tmp_path, layers)
    cli(*run_args(root), check=0)
    with open(os.path.join(root, "overlay2", ids[-1], "lower")) as f:
        assert len(f.read().split(":")) == 128


@needs_root
def test_missing_parent(tmp_path):
    ids, layers = small_chain(3)
    root = build(tmp_path, layers)
    shutil.rmtree(os.path.join(root, "aufs", "diff", ids[0]))
    os.unlink(os.path.join(root, "aufs", "layers", ids[0]))
    assert_refused(root, words=("storage missing", ids[0]))


@needs_root
def test_parent_cycle(tmp_path):
    ids, layers = small_chain(2)
    root = build(tmp_path, layers)
    with open(os.path.join(root, "aufs", "layers", ids[0]), "w") as f:
        f.write(ids[1] + "\n" + ids[0] + "\n")
    assert_refused(root, words=("cycle",))


@needs_root
def test_garbled_layers_file(tmp_path):
    ids, layers = small_chain(2)
    root = build(tmp_path, layers)
    with open(os.path.join(root, "aufs", "layers", ids[1]), "wb") as f:
        f.write(b"\x00\xff garbage\n")
    assert_refused(root, words=("garbled",))


@needs_root
def test_layer_dir_symlink_out_of_root(tmp_path):
    ids, layers = small_chain(1)
    root = build(tmp_path, layers)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(str(outside), os.path.join(root, "aufs", "diff", LID("evil")))
    assert_refused(root, words=("symlink",))
    assert os.listdir(outside) == []


@needs_root
def test_layer_without_layers_file(tmp_path):
    ids, layers = small_chain(2)
    root = build(tmp_path, layers, {"img": ids})
    stray = os.path.join(root, "aufs", "diff", LID("stray"))
    os.makedirs(stray)
    res = cli("run", "--root", root, "--engine-pidfile", "/nonexistent", check=0)
    assert "skipped-layer-without-layers-file" in res.stderr
    assert not os.path.exists(os.path.join(root, "overlay2", LID("stray")))


@needs_root
def test_layer_used_by_the_store_without_layers_file(tmp_path):
    ids, layers = small_chain(2)
    root = build(tmp_path, layers, {"img": ids})
    os.unlink(os.path.join(root, "aufs", "layers", ids[1]))
    assert_refused(root, words=("ancestry is unknown",))


@needs_root
def test_unreadable_container_config(tmp_path):
    ids, layers = small_chain(1)
    root = build(tmp_path, layers, {"img": ids}, {LID("c"): ("img", "aufs")})
    with open(os.path.join(root, "containers", LID("c"), "config.v2.json"), "wb") as f:
        f.write(b'{"Driver": "aufs", ')
    assert_refused(root, words=("config.v2.json", "unreadable"))


@needs_root
def test_leftover_temp_tree_of_an_earlier_attempt(tmp_path):
    ids, layers = small_chain(2)
    root = build(tmp_path, layers, {"img": ids})
    os.makedirs(os.path.join(root, "overlay2.temp", ids[0], "diff"))
    os.makedirs(os.path.join(root, "image", "overlay2.temp", "junk"))
    res = cli("run", "--root", root, "--engine-pidfile", "/nonexistent", check=0)
    assert "leftover" in res.stderr
    cli("verify", "--root", root, check=0)
    assert not os.path.exists(os.path.join(root, "image", "overlay2", "junk"))


@needs_root
def test_second_migrator_is_locked_out(tmp_path):
    ids, layers = small_chain(2)
    root = build(tmp_path, layers)
    os.makedirs(os.path.join(root, ".aufs2overlay"))
    fd = os.open(os.path.join(root, ".aufs2overlay", "lock"), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        res = cli(*run_args(root))
        assert res.returncode == 4 and "another aufs2overlay" in res.stderr
        assert not os.path.exists(os.path.join(root, "overlay2.temp"))
    finally:
        os.close(fd)
    cli(*run_args(root), check=0)


@needs_root
def test_status_without_migration(tmp_path):
    ids, layers = small_chain(1)
    root = build(tmp_path, layers)
    res = cli("status", "--root", root, check=0)
    assert "not-started" in res.stdout
    assert not os.path.exists(os.path.join(root, ".aufs2overlay"))


@needs_root
def test_cleanup_and_rollback_refusals(tmp_path):
    ids, layers = small_chain(2)
    root = build(tmp_path, layers)
    assert cli("rollback", "--root", root).returncode == 0  # nothing to roll back
    cli(*run_args(root), check=0)
    cli("cleanup", "--root", root, "--engine-pidfile", "/nonexistent", check=0)
    res = cli("rollback", "--root", root, "--force")
    assert res.returncode == 3 and "removed by cleanup" in res.stderr


@pytest.mark.parametrize("command,option,value", [
    (command, "--state-db", value) for command in ("run", "plan", "status", "rollback")
    for value in ("{tmp}/nonexistent/dir/state.db", "{tmp}")
] + [(command, "--log-file", value) for command in ("run", "rollback", "cleanup")
     for value in ("{tmp}/nonexistent/run.log", "{tmp}")])
def test_a_state_db_or_log_file_where_none_can_be_is_a_usage_error(sample_root, tmp_path, command, option, value):
    """A missing folder is never created (a state database nobody finds again), a folder is not a file: exit 2,
    one line, nothing written."""
    path = value.format(tmp=tmp_path)
    before = manifest(sample_root)
    pidfile = ["--engine-pidfile", "/nonexistent"] if command in ("run", "rollback", "cleanup") else []
    res = cli(command, "--root", sample_root, *pidfile, option, path)
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and option in res.stderr, res.stderr
    assert not os.path.exists(os.path.join(str(tmp_path), "nonexistent"))
    assert manifest(sample_root) == before
