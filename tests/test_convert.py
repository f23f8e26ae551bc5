"""The conversion is right: every layer's chain, mounted by the kernel, shows what aufs showed."""

import json
import os
import re
import stat

import pytest

from tests.conftest import STRATEGIES, cli, needs_root, run_args
from tests.support.manifest import diff_manifests, link_groups, manifest
from tests.support.overlaymount import mounted_chain
from tests.support.rootstate import assert_chains_match, aufs_chains, aufs_side, aufs_views, whole_root
from tests.support.signature import tree_signature

pytestmark = needs_root


def migrate_and_check(root, strategy):
    """Run with ``strategy``: every chain equals the aufs view; the hardlink strategy leaves the aufs data as
    it was, and after the in-place one a rollback gives back the exact root, hardlinks among whiteouts included."""
    views = aufs_views(root)
    before, whole = aufs_side(root), whole_root(root)
    cli(*run_args(root, strategy=strategy), check=0)
    assert_chains_match(root, views)
    cli("verify", "--root", root, check=0)
    if strategy == "hardlink":
        assert aufs_side(root) == before, "run changed the aufs data"
        return views
    assert not [n for n in os.listdir(os.path.join(root, "aufs", "diff")) if n in views], "layers not moved"
    signature = tree_signature(root)
    cli("rollback", "--root", root, "--engine-pidfile", "/nonexistent", "--force", "-q", check=0)
    after = whole_root(root)
    assert after[0] == whole[0], diff_manifests(whole[0], after[0])
    assert after[1] == whole[1], "hardlink groups differ after rollback"
    cli(*run_args(root, strategy=strategy), check=0)
    assert tree_signature(root) == signature
    return views


def test_sample_root_every_chain_matches_aufs(sample_root, strategy):
    assert len(migrate_and_check(sample_root, strategy)) == 6


def test_both_strategies_make_the_same_tree(template, copy_root, tmp_path):
    roots = {s: copy_root(template, str(tmp_path / s)) for s in STRATEGIES}
    for s, root in roots.items():
        cli(*run_args(root, strategy=s), check=0)
    assert tree_signature(roots["hardlink"]) == tree_signature(roots["inplace"])


def test_real_balena_root_matches_aufs(fixture_root, strategy):
    wh_groups = [g for g in link_groups(fixture_root) if any(b"/.wh." in p for p in g)]
    assert wh_groups, "the fixture's aufs whiteouts are hardlinks of one another"
    migrate_and_check(fixture_root, strategy)
    # The fixture's a2o-test image: /tmp/f1 gone, /tmp/d1 holds only d1f2, hlkn and slkn present.
    top = "0ea3c275c06095f504eeded40409cb1c8f2df7a0c13999a290855f5d583b6b78"
    with mounted_chain(os.path.join(fixture_root, "overlay2"), top) as mnt:
        assert not os.path.lexists(os.path.join(mnt, "tmp", "f1"))
        assert os.listdir(os.path.join(mnt, "tmp", "d1")) == ["d1f2"]
        assert os.path.isfile(os.path.join(mnt, "tmp", "hlkn"))
        assert os.readlink(os.path.join(mnt, "tmp", "slkn")) == "/tmp/d1/d1f2"
        assert os.path.samestat(os.stat(os.path.join(mnt, "tmp", "hlkn")),
                                os.stat(os.path.join(mnt, "tmp", "d1", "d1f2")))


def test_resuming_with_the_other_strategy_is_refused(sample_root):
    res = cli(*run_args(sample_root, strategy="inplace"), env={"AUFS2OVERLAY_KILL_AT": "12"})
    assert res.returncode < 0
    res = cli(*run_args(sample_root, strategy="hardlink"))
    assert res.returncode == 3 and "started with --strategy inplace" in res.stderr
    cli(*run_args(sample_root), check=0)  # no --strategy: the one it started with


def test_overlay2_layout_is_dockerds(sample_root):
    cli(*run_args(sample_root), check=0)
    tree = os.path.join(sample_root, "overlay2")
    doc = json.loads(cli("status", "--root", sample_root, "--json", check=0).stdout)
    assert doc["phase"] == "completed"
    assert {layer["state"] for layer in doc["layers"]} == {"committed"}

    def mode(*p):
        return stat.S_IMODE(os.lstat(os.path.join(tree, *p)).st_mode)

    assert mode() == 0o710 and mode("l") == 0o700
    chains = aufs_chains(sample_root)
    parents = {os.path.basename(c[1]) for c in chains.values() if len(c) > 1}
    links = {}
    for lid, chain in chains.items():
        assert mode(lid) == 0o710
        with open(os.path.join(tree, lid, "link"), "rb") as f:
            link = f.read().decode()
        assert re.fullmatch(r"[A-Z2-7]{26}", link) and mode(lid, "link") == 0o644
        assert os.readlink(os.path.join(tree, "l", link)) == f"../{lid}/diff"
        links[lid] = link
        assert os.path.exists(os.path.join(tree, lid, "committed")) == (lid in parents)
        if lid in parents:
            assert mode(lid, "committed") == 0o600 and os.path.getsize(os.path.join(tree, lid, "committed")) == 0
        if len(chain) == 1:
            assert not os.path.exists(os.path.join(tree, lid, "lower"))
            assert not os.path.exists(os.path.join(tree, lid, "work"))
        else:
            assert mode(lid, "work") == 0o700
            assert mode(lid, "lower") == 0o644
    assert len(set(links.values())) == len(links)
    for lid, chain in chains.items():
        if len(chain) > 1:
            with open(os.path.join(tree, lid, "lower"), "rb") as f:
                lower = f.read()
            assert lower == ":".join(f"l/{links[os.path.basename(a)]}" for a in chain[1:]).encode()
    # Every whiteout is its own inode (aufs hardlinks them to each other), no .wh. name survives but the one an
    # image layer's tar names with data (``docker save`` reads it).
    devices = []
    for top, dirs, files in os.walk(tree):
        for name in dirs + files:
            assert not name.startswith(".wh.") or name == ".wh..wh.strange", os.path.join(top, name)
            st = os.lstat(os.path.join(top, name))
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                devices.append(st.st_ino)
                assert st.st_nlink == 1
    assert len(devices) == len(set(devices)) >= 5
    # The image store is a faithful copy.
    assert manifest(os.path.join(sample_root, "image", "overlay2")) == manifest(
        os.path.join(sample_root, "image", "aufs"))


def test_container_config_changes_only_driver(sample_root):
    from migrator.sample import layer_id

    cfg = os.path.join(sample_root, "containers", layer_id("container"), "config.v2.json")
    with open(cfg, "rb") as f:
        original = f.read()
    cli(*run_args(sample_root), check=0)
    with open(cfg, "rb") as f:
        new = f.read()
    assert new == original.replace(b'"Driver":"aufs"', b'"Driver":"overlay2"')
    assert b'"MountPoints":{"/data":{"Driver":"local"' in new
    assert stat.S_IMODE(os.stat(cfg).st_mode) == 0o600


def test_link_ids_chosen_once_and_kept_on_resume(sample_root):
    trace_env = {"AUFS2OVERLAY_KILL_AT": "30"}
    res = cli(*run_args(sample_root), env=trace_env)
    assert res.returncode == -9
    from migrations_state.store import Store

    store = Store(os.path.join(sample_root, ".aufs2overlay", "state.db"))
    first = {r.id: r.link_id for r in store.layers()}
    store.close()
    cli(*run_args(sample_root), check=0)
    for lid, link in first.items():
        with open(os.path.join(sample_root, "overlay2", lid, "link")) as f:
            assert f.read() == link


def test_findings_are_reported(sample_root):
    res = cli("run", "--root", sample_root, "--engine-pidfile", "/nonexistent", check=0)
    assert "skipped-removing-layer" in res.stderr
    doc = json.loads(cli("status", "--root", sample_root, "--json", check=0).stdout)
    kinds = {f["kind"] for f in doc["findings"]}
    assert {"skipped-removing-layer", "container-without-config", "dropped-aufs-internal",
            "whiteout-beside-entry", "aufs-internal-kept-for-tar-split"} <= kinds
    dropped = [f["detail"] for f in doc["findings"] if f["kind"] == "dropped-aufs-internal"]
    assert any(d.endswith(".wh..wh.plnk") for d in dropped) and any(d.endswith(".wh..wh.gone.0a1b") for d in dropped)
    kept = [f["detail"] for f in doc["findings"] if f["kind"] == "aufs-internal-kept-for-tar-split"]
    assert kept == ["/etc/.wh..wh.strange"]
    beside = {f["detail"] for f in doc["findings"] if f["kind"] == "whiteout-beside-entry"}
    assert {"/etc/conf", "/srv"} <= beside  # the entries whose view differs, not the whiteouts


@pytest.mark.parametrize("link_target", ["/etc/shadow", "../../../../../../etc/passwd", "/nonexistent"])
def test_symlinks_in_layers_are_never_followed(tmp_path, link_target):
    from migrator import sample

    root = str(tmp_path / "docker")
    lid = sample.layer_id("only")
    sample.build_aufs_root(root, {lid: ([], [(b"evil", "link", {"to": link_target.encode()}),
                                             (b"d", "dir", {}), (b"d/evil2", "link", {"to": b"/etc"})])},
                           {"img": [lid]}, {})
    cli(*run_args(root), check=0)
    evil = os.path.join(root, "overlay2", lid, "diff", "evil")
    assert os.path.islink(evil) and os.readlink(evil) == link_target
    assert os.path.samestat(os.lstat(evil), os.lstat(os.path.join(root, "aufs", "diff", lid, "evil")))


def test_writable_layer_is_copied_not_shared(sample_root):
    """overlay2 writes a container's own layer in place: sharing its inodes with aufs would let the engine
    change the aufs data behind rollback's back."""
    from migrator.sample import layer_id

    cid = layer_id("container")
    cli(*run_args(sample_root), check=0)
    new = os.path.join(sample_root, "overlay2", cid, "diff", "tmp")
    old = os.path.join(sample_root, "aufs", "diff", cid, "tmp")
    for name in ("scratch", "h1", "h2"):
        assert os.lstat(os.path.join(new, name)).st_ino != os.lstat(os.path.join(old, name)).st_ino
    assert os.path.samestat(os.lstat(os.path.join(new, "h1")), os.lstat(os.path.join(new, "h2")))
    assert os.lstat(os.path.join(new, "h1")).st_nlink == 2
    # Image layers are hardlinked.
    base = layer_id("base")
    assert os.path.samestat(os.lstat(os.path.join(sample_root, "overlay2", base, "diff", "bin", "busybox")),
                            os.lstat(os.path.join(sample_root, "aufs", "diff", base, "bin", "busybox")))


def test_image_store_shares_only_files_the_engine_replaces_by_rename(sample_root):
    """``image/overlay2/`` hardlinks the layer store entries, image configs and ``repositories.json`` (the
    engine replaces those by rename) and copies ``layerdb/mounts/`` (written in place): after the engine did
    both kinds of write to ``image/overlay2/``, a rollback finds ``image/aufs/`` byte for byte as it was."""
    image = os.path.join(sample_root, "image")
    before = manifest(os.path.join(image, "aufs"))
    cli(*run_args(sample_root), check=0)
    aufs_side_, new = os.path.join(image, "aufs"), os.path.join(image, "overlay2")
    shared, copied = [], []
    for top, _dirs, files in os.walk(new):
        for name in files:
            rel = os.path.relpath(os.path.join(top, name), new)
            same = os.path.samestat(os.lstat(os.path.join(new, rel)), os.lstat(os.path.join(aufs_side_, rel)))
            (shared if same else copied).append(rel)
    assert copied and all(rel.startswith("layerdb/mounts/") for rel in copied), copied
    assert any(r.startswith("layerdb/sha256/") and r.endswith("tar-split.json.gz") for r in shared)
    assert "repositories.json" in shared and any(r.startswith("imagedb/content/") for r in shared)
    # The engine, running on overlay2: a rename over repositories.json and a layer's cache-id, an in-place
    # write of a mount's mount-id, a removed image config.
    for rel in ("repositories.json", next(r for r in shared if r.endswith("cache-id"))):
        with open(os.path.join(new, rel + ".tmp"), "wb") as f:
            f.write(b"rewritten by the engine")
        os.rename(os.path.join(new, rel + ".tmp"), os.path.join(new, rel))
    with open(os.path.join(new, next(r for r in copied if r.endswith("mount-id"))), "r+b") as f:
        f.truncate(0)
        f.write(b"0" * 64)
    os.unlink(os.path.join(new, next(r for r in shared if r.startswith("imagedb/content/"))))
    cli("rollback", "--root", sample_root, "--engine-pidfile", "/nonexistent", "--force", "-q", check=0)
    assert not os.path.exists(new)
    after = manifest(os.path.join(image, "aufs"))
    assert after == before, diff_manifests(before, after)
    links = {os.path.join(top, n): os.lstat(os.path.join(top, n)).st_nlink
             for top, _d, files in os.walk(os.path.join(image, "aufs")) for n in files}
    assert set(links.values()) == {1}, links
