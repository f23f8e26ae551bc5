"""Storage that is not all there is refused before anything is written; what real roots leave behind is not.

A layer that ``aufs/layers/``, the image layer store or a container names but ``aufs/diff/`` does not hold, and
image metadata gone while layers or containers are on aufs: what a partition that did not mount, or a partial
restore, looks like.  Each such root is refused by ``run`` (exit 3, one line) and by ``plan`` (verdict no), with
the root byte for byte as it was.  ``--accept-missing-storage`` migrates the rest and records every missing
piece.  The debris of cut-off removals still migrates as before.
"""

import json
import os
import shutil

import pytest

from migrator import sample
from tests.conftest import cli, needs_root, run_args, unpack_fixture
from tests.support.manifest import manifest
from tests.support.rootstate import assert_chains_match, aufs_views, whole_root

pytestmark = needs_root

LID = sample.layer_id
BASE, APP, TOP, OTHER, CID = (LID(n) for n in ("base", "app", "app-top", "other", "container"))


def _sample(tmp_path):
    root = str(tmp_path / "docker")
    sample.build_sample_root(root)
    return root


def _fixture(tmp_path):
    root = str(tmp_path / "balena")
    unpack_fixture(root)
    return root


def _write(path, data, mode=0o644):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def m_original_fail_cleanup(tmp_path):
    """balena-engine's own TestFailCleanup root: two layers in aufs/layers/ (one names its parent without a
    trailing newline), aufs/diff/ deleted, and (as the issue adds) one container on aufs."""
    root = str(tmp_path / "docker")
    a, b = "b38c03118c1e41289cf0972f11453c9b", "b8936bbae21948ed826207ced6fa19c5"
    _write(os.path.join(root, "aufs", "layers", a), b"", 0o755)
    _write(os.path.join(root, "aufs", "layers", b), a.encode(), 0o666)
    os.makedirs(os.path.join(root, "aufs", "mnt"))
    cid = "c" * 64
    _write(os.path.join(root, "containers", cid, "config.v2.json"),
           b'{"ID":"%s","Driver":"aufs","State":{"Running":false}}' % cid.encode(), 0o600)
    return root


def m_fixture_empty_diff(tmp_path):
    root = _fixture(tmp_path)
    diff = os.path.join(root, "aufs", "diff")
    for name in os.listdir(diff):
        shutil.rmtree(os.path.join(diff, name))
    return root


def m_fixture_no_diff(tmp_path):
    root = _fixture(tmp_path)
    shutil.rmtree(os.path.join(root, "aufs", "diff"))
    return root


def m_no_aufs_dir_at_all(tmp_path):
    """aufs/ itself gone (its partition did not mount) while image/aufs/ and a container still name it."""
    root = _sample(tmp_path)
    shutil.rmtree(os.path.join(root, "aufs"))
    return root


def m_one_image_layer_gone(tmp_path):
    root = _sample(tmp_path)
    shutil.rmtree(os.path.join(root, "aufs", "diff", OTHER))
    return root


def m_base_layer_gone(tmp_path):
    """The layer every other one stands on: every chain is broken."""
    root = _sample(tmp_path)
    shutil.rmtree(os.path.join(root, "aufs", "diff", BASE))
    return root


def m_container_layer_gone(tmp_path):
    """A live container's writable layer (named by layerdb/mounts/<cid>/mount-id) without its layers file."""
    root = _sample(tmp_path)
    shutil.rmtree(os.path.join(root, "aufs", "diff", CID))
    os.unlink(os.path.join(root, "aufs", "layers", CID))
    return root


def m_image_store_gone(tmp_path):
    root = _sample(tmp_path)
    shutil.rmtree(os.path.join(root, "image", "aufs"))
    return root


def m_layerdb_gone(tmp_path):
    root = _sample(tmp_path)
    shutil.rmtree(os.path.join(root, "image", "aufs", "layerdb"))
    return root


def m_container_mount_entry_gone(tmp_path):
    root = _sample(tmp_path)
    shutil.rmtree(os.path.join(root, "image", "aufs", "layerdb", "mounts", CID))
    return root


# (name, build, words the refusal line must hold)
REFUSED = [
    ("original's TestFailCleanup root", m_original_fail_cleanup, ("aufs/diff/ is missing", "2 layer(s)")),
    ("real root, aufs/diff emptied", m_fixture_empty_diff, ("aufs/diff/ is empty", "5 layer(s)")),
    ("real root, aufs/diff deleted", m_fixture_no_diff, ("aufs/diff/ is missing", "5 layer(s)")),
    ("aufs/ gone, image/aufs and a container remain", m_no_aufs_dir_at_all, ("aufs/diff/ is missing",)),
    ("one image layer's diff gone", m_one_image_layer_gone, ("1 layer(s)", OTHER)),
    ("base layer's diff gone", m_base_layer_gone, ("1 layer(s)", BASE)),
    ("live container's layer gone", m_container_layer_gone, ("1 layer(s)", CID)),
    ("image/aufs gone", m_image_store_gone, ("image metadata missing", "image/aufs/layerdb/")),
    ("image/aufs/layerdb gone", m_layerdb_gone, ("image metadata missing", "image/aufs/layerdb/")),
    ("container's layer store entry gone", m_container_mount_entry_gone,
     ("image metadata missing", f"layerdb/mounts/{CID}")),
]


def _configs(root):
    base = os.path.join(root, "containers")
    out = {}
    for cid in (os.listdir(base) if os.path.isdir(base) else []):
        path = os.path.join(base, cid, "config.v2.json")
        if os.path.exists(path):
            with open(path, "rb") as f:
                out[cid] = f.read()
    return out


@pytest.mark.parametrize("name,build,words", REFUSED, ids=[c[0] for c in REFUSED])
def test_missing_storage_is_refused(tmp_path, strategy, name, build, words):
    root = build(tmp_path)
    before, configs = manifest(root), _configs(root)

    res = cli(*run_args(root, strategy=strategy))
    assert res.returncode == 3, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("aufs2overlay: error: storage missing: "), res.stderr
    for word in words + ("mounted", "restored only in part", "--accept-missing-storage"):
        assert word in lines[0], lines[0]
    assert "Traceback" not in res.stderr

    plan = cli("plan", "--root", root, "--engine-pidfile", "/nonexistent", "--strategy", strategy)
    assert plan.returncode == 3, plan.stdout + plan.stderr
    assert "verdict:        no" in plan.stdout and "problem:        storage missing: " in plan.stdout
    doc = json.loads(cli("plan", "--root", root, "--engine-pidfile", "/nonexistent", "--json").stdout)
    assert doc["verdict"] == "no" and not doc["storage"]["complete"]
    kinds = {f["kind"] for f in doc["findings"]}
    assert kinds & {"missing-layer", "missing-image-metadata"}, doc["findings"]

    assert manifest(root) == before, "a refused run or plan changed the root"
    assert not os.path.lexists(os.path.join(root, "overlay2"))
    assert not os.path.lexists(os.path.join(root, ".aufs2overlay"))
    assert _configs(root) == configs


def test_plan_lists_every_missing_layer(tmp_path):
    root = m_fixture_empty_diff(tmp_path)
    doc = json.loads(cli("plan", "--root", root, "--engine-pidfile", "/nonexistent", "--json").stdout)
    missing = sorted(f["detail"].split()[0] for f in doc["findings"] if f["kind"] == "missing-layer")
    assert len(missing) == 5 and all(m.startswith("aufs/diff/") for m in missing)
    assert doc["storage"] == {"aufs_diff": "empty", "complete": False, "missing_layers": 5,
                              "missing_metadata": 0, "accepted": False}


def test_accepted_missing_storage_migrates_the_rest(tmp_path, strategy):
    """The override: the layers that are there migrate and mount right, the broken chain is left out, every
    missing piece is a finding in status --json, and (in place) rollback gives the root back exactly."""
    root = _sample(tmp_path)
    views = aufs_views(root).only(BASE)
    shutil.rmtree(os.path.join(root, "aufs", "diff", OTHER))
    shutil.rmtree(os.path.join(root, "aufs", "diff", APP))  # TOP, the -init and the container stand on it
    whole = whole_root(root)

    plan = cli("plan", "--root", root, "--engine-pidfile", "/nonexistent", "--accept-missing-storage", "--json")
    doc = json.loads(plan.stdout)
    assert plan.returncode == 0 and doc["verdict"] == "yes" and doc["storage"]["accepted"], plan.stdout
    assert doc["layers"] == 1 and doc["need"]["inodes"] < 1000, doc

    cli(*run_args(root, "--accept-missing-storage", strategy=strategy), check=0)
    status = json.loads(cli("status", "--root", root, "--json").stdout)
    assert status["phase"] == "completed"
    assert [layer["id"] for layer in status["layers"]] == [BASE]
    findings = {(f["kind"], f["detail"].split()[0]) for f in status["findings"]}
    assert ("missing-layer", f"aufs/diff/{APP}") in findings
    assert ("missing-layer", f"aufs/diff/{OTHER}") in findings
    for lid in (TOP, f"{CID}-init", CID):
        assert ("skipped-layer-missing-ancestor", f"aufs/diff/{lid}") in findings
    assert_chains_match(root, views)
    cli("verify", "--root", root, check=0)
    cli("rollback", "--root", root, "--engine-pidfile", "/nonexistent", "--force", "-q", check=0)
    after = whole_root(root)
    assert after[0] == whole[0] and after[1] == whole[1]


def d_dead_container_layers_removed(tmp_path):
    """The engine removed a dead container's layers and was cut off before its layer store entry."""
    root = _sample(tmp_path)
    for lid in (CID, f"{CID}-init"):
        shutil.rmtree(os.path.join(root, "aufs", "diff", lid))
        os.unlink(os.path.join(root, "aufs", "layers", lid))
    path = os.path.join(root, "containers", CID, "config.v2.json")
    with open(path, "rb") as f:
        data = f.read()
    _write(path, data.replace(b'"State":{"Running":false', b'"State":{"Dead":true,"Running":false'), 0o600)
    return root, ["removed-container-layers"]


def d_container_gone_mount_entry_left(tmp_path):
    """containers/<cid>/ removed, its layers too; the layer store's mounts/ entry is what was left."""
    root, _kinds = d_dead_container_layers_removed(tmp_path)
    shutil.rmtree(os.path.join(root, "containers", CID))
    return root, ["removed-container-layers"]


def d_layer_store_entry_being_removed(tmp_path):
    """The layer store renamed an image layer's entry to <chain>-<random>-removing, then the aufs driver removed
    aufs/layers/<id> and renamed aufs/diff/<id> to <id>-removing: the cut came in the middle."""
    root = _sample(tmp_path)
    sha = os.path.join(root, "image", "aufs", "layerdb", "sha256")
    for chain in os.listdir(sha):
        with open(os.path.join(sha, chain, "cache-id")) as f:
            if f.read() == OTHER:
                os.rename(os.path.join(sha, chain), os.path.join(sha, chain + "-" + "9" * 64 + "-removing"))
    os.unlink(os.path.join(root, "aufs", "layers", OTHER))
    os.rename(os.path.join(root, "aufs", "diff", OTHER), os.path.join(root, "aufs", "diff", OTHER + "-removing"))
    return root, ["skipped-removing-layer-store-entry", "skipped-removing-layer"]


def d_layer_being_removed_still_named(tmp_path):
    """An image still names a layer whose diff the aufs driver had renamed to -removing: being removed, not
    missing (the engine finishes the removal at its next start)."""
    root = _sample(tmp_path)
    os.unlink(os.path.join(root, "aufs", "layers", OTHER))
    os.rename(os.path.join(root, "aufs", "diff", OTHER), os.path.join(root, "aufs", "diff", OTHER + "-removing"))
    return root, ["layer-being-removed"]


DEBRIS = [
    ("dead container, layers removed", d_dead_container_layers_removed),
    ("container gone, layer store entry left", d_container_gone_mount_entry_left),
    ("layer store entry being removed", d_layer_store_entry_being_removed),
    ("image layer being removed", d_layer_being_removed_still_named),
]


@pytest.mark.parametrize("name,build", DEBRIS, ids=[c[0] for c in DEBRIS])
def test_debris_of_real_roots_still_migrates(tmp_path, strategy, name, build):
    root, kinds = build(tmp_path)
    views = aufs_views(root)
    plan = cli("plan", "--root", root, "--engine-pidfile", "/nonexistent", "--strategy", strategy)
    assert plan.returncode == 0 and "verdict:        yes" in plan.stdout, plan.stdout
    cli(*run_args(root, strategy=strategy), check=0)
    found = {f["kind"] for f in json.loads(cli("status", "--root", root, "--json").stdout)["findings"]}
    assert set(kinds) <= found, found
    assert not found & {"missing-layer", "missing-image-metadata"}, found
    assert_chains_match(root, views)
    cli("verify", "--root", root, check=0)
