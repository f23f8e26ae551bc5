"""Real power cuts: the migrator frozen at a checkpoint, the disk copied as it stands (nothing synced for it),
the copy mounted (ext4 replays its journal), then resumed and verified, and in a second copy rolled back.

The harness is shown to catch a known-bad write pattern: config.v2.json rewritten in place (truncate, write,
no fsync), as the original Go migrator does.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from migrator.scan.proof import RACY_NS
from tests.conftest import WORKDIR, needs_root, run_args
from tests.support.loopfs import LoopFS, can_loop
from tests.support.manifest import diff_manifests, link_groups, manifest
from tests.support.rootstate import wait_stopped
from tests.support.signature import tree_signature

pytestmark = [needs_root, pytest.mark.skipif(can_loop() is not None, reason=str(can_loop())), pytest.mark.slow]

BAD_CONFIG_WRITER = r"""
import os, sys
from migrator.fs import fsio

real = fsio.atomic_write

def in_place(dir_fd, name, data, mode, owner=None, times_ns=None, sync=True):
    if name != "config.v2.json":
        return real(dir_fd, name, data, mode, owner, times_ns, sync)
    fd = os.open(name, os.O_WRONLY | os.O_TRUNC, dir_fd=dir_fd)  # the original's pattern: truncate, write
    os.write(fd, data)
    os.close(fd)

fsio.atomic_write = in_place
from migrator.cli import main
sys.exit(main(sys.argv[1:]))
"""


def migrator_cmd(bad_writer=False):
    return [sys.executable, "-c", BAD_CONFIG_WRITER] if bad_writer else [sys.executable, "-m", "migrator"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "migrator", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    fs = LoopFS.create(str(tmp_path_factory.mktemp("pc-disk")), size_mb=48)
    yield fs
    fs.destroy()


INSIDE = ("walked", "changed in place")


def cut_points(labels):
    """Every phase boundary (every checkpoint that is not inside a layer step) and 60 points inside them."""
    boundaries = [n for n, label in enumerate(labels, 1) if not label.startswith(INSIDE)]
    inside = [n for n, label in enumerate(labels, 1) if label.startswith(INSIDE)]
    step = max(1, len(inside) // 60)
    return sorted(set(boundaries) | set(inside[::step][:60]))


def power_cut_at(disk, template, n, scratch, bad_writer=False, strategy=None):
    """Freeze a migration at checkpoint n on ``disk``, and return two power-cut copies of the disk and the
    state of the root before the migration began."""
    root = os.path.join(disk.mountpoint, "docker")
    subprocess.run(["rm", "-rf", root], check=True)
    subprocess.run(["cp", "-a", template, root], check=True)
    subprocess.run(["sync", "-f", root], check=True)  # the starting root is on disk before the cut
    before = manifest(root, skip={WORKDIR}), link_groups(root, skip={WORKDIR})
    env = dict(os.environ, AUFS2OVERLAY_STOP_AT=str(n))
    proc = subprocess.Popen([*migrator_cmd(bad_writer), *run_args(root, strategy=strategy)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_stopped(proc)
        first = disk.power_cut_copy(os.path.join(scratch, "cut-1.img"))
        second = disk.power_cut_copy(os.path.join(scratch, "cut-2.img"))
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the migrator and its layer workers, frozen together
        except ProcessLookupError:
            pass
        proc.wait()
    return first, second, before


def resume_problem(copy, expected_signature, strategy=None):
    """Mount the cut copy, resume, and say what is wrong (None when the result is the reference tree)."""
    copy.mount()
    try:
        root = os.path.join(copy.mountpoint, "docker")
        res = run_cli(*run_args(root, strategy=strategy))
        if res.returncode != 0:
            return f"resume failed: {res.stderr.strip()}"
        if tree_signature(root) != expected_signature:
            return "resumed tree differs from an uninterrupted run"
        return None
    finally:
        copy.destroy()


def rollback_problem(copy, before):
    copy.mount()
    try:
        root = os.path.join(copy.mountpoint, "docker")
        res = run_cli("rollback", "--root", root, "--engine-pidfile", "/nonexistent", "--force", "-q")
        if res.returncode != 0:
            return f"rollback failed: {res.stderr.strip()}"
        after = manifest(root, skip={WORKDIR}), link_groups(root, skip={WORKDIR})
        if after[0] != before[0]:
            return f"rolled-back root differs: {diff_manifests(before[0], after[0], 5)}"
        if after[1] != before[1]:
            return "rolled-back root has other hardlink groups"
        return None
    finally:
        copy.destroy()


def test_power_cut_at_every_boundary_and_inside_layer_steps(template, reference, disk, tmp_path):
    points = cut_points(reference["labels"])
    inside = [n for n in points if reference["labels"][n - 1].startswith(INSIDE)]
    # hardlink: a checkpoint per directory linked; inplace: one per change made to the aufs data.
    assert len(inside) >= (50 if reference["strategy"] == "hardlink" else 12) and len(points) - len(inside) >= 30
    failures = []
    for n in points:
        first, second, before = power_cut_at(disk, template, n, str(tmp_path), strategy=reference["strategy"])
        problem = resume_problem(first, reference["signature"], reference["strategy"])
        if problem:
            failures.append((n, reference["labels"][n - 1], "resume", problem))
        problem = rollback_problem(second, before)
        if problem:
            failures.append((n, reference["labels"][n - 1], "rollback", problem))
    assert not failures, failures[:5]


def test_harness_catches_truncate_and_write(template, reference, disk, tmp_path):
    """The original's in-place rewrite of config.v2.json, cut right after the migration recorded the
    container as switched: the copy holds an empty config, and the harness reports it."""
    n = next(i for i, label in enumerate(reference["labels"], 1) if label.startswith("recorded container"))
    strategy = reference["strategy"]
    first, second, _before = power_cut_at(disk, template, n, str(tmp_path), bad_writer=True, strategy=strategy)
    second.destroy()
    first.mount()
    try:
        root = os.path.join(first.mountpoint, "docker")
        configs = [os.path.join(root, "containers", c, "config.v2.json")
                   for c in os.listdir(os.path.join(root, "containers"))]
        sizes = [os.path.getsize(c) for c in configs if os.path.exists(c)]
        assert 0 in sizes, f"the bad pattern left no empty config here: {sizes}"
    finally:
        first.unmount()
    assert resume_problem(first, reference["signature"], strategy) is not None
    # The real migrator at the same point passes the same harness.
    first, second, _before = power_cut_at(disk, template, n, str(tmp_path), strategy=strategy)
    second.destroy()
    assert resume_problem(first, reference["signature"], strategy) is None


def test_power_cut_during_stage(template, disk, tmp_path):
    """``stage`` frozen at each checkpoint outside a layer's walk and at 12 inside, the disk copied as it stands:
    on one copy ``stage`` resumes and the cutover gives the offline run's tree; on the other ``rollback --force``
    gives back the exact root.  The copies are block copies, so the aufs directories keep their inodes and
    ctimes: the staged layers' proofs must still hold where their states were recorded."""
    reference = str(tmp_path / "offline")
    subprocess.run(["cp", "-a", template, reference], check=True)
    subprocess.run([sys.executable, "-m", "migrator", *run_args(reference)], check=True, capture_output=True)
    expected = tree_signature(reference)
    root = os.path.join(disk.mountpoint, "docker")
    subprocess.run(["rm", "-rf", root], check=True)
    subprocess.run(["cp", "-a", template, root], check=True)
    time.sleep(RACY_NS / 1e9 + 0.2)  # the copy's directories are new: stage trusts them after this
    subprocess.run(["sync", "-f", root], check=True)
    trace = str(tmp_path / "trace")
    subprocess.run([sys.executable, "-m", "migrator", "stage", "--root", root, "-q"], check=True,
                   env=dict(os.environ, AUFS2OVERLAY_CHECKPOINT_TRACE=trace), capture_output=True)
    with open(trace) as f:
        labels = [line.rstrip("\n").split(" ", 1)[1] for line in f]
    boundaries = [n for n, label in enumerate(labels, 1) if not label.startswith(INSIDE)]
    inside = [n for n, label in enumerate(labels, 1) if label.startswith(INSIDE)]
    points = sorted(set(boundaries) | set(inside[::max(1, len(inside) // 12)][:12]))
    assert len(points) >= 20
    failures = []
    for n in points:
        run_cli("rollback", "--root", root, "--engine-pidfile", "/nonexistent", "--force", "-q")
        subprocess.run(["rm", "-rf", os.path.join(root, WORKDIR.decode())], check=True)  # a root never staged
        subprocess.run(["sync", "-f", root], check=True)
        before = manifest(root, skip={WORKDIR}), link_groups(root, skip={WORKDIR})
        proc = subprocess.Popen([sys.executable, "-m", "migrator", "stage", "--root", root, "-q"],
                                env=dict(os.environ, AUFS2OVERLAY_STOP_AT=str(n)), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        try:
            wait_stopped(proc)
            first = disk.power_cut_copy(os.path.join(str(tmp_path), "cut-1.img"))
            second = disk.power_cut_copy(os.path.join(str(tmp_path), "cut-2.img"))
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        first.mount()
        try:
            copy = os.path.join(first.mountpoint, "docker")
            for args in (("stage", "--root", copy, "-q"), run_args(copy)):
                res = run_cli(*args)
                if res.returncode != 0:
                    failures.append((n, labels[n - 1], args[0], res.stderr.strip()))
                    break
            else:
                if tree_signature(copy) != expected:
                    failures.append((n, labels[n - 1], "cutover", "tree differs from the offline run's"))
        finally:
            first.destroy()
        problem = rollback_problem(second, before)
        if problem:
            failures.append((n, labels[n - 1], "rollback", problem))
    assert not failures, failures[:5]
