"""Hostile and broken input.  Each case is either refused with one clear line (the whole root unchanged) or
migrated correctly (every chain, mounted by the kernel, shows the aufs view); in both, nothing outside the
engine root changes (a sentinel tree that symlinks in the layers point at), and the aufs data is unchanged.
"""

import os

import pytest

from tests.conftest import cli, needs_root, run_args
from tests.support import hostile as h
from tests.support.manifest import diff_manifests, manifest
from tests.support.rootstate import (
    assert_chains_match,
    assert_real_aufs_agrees,
    aufs_views,
    copy_for_the_guest,
    whole_root,
)
from tests.support.smallroot import NOT_SMALL_FILES

# No pytestmark: the cases need root through the aufs VM's fixture, the small files' test says so, and the docs'
# test runs as any user.

CASES = [
    ("parent cycle", h.c_parent_cycle, ("refused", ["cycle"])),
    ("missing parent (renamed -removing)", h.c_missing_parent, ("refused", ["ancestor", h.MID])),
    ("store layer without layers file", h.c_store_layer_without_layers_file, ("refused", ["ancestry is unknown"])),
    ("garbled layers file", h.c_garbled_layers_file, ("refused", ["garbled"])),
    ("blank line in layers file", h.c_blank_line_in_layers_file, ("refused", ["garbled"])),
    ("layers files disagree", h.c_layers_disagree, ("refused", ["disagrees"])),
    ("chain deeper than 128", h.c_chain_too_deep, ("refused", ["130 ancestors"])),
    ("aufs/diff/<id> symlink out of root", h.c_layer_dir_symlink_out_of_root, ("refused", ["symlink"])),
    ("aufs/diff itself a symlink", h.c_diff_dir_symlink, ("refused", ["not a directory"])),
    ("aufs/layers/<id> a symlink", h.c_layers_file_symlink, ("refused", ["not a regular file"])),
    ("layer dir name not an id", h.c_bad_layer_name, ("refused", ["not a layer id"])),
    ("garbage config.v2.json", h.c_garbage_config, ("refused", ["config.v2.json", "unreadable"])),
    ("config.v2.json a symlink to the host", h.c_config_symlink_to_host, ("refused", ["config.v2.json"])),
    ("absolute, ../.., dangling, looping symlinks", h.c_symlinks_out, ("migrated", [], None)),
    ("symlinked dir under a real dir", h.c_symlinked_dir_under_a_real_dir, ("migrated", [], None)),
    ("newlines, non-UTF-8, 255-byte names", h.c_awkward_names, ("migrated", [], None)),
    ("1 TiB sparse file", h.c_sparse_tib, ("migrated", [], h.check_sparse)),
    ("fifo, socket, devices", h.c_special_files, ("migrated", [], None)),
    ("a 0/0 character device", h.c_zero_device, ("migrated-differs", ["device-0-0-reads-as-whiteout"],
                                               h.check_zero_device)),
    ("unexpected files among layer dirs", h.c_unexpected_files,
     ("migrated", ["skipped-unexpected-file", "skipped-removing-layer", "skipped-orphan-layers-file"], None)),
    ("dangling cache-id", h.c_dangling_cache_id, ("refused", ["storage missing", h.LID("missing")])),
    ("whiteouts of '..', empty names, aufs metadata", h.c_bad_whiteouts,
     ("migrated", ["ignored-bad-whiteout", "dropped-aufs-internal"], None)),
    ("trusted.overlay.* xattrs in layer data", h.c_overlay_xattrs_in_layer,
     ("migrated", ["dropped-overlay-xattr"], h.check_overlay_xattrs)),
    ("300-level deep tree", h.c_deep_tree, ("migrated", [], None)),
    ("hardlink shared across layers", h.c_hardlink_across_layers, ("migrated", [], None)),
    ("odd containers dir entries", h.c_odd_containers, ("migrated", ["skipped-unexpected-file",
                                                                   "container-without-config"], None)),
    ("set-id, sticky and mode-000 entries", h.c_empty_layer_and_modes, ("migrated", [], None)),
]


@pytest.mark.parametrize("name,build,expected", CASES, ids=[c[0] for c in CASES])
def test_hostile_input(tmp_path, strategy, name, build, expected, aufs_guest):
    root, outside = build(tmp_path)
    if not os.path.exists(outside):
        h.make_outside(outside)
    outside_before = manifest(outside)
    root_before = manifest(root)
    aufs_before = manifest(os.path.join(root, "aufs"))
    whole = whole_root(root)
    views = aufs_views(root) if expected[0].startswith("migrated") else None
    pre = copy_for_the_guest(root, str(tmp_path / "pre")) if views is not None else None
    res = cli("run", "--root", root, "--engine-pidfile", "/nonexistent", "--strategy", strategy)
    assert "Traceback" not in res.stderr
    if expected[0] == "refused":
        assert res.returncode == 3, res.stderr
        line = [x for x in res.stderr.splitlines() if x.startswith("aufs2overlay: error:")]
        assert len(line) == 1, res.stderr
        for word in expected[1]:
            assert word in line[0], line[0]
        assert manifest(root) == root_before
    else:
        assert res.returncode == 0, res.stderr
        for kind in expected[1]:
            assert f"note: {kind}" in res.stderr or f"{kind}" in cli("status", "--root", root, "--json").stdout
        if strategy == "hardlink":
            assert manifest(os.path.join(root, "aufs")) == aufs_before
        if views is not None:
            assert_chains_match(root, views)
        if pre is not None:  # the real aufs judges too
            assert_real_aufs_agrees(aufs_guest, pre, root, views)
        if expected[0] == "migrated-differs" and strategy == "hardlink":
            # verify compares with the aufs view while aufs is there, and names the difference
            res = cli("verify", "--root", root)
            assert res.returncode == 1 and "shown by aufs, missing in overlay2" in res.stdout, res.stdout
        else:
            cli("verify", "--root", root, check=0)
        if expected[2]:
            expected[2](root)
        if strategy == "inplace":
            cli("rollback", "--root", root, "--engine-pidfile", "/nonexistent", "--force", "-q", check=0)
            after = whole_root(root)
            assert after[0] == whole[0], diff_manifests(whole[0], after[0])
            assert after[1] == whole[1]
    assert manifest(outside) == outside_before


def test_the_docs_table_lists_every_case():
    assert len(CASES) >= 20
    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "reliability.md")) as f:
        doc = f.read()
    missing = [name for name, _b, _e in CASES if f"| {name} |" not in doc]
    assert not missing, missing


SMALL_FILE_PLACES = {
    "aufs/layers/<id>": lambda root: os.path.join(root, "aufs", "layers", h.TOP),
    "config.v2.json": lambda root: os.path.join(root, "containers", h.CID, "config.v2.json"),
    "cache-id": lambda root: _store_file(root, "sha256", "cache-id"),
    "diff": lambda root: _store_file(root, "sha256", "diff"),
    "parent": lambda root: _store_file(root, "sha256", "parent"),
    "mount-id": lambda root: os.path.join(root, "image", "aufs", "layerdb", "mounts", h.CID, "mount-id"),
    "init-id": lambda root: os.path.join(root, "image", "aufs", "layerdb", "mounts", h.CID, "init-id"),
}


def _store_file(root, sub, name):
    """``name`` of the first layer store entry that has one."""
    base = os.path.join(root, "image", "aufs", "layerdb", sub)
    return next(os.path.join(base, e, name) for e in sorted(os.listdir(base))
                if os.path.exists(os.path.join(base, e, name)))


@needs_root
@pytest.mark.parametrize("kind", sorted(NOT_SMALL_FILES))
@pytest.mark.parametrize("place", sorted(SMALL_FILE_PLACES))
def test_a_small_file_that_is_not_one(tmp_path, place, kind):
    """A FIFO, socket, directory, symlink or 1 GiB sparse file where the engine keeps a small file: ``plan`` and
    ``run`` answer at once (a FIFO once hung them) with one line naming the file, exit 3, nothing changed."""
    root, _outside = h.base_root(tmp_path)
    path = SMALL_FILE_PLACES[place](root)
    os.unlink(path)
    NOT_SMALL_FILES[kind](path)
    rel = os.path.relpath(path, root)
    before = manifest(root)
    for args in (["plan", "--root", root, "--engine-pidfile", "/nonexistent"], run_args(root)):
        res = cli(*args, timeout=20)
        assert res.returncode == 3, res.stdout + res.stderr
        assert "Traceback" not in res.stderr
        said = [line for line in (res.stderr if args[0] == "run" else res.stdout).splitlines()
                if "error:" in line or "problem:" in line]
        assert len(said) == 1 and rel in said[0] and "unreadable" in said[0], res.stdout + res.stderr
        assert manifest(root) == before
