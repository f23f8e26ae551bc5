"""Faults: disk full, out of inodes, read-only filesystem, a concurrent run, a lost or corrupted state database.

Each gives one clear error line, a documented exit code, an unchanged aufs tree, and a way forward.
"""

import functools
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import WORKDIR, cli, needs_root, run_args
from tests.support.loopfs import LoopFS, can_loop
from tests.support.manifest import diff_manifests, manifest
from tests.support.rootstate import aufs_side, wait_stopped, whole_root
from tests.support.signature import tree_signature

pytestmark = [needs_root, pytest.mark.skipif(can_loop() is not None, reason=str(can_loop()))]





def untouched_or_undone(root, strategy, before, whole):
    """After a failed run (and the cause removed): the hardlink strategy never touched the aufs data; the
    in-place one may have moved it, and a rollback gives back the exact root, from which a run starts over."""
    if strategy == "hardlink":
        assert aufs_side(root) == before
        return
    cli("rollback", "--root", root, "--engine-pidfile", "/nonexistent", "--force", check=0)
    after = whole_root(root)
    assert after[0] == whole[0], diff_manifests(whole[0], after[0])
    assert after[1] == whole[1]


def one_error_line(res):
    lines = [line for line in res.stderr.splitlines() if line.startswith("aufs2overlay: error:")]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    return lines[0]


def fill(path, leave_bytes):
    """Fill the filesystem of ``path`` until about ``leave_bytes`` are free (to root, who may use the reserve):
    a reserve file of that size first, then everything else in shrinking chunks, then the reserve goes."""
    filler = os.path.join(path, "filler")
    os.makedirs(filler, exist_ok=True)
    reserve = os.path.join(filler, "reserve")
    if leave_bytes:
        with open(reserve, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, leave_bytes)
    n = 0
    for chunk in (1 << 20, 64 << 10, 4 << 10, 1 << 10):
        while True:
            try:
                with open(os.path.join(filler, f"{n}"), "wb") as f:
                    n += 1
                    os.posix_fallocate(f.fileno(), 0, chunk)
            except OSError:
                break
    if leave_bytes:
        os.unlink(reserve)
    return filler


def use_inodes(path, leave):
    d = os.path.join(path, "inode-filler")
    os.makedirs(d, exist_ok=True)
    i = 0
    while os.statvfs(path).f_ffree > leave:
        open(os.path.join(d, str(i)), "wb").close()
        i += 1
    return d


def run_filled_at(root, strategy, n, make_full):
    """Start `run`, freeze it at checkpoint ``n`` (its plan has passed), exhaust the filesystem with
    ``make_full()``, and let it go on; return the finished process and what ``make_full`` returned."""
    env = dict(os.environ, AUFS2OVERLAY_STOP_AT=str(n))
    proc = subprocess.Popen([sys.executable, "-m", "migrator", "run", "--root", root, "--engine-pidfile",
                             "/nonexistent", "--strategy", strategy], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_stopped(proc)
        filler = make_full()
    finally:
        os.killpg(proc.pid, signal.SIGCONT)  # the migrator and its layer workers
    out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), filler


def stop_points(labels):
    """The first checkpoint of each kind (labels with their ids left out), but not inside a layer step."""
    seen, picks = set(), []
    for n, label in enumerate(labels, 1):
        kind = " ".join(w for w in label.split() if len(w) < 26 and not w.isdigit())
        if kind not in seen and not label.startswith(("walked", "changed in place")):
            seen.add(kind)
            picks.append(n)
    return picks


def test_disk_too_full_to_start_is_refused(template, reference, tmp_path):
    disk = LoopFS.create(str(tmp_path), size_mb=8)
    try:
        root = os.path.join(disk.mountpoint, "docker")
        subprocess.run(["cp", "-a", template, root], check=True)
        whole = whole_root(root)
        fill(disk.mountpoint, 0)
        res = cli(*run_args(root, strategy=reference["strategy"]))
        assert res.returncode == 3 and "not enough free space" in one_error_line(res)
        assert whole_root(root) == whole
    finally:
        disk.destroy()


def test_disk_full_at_many_points(template, reference, tmp_path):
    """The disk fills up after the plan, at every kind of checkpoint: while the database is created, inside
    the conversion, in the switch: each time one error line, exit 1, and (hardlink) the aufs data unchanged or
    (in place) a rollback gives back the exact root; after freeing space `run` finishes."""
    outcomes = []
    for n in stop_points(reference["labels"]):
        disk = LoopFS.create(str(tmp_path), size_mb=8)
        try:
            root = os.path.join(disk.mountpoint, "docker")
            subprocess.run(["cp", "-a", template, root], check=True)
            before, whole = aufs_side(root), whole_root(root)
            res, filler = run_filled_at(root, reference["strategy"], n, functools.partial(fill, disk.mountpoint, 0))
            if res.returncode == 0:
                outcomes.append("completed")
            else:
                assert res.returncode == 1, res.stderr
                line = one_error_line(res)
                assert any(w in line for w in ("No space left", "full")), line
                outcomes.append(reference["labels"][n - 1])
                subprocess.run(["rm", "-rf", filler], check=True)  # the way forward: free space, run again
                untouched_or_undone(root, reference["strategy"], before, whole)
                cli(*run_args(root, strategy=reference["strategy"]), check=0)
            assert tree_signature(root) == reference["signature"]
        finally:
            disk.destroy()
    failures = [o for o in outcomes if o != "completed"]
    assert len(set(failures)) >= 4, outcomes  # it failed at several different points
    assert any("layer" in o for o in failures) and any("switching" in o or "staged" in o for o in failures)


def test_rollback_works_on_a_full_disk(template, tmp_path):
    disk = LoopFS.create(str(tmp_path), size_mb=8)
    try:
        root = os.path.join(disk.mountpoint, "docker")
        subprocess.run(["cp", "-a", template, root], check=True)
        before = manifest(root)
        res, _ = run_filled_at(root, "hardlink", 1, lambda: fill(disk.mountpoint, 64 * 1024))
        assert res.returncode == 1, res.stderr
        cli("rollback", "--root", root, "--engine-pidfile", "/nonexistent", check=0)
        assert manifest(root, skip={WORKDIR}) == before
    finally:
        disk.destroy()


@pytest.mark.parametrize("leave", [0, 5])
def test_out_of_inodes(template, reference, tmp_path, leave):
    """Too few inodes for the plan: refused, nothing changed.  Inodes running out during the run: one line,
    exit 1; after freeing them `run` finishes."""
    disk = LoopFS.create(str(tmp_path), size_mb=16, inodes=1024)
    try:
        root = os.path.join(disk.mountpoint, "docker")
        subprocess.run(["cp", "-a", template, root], check=True)
        before, whole = aufs_side(root), whole_root(root)
        filler = use_inodes(disk.mountpoint, leave)
        res = cli(*run_args(root, strategy=reference["strategy"]))
        assert res.returncode == 3 and "not enough free inodes" in one_error_line(res)
        assert whole_root(root) == whole
        subprocess.run(["rm", "-rf", filler], check=True)
        n = next(i for i, label in enumerate(reference["labels"], 1) if label.startswith("recorded discovery"))
        res, filler = run_filled_at(root, reference["strategy"], n, lambda: use_inodes(disk.mountpoint, leave))
        assert res.returncode == 1, res.stderr
        assert any(w in one_error_line(res) for w in ("No space left", "full", "no free inodes"))
        subprocess.run(["rm", "-rf", filler], check=True)
        untouched_or_undone(root, reference["strategy"], before, whole)
        cli(*run_args(root, strategy=reference["strategy"]), check=0)
        assert tree_signature(root) == reference["signature"]
    finally:
        disk.destroy()


def test_read_only_filesystem(template, reference, tmp_path):
    disk = LoopFS.create(str(tmp_path), size_mb=16)
    try:
        root = os.path.join(disk.mountpoint, "docker")
        subprocess.run(["cp", "-a", template, root], check=True)
        before, whole = aufs_side(root), whole_root(root)
        disk.remount("ro")
        res = cli(*run_args(root, strategy=reference["strategy"]))
        assert res.returncode == 3 and "Read-only" in one_error_line(res)  # the plan's probe finds it
        disk.remount("rw")
        # Read-only when a migration is half done (killed mid-conversion): one line, then it resumes.
        res = cli(*run_args(root, strategy=reference["strategy"]), env={"AUFS2OVERLAY_KILL_AT": "20"})
        assert res.returncode == -signal.SIGKILL
        disk.remount("ro")
        for args in (run_args(root, strategy=reference["strategy"]),
                     ["rollback", "--root", root, "--engine-pidfile", "/nonexistent"]):
            res = cli(*args)
            assert res.returncode == 1 and "read-only" in one_error_line(res).lower(), res.stderr
        disk.remount("rw")
        untouched_or_undone(root, reference["strategy"], before, whole)
        cli(*run_args(root, strategy=reference["strategy"]), check=0)
        assert tree_signature(root) == reference["signature"]
    finally:
        disk.destroy()


def test_concurrent_run_is_locked_out(template, tmp_path):
    root = str(tmp_path / "docker")
    subprocess.run(["cp", "-a", template, root], check=True)
    env = dict(os.environ, AUFS2OVERLAY_STOP_AT="10")
    proc = subprocess.Popen([sys.executable, "-m", "migrator", *run_args(root)], env=env)
    try:
        while open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "T":
            time.sleep(0.01)
        for args in (run_args(root), ["rollback", "--root", root, "--engine-pidfile", "/nonexistent"],
                     ["cleanup", "--root", root, "--engine-pidfile", "/nonexistent"]):
            res = cli(*args)
            assert res.returncode in (3, 4), res.stderr
            if args[0] != "cleanup":
                assert res.returncode == 4 and "another aufs2overlay" in one_error_line(res)
    finally:
        os.killpg(proc.pid, signal.SIGCONT)  # the migrator and its layer workers
        proc.wait()
    assert proc.returncode == 0


def kill_at_label(root, reference, prefix):
    """SIGKILL a run at the first checkpoint whose label starts with ``prefix`` in the reference run."""
    n = next(i for i, label in enumerate(reference["labels"], 1) if label.startswith(prefix))
    res = cli(*run_args(root, strategy=reference["strategy"]), env={"AUFS2OVERLAY_KILL_AT": str(n)})
    assert res.returncode == -signal.SIGKILL


@pytest.mark.parametrize("where", ["recorded layer", "recorded container", "rename overlay2.temp",
                                   "recorded phase completed"])
@pytest.mark.parametrize("damage", ["deleted", "corrupted"])
def test_state_database_lost_mid_run(template, reference, tmp_path, where, damage):
    root = str(tmp_path / "docker")
    subprocess.run(["cp", "-a", template, root], check=True)
    before = manifest(root)
    kill_at_label(root, reference, where)
    db = os.path.join(root, ".aufs2overlay", "state.db")
    if damage == "deleted":
        for suffix in ("", "-journal"):
            if os.path.exists(db + suffix):
                os.unlink(db + suffix)
    else:
        with open(db, "r+b") as f:
            f.write(b"this is not a database" * 100)
    status = cli("status", "--root", root)
    if damage == "corrupted":
        assert status.returncode == 1 and "unreadable" in one_error_line(status)
        res = cli(*run_args(root, strategy=reference["strategy"]))
        assert res.returncode == 1 and "rollback --force" in one_error_line(res)
    res = cli("rollback", "--root", root, "--engine-pidfile", "/nonexistent")
    if res.returncode == 0:
        assert "nothing to roll back" in res.stdout
    else:
        assert res.returncode == 3 and "--force" in one_error_line(res)
    # rollback --force rebuilds the aufs root from what is on disk: aufs data, image store and every config
    # exactly as before (directory times aside: they lived in the lost database).
    cli("rollback", "--root", root, "--engine-pidfile", "/nonexistent", "--force", check=0)
    after = manifest(root, skip={WORKDIR})
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    assert all(os.path.isdir(os.path.join(root.encode(), p)) for p in changed), changed
    for p in changed:
        assert before[p][:4] == after[p][:4] and before[p][5:] == after[p][5:]  # only the mtime differs
    cli(*run_args(root, strategy=reference["strategy"]), check=0)
    assert tree_signature(root) == reference["signature"]
    cli("verify", "--root", root, check=0)


def test_run_after_the_database_is_lost_mid_conversion(template, reference, tmp_path):
    """Hardlink: the aufs data is whole, so `run` starts afresh (removing the unrecorded overlay2.temp/).  In place:
    layers were moved out of aufs/diff, so `run` refuses and names `rollback --force`, which moves them back."""
    root = str(tmp_path / "docker")
    subprocess.run(["cp", "-a", template, root], check=True)
    before = whole_root(root)
    kill_at_label(root, reference, "recorded layer")
    os.unlink(os.path.join(root, ".aufs2overlay", "state.db"))
    res = cli(*run_args(root, strategy=reference["strategy"]))
    if reference["strategy"] == "inplace":
        assert res.returncode == 3 and "moved out of aufs/diff" in one_error_line(res)
        assert "rollback --force" in one_error_line(res)
        cli("rollback", "--root", root, "--engine-pidfile", "/nonexistent", "--force", "-q", check=0)
        after = whole_root(root)
        assert after[1] == before[1]  # the hardlinks among aufs whiteouts are back
        cli(*run_args(root, strategy=reference["strategy"]), check=0)
    else:
        assert res.returncode == 0, res.stderr
    assert tree_signature(root) == reference["signature"]
