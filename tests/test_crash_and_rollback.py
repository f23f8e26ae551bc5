"""A migration killed at any instant resumes to the same tree, or rolls back to the exact starting root."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import cli, needs_root, run_args
from tests.support.manifest import diff_manifests
from tests.support.rootstate import whole_root
from tests.support.signature import tree_signature

pytestmark = needs_root



def fresh(template, tmp_path, name="docker"):
    root = str(tmp_path / name)
    subprocess.run(["rm", "-rf", root], check=True)
    subprocess.run(["cp", "-a", template, root], check=True)
    return root


def kill_at(root, n, strategy=None):
    res = cli(*run_args(root, strategy=strategy), env={"AUFS2OVERLAY_KILL_AT": str(n)})
    assert res.returncode == -signal.SIGKILL, f"checkpoint {n} not reached: {res.stderr}"


def phase_boundaries(labels):
    """The first checkpoint of each kind: discovery, each layer state, each phase, the switch steps."""
    seen, picks = set(), []
    for n, label in enumerate(labels, 1):
        kind = " ".join(w for w in label.split() if len(w) < 40 and not w.isupper())
        if kind not in seen:
            seen.add(kind)
            picks.append(n)
    return picks


def test_checkpoints_cover_every_phase(reference):
    labels = reference["labels"]
    for needed in ("recorded discovery", "recorded phase switching", "recorded image_copied=True",
                   "rename overlay2.temp -> overlay2", "recorded phase completed"):
        assert needed in labels
    # A batch of layers is recorded once, at its last state, after all of its waves and one syncfs
    # (docs/design.md, "Waves"): the batches of the sample root, 1, 2 and 3 layers, are three records.
    recorded = [label for label in labels if label.startswith("recorded layer")]
    assert recorded == ["recorded layers committed"] * 3, recorded


def test_rollback_at_every_phase_restores_the_exact_root(template, reference, tmp_path):
    picks = phase_boundaries(reference["labels"])
    assert len(picks) >= 12
    for n in picks:
        root = fresh(template, tmp_path)
        before = whole_root(root)
        kill_at(root, n, reference["strategy"])
        res = cli("rollback", "--root", root, "--engine-pidfile", "/nonexistent", "-q")
        if n >= reference["labels"].index("recorded phase completed") + 1:  # completed (its cutover time after)
            assert res.returncode == 3 and "--force" in res.stderr
            cli("rollback", "--root", root, "--engine-pidfile", "/nonexistent", "--force", "-q", check=0)
        else:
            assert res.returncode == 0, res.stderr
        after = whole_root(root)
        assert after == before, f"checkpoint {n} ({reference['labels'][n - 1]}): {diff_manifests(before[0], after[0])}"
        recorded = n >= reference["labels"].index("recorded discovery") + 1
        assert cli("status", "--root", root).returncode == (6 if recorded else 0)


def test_rollback_after_completion_needs_force(template, strategy, tmp_path):
    root = fresh(template, tmp_path)
    before = whole_root(root)
    cli(*run_args(root, strategy=strategy), check=0)
    res = cli("rollback", "--root", root, "--engine-pidfile", "/nonexistent")
    assert res.returncode == 3 and "--force" in res.stderr
    assert os.path.isdir(os.path.join(root, "overlay2"))
    cli("rollback", "--root", root, "--engine-pidfile", "/nonexistent", "--force", check=0)
    assert whole_root(root) == before
    # After a rollback, run starts over and completes.
    cli(*run_args(root, strategy=strategy), check=0)
    cli("verify", "--root", root, check=0)


def test_cleanup_leaves_only_overlay2_data(template, reference, tmp_path):
    root = fresh(template, tmp_path)
    res = cli("cleanup", "--root", root, "--engine-pidfile", "/nonexistent")
    assert res.returncode == 3  # nothing completed yet: refused
    cli(*run_args(root, strategy=reference["strategy"]), check=0)
    expected = reference["signature"]
    cli("cleanup", "--root", root, "--engine-pidfile", "/nonexistent", check=0)
    assert sorted(os.listdir(root)) == [".aufs2overlay", "containers", "image", "overlay2"]
    assert sorted(os.listdir(os.path.join(root, ".aufs2overlay"))) == ["lock", "state.db"]  # the record
    assert os.listdir(os.path.join(root, "image")) == ["overlay2"]
    assert tree_signature(root) == expected
    res = cli("status", "--root", root, "--json")
    doc = json.loads(res.stdout)
    assert res.returncode == 0 and doc["phase"] == "cleaned" and doc["strategy"] == reference["strategy"]
    assert doc["created_at"] <= doc["updated_at"] and len(doc["layers"]) == 6 and doc["findings"]
    assert {layer["state"] for layer in doc["layers"]} == {"committed"}
    cli("verify", "--root", root, check=0)
    assert cli(*run_args(root, strategy=reference["strategy"]), check=0).stdout.startswith("migration of")
    assert "already cleaned" in cli("plan", "--root", root, check=0).stdout


def test_random_checkpoint_kills_then_finish(template, reference, tmp_path):
    """Kill at a random checkpoint, again and again, until a run gets through."""
    rng = random.Random(1234)
    total = len(reference["labels"])
    root = fresh(template, tmp_path)
    kills = 0
    while True:
        res = cli(*run_args(root, strategy=reference["strategy"]),
                  env={"AUFS2OVERLAY_KILL_AT": str(rng.randint(1, total // 3))})
        if res.returncode == 0:
            break
        assert res.returncode == -signal.SIGKILL, res.stderr
        kills += 1
        assert kills < 200
    assert kills >= 3
    assert tree_signature(root) == reference["signature"]
    cli("verify", "--root", root, check=0)


def test_random_time_kills_then_finish(template, reference, tmp_path):
    """SIGKILL after a random delay, again and again (not at a checkpoint: anywhere)."""
    rng = random.Random(99)
    root = fresh(template, tmp_path)
    kills = 0
    for _ in range(60):
        proc = subprocess.Popen([sys.executable, "-m", "migrator", *run_args(root, strategy=reference["strategy"])],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.0, reference["duration"]))
        if proc.poll() is None:
            proc.kill()
            kills += 1
        if proc.wait() == 0:
            break
    cli(*run_args(root, strategy=reference["strategy"]), check=0)
    assert kills >= 3
    assert tree_signature(root) == reference["signature"]


@pytest.mark.slow
def test_every_checkpoint_resume_and_rollback(template, reference, tmp_path):
    """For every checkpoint N of a full run: killed at N then resumed gives the reference tree; killed at N
    then rolled back gives the exact starting root."""
    labels = reference["labels"]
    for n in range(1, len(labels) + 1):
        root = fresh(template, tmp_path, "resume")
        kill_at(root, n, reference["strategy"])
        cli(*run_args(root, strategy=reference["strategy"]), check=0)
        assert tree_signature(root) == reference["signature"], f"resume after checkpoint {n} {labels[n - 1]}"

        root = fresh(template, tmp_path, "rollback")
        before = whole_root(root)
        kill_at(root, n, reference["strategy"])
        cli("rollback", "--root", root, "--engine-pidfile", "/nonexistent", "--force", "-q", check=0)
        after = whole_root(root)
        assert after == before, f"rollback after checkpoint {n} {labels[n - 1]}: {diff_manifests(before[0], after[0])}"


def test_cut_anywhere_in_the_image_store_staging(template, reference, tmp_path):
    """A cut at the first, a middle and the last directory of the image store's staging (files hardlinked
    or copied, nothing synced until the end): `rollback` gives back the exact root, `rollback --force` too,
    and `run` resumes to the reference tree."""
    staging = [n for n, label in enumerate(reference["labels"], 1) if label == "walked image copy"]
    assert len(staging) >= 8, staging
    for n in sorted({staging[0], staging[len(staging) // 2], staging[-1]}):
        for undo in (["rollback"], ["rollback", "--force"], None):
            root = fresh(template, tmp_path)
            before = whole_root(root)
            kill_at(root, n, reference["strategy"])
            assert os.path.isdir(os.path.join(root, "image", "overlay2.temp"))
            if undo is None:
                cli(*run_args(root, strategy=reference["strategy"]), check=0)
                assert tree_signature(root) == reference["signature"], f"checkpoint {n}"
                continue
            cli(*undo, "--root", root, "--engine-pidfile", "/nonexistent", "-q", check=0)
            after = whole_root(root)
            assert after == before, f"checkpoint {n} {undo}: {diff_manifests(before[0], after[0])}"


def test_a_lost_state_database_is_not_read_as_not_started(template, reference, tmp_path):
    """After a completed run whose state database is then lost: `status` says the state is lost (exit 7) and
    names the trees; following its advice (`rollback --force`, then `run`) gives the migrated root again."""
    root = fresh(template, tmp_path)
    cli(*run_args(root, strategy=reference["strategy"]), check=0)
    os.unlink(os.path.join(root, ".aufs2overlay", "state.db"))
    res = cli("status", "--root", root, "--json")
    doc = json.loads(res.stdout)
    assert res.returncode == 7 and doc["phase"] == "state-lost", res.stdout
    assert "overlay2/" in doc["last_error"] and "rollback --force" in doc["next"]
    res = cli("run", "--root", root, "--engine-pidfile", "/nonexistent")
    assert res.returncode == 3 and "overlay2" in res.stderr  # what status warns about
    cli("rollback", "--root", root, "--engine-pidfile", "/nonexistent", "--force", "-q", check=0)
    assert cli("status", "--root", root).returncode == 0
    cli(*run_args(root, strategy=reference["strategy"]), check=0)
    assert tree_signature(root) == reference["signature"]


def _name_journals_as_earlier_releases_did(root):
    """Rewrite every journal of the root, in the database and in the stash copies, with the action names an
    earlier release stored (``inplace_journal.EARLIER_NAMES``); returns how many changes were renamed."""
    import sqlite3

    from migrator.strategies.inplace_journal import EARLIER_NAMES, JOURNAL_FILE

    renamed = 0
    db = sqlite3.connect(os.path.join(root, ".aufs2overlay", "state.db"))
    with db:
        for old, new in EARLIER_NAMES.items():
            renamed += db.execute("UPDATE change SET action = ? WHERE action = ?", (old, new)).rowcount
    db.close()
    stash = os.path.join(root, ".aufs2overlay", "stash")
    for layer in os.listdir(stash):
        path = os.path.join(stash, layer, JOURNAL_FILE)
        if os.path.exists(path):
            with open(path) as f:
                doc = json.load(f)
            for change in doc["changes"]:
                change["action"] = {new: old for old, new in EARLIER_NAMES.items()}.get(change["action"],
                                                                                         change["action"])
            with open(path, "w") as f:
                json.dump(doc, f)
    return renamed


@pytest.mark.parametrize("then", ["resume", "rollback", "rollback without the database"])
def test_journals_an_earlier_release_wrote_are_read(template, tmp_path, then):
    """An in-place migration cut off by an upgrade of the migrator: the journals its earlier release wrote (the
    actions under their old names) still resume to the same tree and roll back to the exact root."""
    trace = str(tmp_path / "trace")
    reference = fresh(template, tmp_path, "reference")
    cli(*run_args(reference, strategy="inplace"), env={"AUFS2OVERLAY_CHECKPOINT_TRACE": trace}, check=0)
    with open(trace) as f:
        labels = [line.rstrip("\n").split(" ", 1)[1] for line in f]
    second_journals = [n for n, label in enumerate(labels, 1) if label.startswith("recorded journals")][1]
    root = fresh(template, tmp_path)
    before = whole_root(root)
    kill_at(root, second_journals + 3, "inplace")  # one batch committed, the next one's changes under way
    assert _name_journals_as_earlier_releases_did(root) > 0
    if then == "resume":
        cli(*run_args(root, strategy="inplace"), check=0)
        assert tree_signature(root) == tree_signature(reference)
        return
    if then == "rollback without the database":
        os.unlink(os.path.join(root, ".aufs2overlay", "state.db"))
    cli("rollback", "--root", root, "--engine-pidfile", "/nonexistent", "-q",
        *(["--force"] if then == "rollback without the database" else []), check=0)
    after = whole_root(root)
    if then == "rollback without the database":  # the times these directories had lived in the lost database
        timeless = {b".", b"image", b"aufs/diff"} | {k for k in before[0] if k.startswith(b"containers/")
                                                      and k.count(b"/") == 1}
        before, after = _without_mtimes(before, timeless), _without_mtimes(after, timeless)
    assert after == before, diff_manifests(before[0], after[0])


def _without_mtimes(state, paths):
    entries, groups = state
    return {k: (v[:4] + (None,) + v[5:] if k in paths else v) for k, v in entries.items()}, groups
