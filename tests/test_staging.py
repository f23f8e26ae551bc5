"""``stage`` while the engine works, then the cutover (``run``): the result is the tree an offline ``run`` makes
of the root as it is at the cutover, whatever the engine did between (tests/support/engineops.py does it on
disk in moby's order); ``stage`` never changes what the engine uses; a kill anywhere converges; rollback is
exact.  (The real-engine half is in tests/test_engine.py.)

A copied root's directories are new inodes with a ctime of now, which ``stage`` does not trust for
``RACY_NS``: each test copies its roots first, then waits that long once (``aged``).
"""

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from migrator.scan.proof import RACY_NS
from tests.conftest import WORKDIR, cli, needs_root, run_args
from tests.support import engineops
from tests.support.manifest import diff_manifests, link_groups
from tests.support.rootstate import aufs_side, wait_stopped, whole_root
from tests.support.signature import tree_signature

pytestmark = needs_root


def aged(*roots):
    """Wait until the copies made just now are older than ``RACY_NS``."""
    time.sleep(RACY_NS / 1e9 + 0.2)
    return roots[0] if len(roots) == 1 else roots


def copy(src, dst):
    subprocess.run(["cp", "-a", src, dst], check=True)
    return dst


def stage(root, *extra, env=None, check=0):
    return cli("stage", "--root", root, "-q", *extra, env=env, check=check)


def engine_data(root):
    """What the engine uses, which ``stage`` must leave exactly as it was (its files' link counts aside)."""
    return aufs_side(root), link_groups(root, skip={WORKDIR})


def offline_reference(root, dest):
    """The tree an offline run makes of ``root`` as it is now (a copy without the work area)."""
    copy(root, dest)
    subprocess.run(["rm", "-rf", os.path.join(dest, WORKDIR.decode())], check=True)
    cli(*run_args(dest, strategy="hardlink"), check=0)
    return tree_signature(dest)


def status(root):
    return json.loads(cli("status", "--root", root, "--json").stdout)


def layer_graph(root):
    """{layer id: ancestors} from aufs/layers, and the layer store's {cache id: chain hex}."""
    graph = {}
    for name in os.listdir(os.path.join(root, "aufs", "layers")):
        with open(os.path.join(root, "aufs", "layers", name)) as f:
            graph[name] = [x for x in f.read().split("\n") if x]
    chains = {}
    sha = os.path.join(root, "image", "aufs", "layerdb", "sha256")
    for chain in os.listdir(sha):
        with open(os.path.join(sha, chain, "cache-id")) as f:
            chains[f.read().strip()] = chain
    return graph, chains


def image_leaf(root):
    """An image layer no other layer is built on (what an rmi removes), and its chain."""
    graph, chains = layer_graph(root)
    parents = {a[0] for a in graph.values() if a}
    leaf = sorted(i for i in chains if i not in parents)[0]
    return leaf, chains[leaf]


def pull_new_layer(root, parent):
    """A new image layer on ``parent``, pulled as moby does (engineops.pull)."""
    graph, chains = layer_graph(root)
    cache_id, chain = os.urandom(32).hex(), os.urandom(32).hex()
    where = os.path.join(os.path.dirname(root), f"pull-{cache_id[:8]}")
    os.makedirs(os.path.join(where, f"diff-{cache_id}", "etc"))
    with open(os.path.join(where, f"diff-{cache_id}", "etc", "pulled"), "w") as f:
        f.write("pulled during the staging\n")
    with open(os.path.join(where, f"diff-{cache_id}", ".wh.bin"), "w"):
        pass
    os.makedirs(os.path.join(where, f"layerdb-{chain}"))
    for name, value in (("cache-id", cache_id), ("diff", "sha256:" + os.urandom(32).hex()), ("size", "26"),
                        ("parent", "sha256:" + chains[parent])):
        with open(os.path.join(where, f"layerdb-{chain}", name), "w") as f:
            f.write(value)
    stash = engineops.StashedImage("a2o/pulled", {}, "", where, [(cache_id, chain, [parent] + graph[parent])])
    engineops.pull(root, stash)
    return cache_id


def container_layer(root):
    mounts = os.path.join(root, "image", "aufs", "layerdb", "mounts")
    cid = sorted(os.listdir(mounts))[0]
    with open(os.path.join(mounts, cid, "mount-id")) as f:
        return f.read().strip()


def test_stage_then_cutover_makes_the_offline_tree(template, tmp_path):
    root, ref = aged(copy(template, str(tmp_path / "docker")), copy(template, str(tmp_path / "ref")))
    before = engine_data(root)
    res = stage(root)
    assert "staged: 4 of 6 layers" in res.stdout
    assert engine_data(root) == before, "stage changed what the engine uses"
    assert sorted(os.listdir(root)) == sorted(os.listdir(ref) + [WORKDIR.decode()])
    doc = status(root)
    assert doc["phase"] == "staging" and doc["staged"] == {"staged": 4, "staging": 4, "root_layers": 6}
    assert "staged:     4 of 6 layers" in cli("status", "--root", root).stdout
    assert "staged:         4 of 6 layers" in cli("plan", "--root", root, "--engine-pidfile", "/nonexistent").stdout
    stage(root)  # again: nothing changed, nothing to do
    assert engine_data(root) == before
    trace = str(tmp_path / "cutover-trace")
    res = cli(*run_args(root)[:-1], env={"AUFS2OVERLAY_CHECKPOINT_TRACE": trace}, check=0)
    assert "cutover: 4 staged layers kept, 0 dropped, 2 to convert now" in res.stderr
    assert "cutover:" in res.stdout
    with open(trace) as f:
        recorded = [line.split(None, 1)[1].strip() for line in f if " recorded layers " in line]
    assert recorded == ["recorded layers committed"], recorded  # the two layers left in one batch
    cli(*run_args(ref), check=0)
    assert tree_signature(root) == tree_signature(ref)
    cli("verify", "--root", root, check=0)
    doc = status(root)
    assert doc["phase"] == "completed" and 0 < doc["cutover_seconds"] < 60
    assert not os.path.exists(os.path.join(root, WORKDIR.decode(), "staging"))
    assert not os.path.exists(os.path.join(root, WORKDIR.decode(), "staged-image"))


def test_the_cutover_keeps_only_what_is_unchanged(template, tmp_path):
    """After the staging, the engine pulls a layer, removes an image, a container writes; and a staged layer's
    directory changes (no engine does that; the proof must catch it): the cutover drops the removed and the
    changed layers (the changed one's children too), converts the new ones, and makes the offline tree."""
    root = aged(copy(template, str(tmp_path / "docker")))
    stage(root)
    staged = {layer["id"] for layer in status(root)["layers"]}
    graph, _chains = layer_graph(root)
    leaf, chain = image_leaf(root)
    engineops.set_tags(root, "other", {})
    engineops.remove_layer(root, leaf, chain)
    base = next(i for i, a in graph.items() if not a)
    pulled = pull_new_layer(root, base)
    engineops.write_in_container(root, container_layer(root), "data/written-while-staged", b"rw\n")
    middle = next(i for i, a in graph.items() if len(a) == 1 and any(len(b) > 1 and b[0] == i for b in graph.values()))
    os.mkdir(os.path.join(root, "aufs", "diff", middle, "new-dir"))
    reference = offline_reference(root, str(tmp_path / "ref"))
    res = cli(*run_args(root), check=0)
    assert res.returncode == 0
    assert tree_signature(root) == reference
    dropped = {f["detail"].split(":")[0]: f["detail"] for f in status(root)["findings"]
               if f["kind"] == "staged-layer-dropped"}
    assert set(dropped) == {leaf, middle} | {i for i in staged if middle in graph[i]}, dropped
    assert "removed" in dropped[leaf] and "changed since it was staged" in dropped[middle]
    assert pulled in os.listdir(os.path.join(root, "overlay2"))
    cli("verify", "--root", root, check=0)


def _linked_store_files(top):
    """{path below the image store ``top``: inode} of the files its copy hardlinks (``LINKED_PARTS``)."""
    found = {}
    for part in ("imagedb", os.path.join("layerdb", "sha256")):
        for dirpath, _dirs, files in os.walk(os.path.join(top, part)):
            for name in files:
                path = os.path.join(dirpath, name)
                found[os.path.relpath(path, top)] = os.lstat(path).st_ino
    return found


def test_the_image_store_staged_is_brought_up_to_date_at_the_cutover(template, tmp_path):
    """``stage`` copies the image store too (its files hardlinked, nothing in ``image/aufs`` changed); the engine
    then replaces ``repositories.json``, removes an image's layer and pulls one: the cutover brings the copy up
    to date (only what changed), and the result is the offline tree, every linked file the engine's own inode."""
    root = aged(copy(template, str(tmp_path / "docker")))
    before = engine_data(root)
    res = cli("stage", "--root", root, check=0)
    assert "image store staged" in res.stderr
    assert engine_data(root) == before
    staged = os.path.join(root, WORKDIR.decode(), "staged-image")
    assert _linked_store_files(os.path.join(root, "image", "aufs")) == _linked_store_files(staged)
    graph, _chains = layer_graph(root)
    leaf, chain = image_leaf(root)
    engineops.set_tags(root, "other", {})
    engineops.remove_layer(root, leaf, chain)
    pull_new_layer(root, next(i for i, a in graph.items() if not a))
    reference = offline_reference(root, str(tmp_path / "ref"))
    res = cli(*run_args(root)[:-1], check=0)
    assert "image store brought up to date" in res.stderr, res.stderr
    assert tree_signature(root) == reference
    assert _linked_store_files(os.path.join(root, "image", "overlay2")) == \
        _linked_store_files(os.path.join(root, "image", "aufs"))
    assert not os.path.lexists(staged)


def test_cut_anywhere_in_the_cutovers_image_store_update(template, tmp_path):
    """The cutover killed as it moves the staged image store into place, and at the first, a middle and the last
    directory of its update: ``rollback`` and ``rollback --force`` give back the exact root, ``run`` resumes to
    the offline tree."""
    trace = str(tmp_path / "trace")
    probe = aged(copy(template, str(tmp_path / "probe")))
    stage(probe)
    cli(*run_args(probe), env={"AUFS2OVERLAY_CHECKPOINT_TRACE": trace}, check=0)
    with open(trace) as f:
        labels = [" ".join(line.split()[1:]) for line in f]
    updated = [n for n, label in enumerate(labels, 1) if label == "walked image update"]
    moved = [n for n, label in enumerate(labels, 1) if label == "staged image store moved into place"]
    assert len(updated) >= 8 and len(moved) == 1, labels
    points = sorted({moved[0], updated[0], updated[len(updated) // 2], updated[-1]})
    reference = offline_reference(template, str(tmp_path / "ref"))
    original = whole_root(template)
    cases = [(n, undo) for n in points for undo in (["rollback"], ["rollback", "--force"], None)]
    roots = [copy(template, str(tmp_path / f"r{i}")) for i in range(len(cases))]
    aged(*roots)
    for (n, undo), root in zip(cases, roots):
        stage(root)
        res = cli(*run_args(root), env={"AUFS2OVERLAY_KILL_AT": str(n)})
        assert res.returncode == -signal.SIGKILL, (n, res.stderr)
        if undo is None:
            cli(*run_args(root), check=0)
            assert tree_signature(root) == reference, n
        else:
            cli(*undo, "--root", root, "--engine-pidfile", "/nonexistent", "-q", check=0)
            after = whole_root(root)
            assert after == original, (n, undo, diff_manifests(original[0], after[0]))
            assert not os.path.lexists(os.path.join(root, WORKDIR.decode(), "staged-image")), (n, undo)
        subprocess.run(["rm", "-rf", root], check=True)


def test_stage_again_follows_the_engine(template, tmp_path):
    """A second stage drops what the engine removed (its staged copy freed at once) and stages what it pulled."""
    root = aged(copy(template, str(tmp_path / "docker")))
    stage(root)
    leaf, chain = image_leaf(root)
    graph, _chains = layer_graph(root)
    pulled = pull_new_layer(root, next(i for i, a in graph.items() if not a))
    engineops.remove_layer(root, leaf, chain)
    aged(root)
    stage(root)
    staging = os.listdir(os.path.join(root, WORKDIR.decode(), "staging"))
    assert pulled in staging and leaf not in staging
    assert status(root)["staged"] == {"staged": 4, "staging": 4, "root_layers": 6}
    reference = offline_reference(root, str(tmp_path / "ref"))
    res = cli(*run_args(root)[:-1], check=0)  # not quiet
    assert "cutover: 4 staged layers kept, 0 dropped" in res.stderr
    assert tree_signature(root) == reference


def test_a_layer_removed_while_it_is_staged_is_dropped(template, tmp_path):
    """Stopped in the middle of a layer's walk, the engine removes that layer: stage drops it and finishes."""
    root = aged(copy(template, str(tmp_path / "docker")))
    leaf, chain = image_leaf(root)
    trace = str(tmp_path / "trace")
    probe = aged(copy(root, str(tmp_path / "probe")))
    stage(probe, env={"AUFS2OVERLAY_CHECKPOINT_TRACE": trace})
    with open(trace) as f:
        walked = [int(line.split()[0]) for line in f if line.split()[1:3] == ["walked", "link"] and leaf in line]
    proc = subprocess.Popen([sys.executable, "-m", "migrator", "stage", "--root", root, "--no-nice", "-j", "1"],
                            env=dict(os.environ, AUFS2OVERLAY_STOP_AT=str(walked[0])), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_stopped(proc)
    engineops.remove_layer(root, leaf, chain)
    os.killpg(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "removed by the engine while it was being staged" in err
    assert leaf not in os.listdir(os.path.join(root, WORKDIR.decode(), "staging"))
    reference = offline_reference(root, str(tmp_path / "ref"))
    cli(*run_args(root), check=0)
    assert tree_signature(root) == reference


def test_kill_stage_at_every_checkpoint(template, tmp_path):
    """SIGKILL at each checkpoint of a stage: the engine's data is untouched; then either the next stage and the
    cutover make the offline tree, or ``rollback --force`` gives the root back exactly (every other one)."""
    trace = str(tmp_path / "trace")
    probe = aged(copy(template, str(tmp_path / "probe")))
    stage(probe, env={"AUFS2OVERLAY_CHECKPOINT_TRACE": trace})
    with open(trace) as f:
        count = sum(1 for _ in f)
    assert count > 40
    reference = offline_reference(template, str(tmp_path / "ref"))
    original = whole_root(template)
    engine = engine_data(template)
    roots = [copy(template, str(tmp_path / f"r{n}")) for n in range(1, count + 1)]
    aged(*roots)
    for n, root in enumerate(roots, start=1):
        res = stage(root, env={"AUFS2OVERLAY_KILL_AT": str(n)}, check=None)
        assert res.returncode == -signal.SIGKILL, (n, res.stderr)
        assert engine_data(root) == engine, n
        if n % 2:
            cli("rollback", "--root", root, "--engine-pidfile", "/nonexistent", "--force", "-q", check=0)
            after = whole_root(root)
            assert after == original, (n, diff_manifests(original[0], after[0]))
            subprocess.run(["rm", "-rf", root], check=True)
            continue
        stage(root)
        cli(*run_args(root), check=0)
        assert tree_signature(root) == reference, n
        subprocess.run(["rm", "-rf", root], check=True)


def test_kill_stage_at_random_instants(template, tmp_path):
    """SIGKILL after a random delay (seeded), with a cutover killed once too: it converges all the same."""
    rng = random.Random(20261205)
    reference = offline_reference(template, str(tmp_path / "ref"))
    engine = engine_data(template)
    roots = [copy(template, str(tmp_path / f"r{n}")) for n in range(8)]
    aged(*roots)
    for n, root in enumerate(roots):
        proc = subprocess.Popen([sys.executable, "-m", "migrator", "stage", "--root", root, "-q"],
                                start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.05, 0.6))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert engine_data(root) == engine, n
        stage(root)
        if n % 2:
            proc = subprocess.Popen([sys.executable, "-m", "migrator", *run_args(root)], start_new_session=True,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0.05, 0.5))
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        cli(*run_args(root), check=0)
        assert tree_signature(root) == reference, n


def test_what_stage_refuses_and_what_it_leaves_alone(template, tmp_path):
    root = aged(copy(template, str(tmp_path / "docker")))
    stage(root)
    res = cli(*run_args(root, strategy="inplace"), check=3)
    assert "staged for the hardlink strategy" in res.stderr
    cli(*run_args(root), check=0)
    res = stage(root, check=3)
    assert "is already completed: stage only comes before it" in res.stderr
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    assert "nothing to stage" in stage(empty).stdout
    assert not os.path.exists(os.path.join(empty, WORKDIR.decode()))


def test_rollback_of_a_staged_root_is_exact_and_a_new_run_starts_over(template, tmp_path):
    root = aged(copy(template, str(tmp_path / "docker")))
    original = whole_root(root)
    stage(root)
    cli("rollback", "--root", root, "--engine-pidfile", "/nonexistent", "-q", check=0)
    assert whole_root(root) == original
    assert sorted(os.listdir(os.path.join(root, WORKDIR.decode()))) == ["lock", "state.db"]
    stage(root)  # a rolled-back root stages afresh
    os.unlink(os.path.join(root, WORKDIR.decode(), "state.db"))  # the state lost: a fresh run starts over
    assert status(root)["phase"] == "state-lost"
    res = cli(*run_args(root)[:-1], check=0)
    assert "removing leftover" in res.stderr and "staging" in res.stderr
    reference = offline_reference(template, str(tmp_path / "ref"))
    assert tree_signature(root) == reference


def test_stage_runs_at_the_lowest_priority(template, tmp_path):
    from migrator import procs

    roots = aged(copy(template, str(tmp_path / "a")), copy(template, str(tmp_path / "b")))
    for root, extra, nice, io_class in ((roots[0], (), 19, procs.IOPRIO_CLASS_IDLE),
                                        (roots[1], ("--no-nice",), 0, None)):
        proc = subprocess.Popen([sys.executable, "-m", "migrator", "stage", "--root", root, "-q", *extra],
                                env=dict(os.environ, AUFS2OVERLAY_STOP_AT="1"), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        wait_stopped(proc)
        with open(f"/proc/{proc.pid}/stat") as f:
            assert int(f.read().rsplit(")", 1)[1].split()[16]) == nice
        if io_class is not None:
            assert procs.io_priority_class(proc.pid) == io_class
        os.killpg(proc.pid, signal.SIGCONT)
        assert proc.wait(timeout=120) == 0


def test_a_schema_2_database_is_upgraded(template, tmp_path):
    """A migration begun by the previous release (schema 2) resumes with this one."""
    root = copy(template, str(tmp_path / "docker"))
    cli(*run_args(root), env={"AUFS2OVERLAY_KILL_AT": "8"}, check=-signal.SIGKILL)
    db = os.path.join(root, WORKDIR.decode(), "state.db")
    conn = sqlite3.connect(db)
    for table, column in (("run", "cutover_seconds"), ("layer", "proof_dirs"), ("layer", "proof")):
        conn.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    conn.execute("UPDATE run SET schema_version = 2")
    conn.commit()
    conn.close()
    assert status(root)["cutover_seconds"] is None
    cli(*run_args(root), check=0)
    assert status(root)["cutover_seconds"] > 0
    assert tree_signature(root) == offline_reference(template, str(tmp_path / "ref"))


def test_stage_and_its_rollback_work_beside_a_running_engine(template, tmp_path):
    """A mount under the root (a running container's) is an engine at work: ``stage`` and the rollback of a
    staging go on beside it, the cutover waits for it to stop."""
    root = aged(copy(template, str(tmp_path / "docker")))
    mnt = os.path.join(root, "aufs", "mnt", container_layer(root))
    os.makedirs(mnt, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "a2o-test", mnt], check=True)
    try:
        original = whole_root(root)
        stage(root)
        res = cli("run", "--root", root, "-q", check=3)
        assert "an engine is using" in res.stderr
        cli("rollback", "--root", root, "-q", check=0)
        assert whole_root(root) == original
    finally:
        subprocess.run(["umount", mnt], check=True)


def test_stage_refuses_to_crowd_the_engine_off_its_disk(template, tmp_path):
    """On a filesystem nearly full, ``stage`` refuses (exit 3) before it stages anything: the running engine
    needs the space; the root is as it was."""
    from tests.support.loopfs import LoopFS, can_loop

    if can_loop() is not None:
        pytest.skip(str(can_loop()))
    fs = LoopFS.create(str(tmp_path), size_mb=64)
    try:
        root = aged(copy(template, os.path.join(fs.mountpoint, "docker")))
        original = whole_root(root)
        filler = os.path.join(fs.mountpoint, "filler")
        with open(filler, "wb") as f:
            vfs = os.statvfs(fs.mountpoint)
            os.posix_fallocate(f.fileno(), 0, vfs.f_bavail * vfs.f_frsize - int(vfs.f_blocks * vfs.f_frsize * 0.05))
        res = stage(root, check=3)
        assert "stage leaves 5% of it to the running engine" in res.stderr, res.stderr
        assert whole_root(root) == original
        assert not os.path.exists(os.path.join(root, WORKDIR.decode(), "staging"))
        os.unlink(filler)
        stage(root)
    finally:
        fs.destroy()


def test_the_two_step_procedure_runs_as_written(template, tmp_path):
    """The operator guide's two-step block, verbatim, on a fresh root (``systemctl`` a stub that logs): it
    stages, shows the count, stages again, and the cutover completes."""
    import re

    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "operator-guide.md")) as f:
        section = f.read().split("## Two steps", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    root = aged(copy(template, str(tmp_path / "docker")))
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "systemctl").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/systemctl.log\n")
    os.chmod(stubs / "systemctl", 0o755)
    path = os.pathsep.join([str(stubs), os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = dict(os.environ, ROOT=root, LOG=str(tmp_path / "guide.log"), PATH=path)
    res = subprocess.run(["bash", "-e", "-c", block], env=env, capture_output=True, text=True)
    assert res.returncode == 0, f"{block}\n{res.stdout}\n{res.stderr}"
    assert "staged:     4 of 6 layers" in res.stdout and "(cutover: " in res.stdout
    assert (tmp_path / "systemctl.log").read_text().split("\n")[:2] == ["stop docker.service docker.socket",
                                                                        "start docker.service"]
    assert status(root)["phase"] == "completed"
