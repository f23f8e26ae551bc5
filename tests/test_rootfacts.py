"""The root's facts, read once, and every verdict drawn from them: table-driven, without root, in seconds.

Each root is metadata only (``tests/support/smallroot.py``); the verdict is ``plan.check_root``, the same
function ``plan`` and ``run`` refuse with, over ``snapshot.read_root``.  The real command on real roots, as
root, is in test_refusals, test_missing_storage and test_hostile.
"""

import os
import shutil
import time

import pytest

from migrator.checks import plan as planner
from migrator.checks import verify
from migrator.errors import Refused
from migrator.formats import aufs, snapshot
from migrator.paths import Paths
from migrator.sample import layer_id as LID
from migrator.strategies import registry
from migrator.strategies.base import LayerTask, undeclared_steps
from tests.support.smallroot import NOT_SMALL_FILES, SmallRoot, chain_id, tree_of, write

BASE, MID, TOP, CID = LID("base"), LID("mid"), LID("top"), LID("container")


def verdict(root, accept=False):
    """("refused", the line) or ("ok", the plan) for ``root``."""
    plan = planner.Plan(root=root, strategy=registry.DEFAULT, accept_missing_storage=accept)
    try:
        planner.check_root(plan, snapshot.read_root(Paths.for_root(root)))
    except Refused as exc:
        return "refused", str(exc)
    return "ok", plan


def chain3(tmp_path, **kw):
    return SmallRoot(str(tmp_path / "docker"), {BASE: [], MID: [BASE], TOP: [MID, BASE]}, **kw)


def with_container(tmp_path, driver="aufs"):
    layers = {BASE: [], CID + "-init": [BASE], CID: [CID + "-init", BASE]}
    return SmallRoot(str(tmp_path / "docker"), layers, containers=[(CID, CID, driver)])


# -- refusals: (name, how the root is made from the 3-layer chain, words of the one line) ---------------------

def _rm(r, *parts):
    path = r.path(*parts)
    shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)


def _swap_for_symlink(r, *parts):
    _rm(r, *parts)
    os.symlink("/etc", r.path(*parts))


def _mutate_layers(lid, data):
    return lambda r: write(r.path("aufs", "layers", lid), data)


REFUSALS = [
    ("parent cycle", _mutate_layers(BASE, f"{TOP}\n{MID}\n".encode()), ["cycle"]),
    ("missing parent", lambda r: _rm(r, "aufs", "diff", MID), ["storage missing", MID]),
    ("store layer without layers file", lambda r: _rm(r, "aufs", "layers", MID), ["ancestry is unknown"]),
    ("garbled layers file", _mutate_layers(TOP, b"not an id!\n"), ["garbled"]),
    ("blank line in layers file", _mutate_layers(TOP, f"{MID}\n\n{BASE}\n".encode()), ["garbled"]),
    ("non-ASCII layers file", _mutate_layers(TOP, b"\xff\n"), ["garbled"]),
    ("layers files disagree", _mutate_layers(TOP, f"{MID}\n".encode()), ["disagrees"]),
    ("self as ancestor", _mutate_layers(TOP, f"{TOP}\n".encode()), ["cycle"]),
    ("aufs/diff/<id> a symlink", lambda r: _swap_for_symlink(r, "aufs", "diff", TOP), ["symlink"]),
    ("aufs/diff a symlink", lambda r: _swap_for_symlink(r, "aufs", "diff"), ["not a directory"]),
    ("aufs/diff a file", lambda r: (shutil.rmtree(r.path("aufs", "diff")), write(r.path("aufs", "diff"), b"")),
     ["not a directory"]),
    ("layer dir name not an id", lambda r: os.mkdir(r.path("aufs", "diff", "not an id")), ["not a layer id"]),
    ("garbage config.v2.json", lambda r: write(r.path("containers", CID, "config.v2.json"), b"{nope"),
     ["config.v2.json", "unreadable"]),
    ("config without Driver", lambda r: write(r.path("containers", CID, "config.v2.json"), b'{"ID":"x"}'),
     ["config.v2.json", "no Driver key"]),
    ("dangling cache-id", lambda r: r.store_entry("f" * 64, LID("missing")), ["storage missing", LID("missing")]),
    ("aufs/diff emptied", lambda r: [shutil.rmtree(r.path("aufs", "diff", i)) for i in (BASE, MID, TOP)],
     ["storage missing", "aufs/diff/ is empty"]),
    ("aufs/diff gone", lambda r: shutil.rmtree(r.path("aufs", "diff")), ["storage missing", "aufs/diff/ is missing"]),
    ("image/aufs/imagedb gone", lambda r: shutil.rmtree(r.path("image", "aufs", "imagedb")),
     ["image metadata missing", "image/aufs/imagedb/"]),
    ("image/aufs/layerdb gone", lambda r: shutil.rmtree(r.path("image", "aufs", "layerdb")),
     ["image metadata missing", "image/aufs/layerdb/"]),
    ("aufs/ gone, layer store left", lambda r: shutil.rmtree(r.path("aufs")), ["storage missing"]),
]


def test_chain_deeper_than_overlay2_is_refused(tmp_path):
    ids = [LID(f"l{i}") for i in range(131)]
    r = SmallRoot(str(tmp_path / "docker"), {lid: list(reversed(ids[:i])) for i, lid in enumerate(ids)})
    kind, line = verdict(r.root)
    assert kind == "refused" and "ancestors; overlay2 allows at most 128" in line, line


@pytest.mark.parametrize("name,mutate,words", REFUSALS, ids=[c[0] for c in REFUSALS])
def test_refused(tmp_path, name, mutate, words):
    r = chain3(tmp_path)
    r.container(CID, "aufs")
    r.mount_entry(CID, TOP, TOP)  # a container on the top layer (its own layers are the image's, for brevity)
    assert verdict(r.root)[0] == "ok"
    mutate(r)
    kind, line = verdict(r.root)
    assert kind == "refused", f"{name}: not refused"
    for word in words:
        assert word in line, line


def test_container_mounts_entry_gone_is_missing_metadata(tmp_path):
    r = with_container(tmp_path)
    shutil.rmtree(r.path("image", "aufs", "layerdb", "mounts", CID))
    kind, line = verdict(r.root)
    assert kind == "refused" and "image metadata missing" in line and f"layerdb/mounts/{CID}" in line


# -- debris: what cut-off removals leave migrates, reported --------------------------------------------------

DEBRIS = [
    ("layer being removed, named by the store", lambda r: os.rename(r.path("aufs", "diff", TOP),
                                                                  r.path("aufs", "diff", TOP + "-removing")),
     None, ["layer-being-removed", "skipped-removing-layer"]),
    ("layer store entry being removed", lambda r: os.rename(
        r.path("image", "aufs", "layerdb", "sha256", chain_id(2)),
        r.path("image", "aufs", "layerdb", "sha256", chain_id(2) + "-abc-removing")),
     None, ["skipped-removing-layer-store-entry"]),
    ("orphan layers file", lambda r: write(r.path("aufs", "layers", LID("orphan")), b""), None,
     ["skipped-orphan-layers-file"]),
    ("unexpected file in aufs/diff", lambda r: write(r.path("aufs", "diff", "README"), b"x"), None,
     ["skipped-unexpected-file"]),
    ("layer without layers file, unnamed", lambda r: write(r.path("aufs", "diff", LID("stray"), "f"), b""), None,
     ["skipped-layer-without-layers-file"]),
    ("container without config", lambda r: os.makedirs(r.path("containers", "c0")), None,
     ["container-without-config"]),
    ("file among containers", lambda r: write(r.path("containers", "c1"), b""), None, ["skipped-unexpected-file"]),
    ("dead container's layers gone", None, "dead", ["removed-container-layers"]),
    ("config-less container's layers gone", None, "configless", ["removed-container-layers"]),
]


@pytest.mark.parametrize("name,mutate,container,kinds", DEBRIS, ids=[c[0] for c in DEBRIS])
def test_debris_migrates_and_is_reported(tmp_path, name, mutate, container, kinds):
    if container:
        r = with_container(tmp_path)
        for lid in (CID, CID + "-init"):
            shutil.rmtree(r.path("aufs", "diff", lid))
            os.unlink(r.path("aufs", "layers", lid))
        if container == "dead":
            r.container(CID, "aufs", state={"Dead": True})
        else:
            os.unlink(r.path("containers", CID, "config.v2.json"))
    else:
        r = chain3(tmp_path)
        mutate(r)
    kind, plan = verdict(r.root)
    assert kind == "ok", plan
    found = {k for k, _d in plan.findings}
    for k in kinds:
        assert k in found, (k, plan.findings)


def test_accepted_missing_storage_leaves_out_broken_chains(tmp_path):
    r = chain3(tmp_path)
    shutil.rmtree(r.path("aufs", "diff", MID))
    assert verdict(r.root)[0] == "refused"
    kind, plan = verdict(r.root, accept=True)
    assert kind == "ok"
    assert [layer.id for layer in plan.discovery.layers] == [BASE]
    found = {k for k, _d in plan.findings}
    assert {"missing-layer", "skipped-layer-missing-ancestor"} <= found, plan.findings


def test_discovery_orders_parents_first_and_marks_writable_layers(tmp_path):
    r = with_container(tmp_path)
    kind, plan = verdict(r.root)
    assert kind == "ok"
    layers = plan.discovery.layers
    assert [layer.id for layer in layers] == [BASE, CID + "-init", CID]
    assert [layer.writable for layer in layers] == [False, False, True]
    assert [c.id for c in plan.found] == [CID]
    assert plan.discovery.parents == {BASE, CID + "-init"}


# -- a small file that is not one: refused at once, naming the file ----------------------------------------

PLACES = {
    "aufs/layers/<id>": lambda r: r.path("aufs", "layers", TOP),
    "config.v2.json": lambda r: r.path("containers", CID, "config.v2.json"),
    "cache-id": lambda r: r.path("image", "aufs", "layerdb", "sha256", chain_id(1), "cache-id"),
    "diff": lambda r: r.path("image", "aufs", "layerdb", "sha256", chain_id(1), "diff"),
    "parent": lambda r: r.path("image", "aufs", "layerdb", "sha256", chain_id(1), "parent"),
    "mount-id": lambda r: r.path("image", "aufs", "layerdb", "mounts", CID, "mount-id"),
    "init-id": lambda r: r.path("image", "aufs", "layerdb", "mounts", CID, "init-id"),
    "mounts parent": lambda r: r.path("image", "aufs", "layerdb", "mounts", CID, "parent"),
}


@pytest.mark.parametrize("kind", sorted(NOT_SMALL_FILES))
@pytest.mark.parametrize("place", sorted(PLACES))
def test_a_small_file_that_is_not_one_is_refused_at_once(tmp_path, place, kind):
    r = chain3(tmp_path)
    r.container(CID, "aufs")
    r.mount_entry(CID, TOP, TOP)
    path = PLACES[place](r)
    os.unlink(path)
    NOT_SMALL_FILES[kind](path)
    started = time.monotonic()
    result, line = verdict(r.root)
    assert time.monotonic() - started < 5
    assert result == "refused"
    assert os.path.relpath(path, r.root) in line and "unreadable" in line, line


def test_the_reader_never_blocks_follows_or_reads_without_bound(tmp_path):
    from migrator.fs import fsio

    for kind, make in NOT_SMALL_FILES.items():
        path = str(tmp_path / kind.replace(" ", "-"))
        make(path)
        with pytest.raises(fsio.NotSmallFile):
            fsio.read_small(path, 4096)
    write(str(tmp_path / "ok"), b"12345")
    assert fsio.read_small(str(tmp_path / "ok"), 5)[0] == b"12345"
    with pytest.raises(fsio.NotSmallFile):
        fsio.read_small(str(tmp_path / "ok"), 4)
    with pytest.raises(FileNotFoundError):
        fsio.read_small(str(tmp_path / "none"), 4)


def test_verify_reads_a_layer_file_that_is_a_fifo_without_blocking(tmp_path):
    tree = tmp_path / "overlay2"
    (tree / TOP / "diff").mkdir(parents=True)
    (tree / "l").mkdir()
    os.mkfifo(tree / TOP / "link")
    os.symlink(f"../{TOP}/diff", tree / "l" / ("A" * 26))
    problems = verify.layer_problems(str(tree), TOP, "A" * 26, [], False)
    assert problems == [f"{TOP}: link file is not {'A' * 26}"]


# -- the snapshot: one reading, compared ------------------------------------------------------------------

def test_two_snapshots_say_what_changed(tmp_path):
    r = chain3(tmp_path)
    r.container(CID, "aufs")
    before = snapshot.read_root(Paths.for_root(r.root))
    assert not snapshot.changes(before, snapshot.read_root(Paths.for_root(r.root)))
    write(r.path("aufs", "diff", LID("new"), "f"), b"x")  # a pull
    write(r.path("aufs", "layers", LID("new")), f"{TOP}\n".encode())
    r.store_entry(chain_id(9), LID("new"), chain_id(2))
    os.rename(r.path("aufs", "diff", MID, "f"), r.path("aufs", "diff", MID, "g"))  # the layer's directory changed
    shutil.rmtree(r.path("containers", CID))
    found = snapshot.changes(before, snapshot.read_root(Paths.for_root(r.root)))
    assert found.added == (f"aufs/diff/{LID('new')}", f"aufs/layers/{LID('new')}",
                           f"image/aufs/layerdb/sha256/{chain_id(9)}")
    assert found.removed == (f"containers/{CID}",)
    assert found.changed == (f"aufs/diff/{MID}",)


def test_reading_leaves_access_times_alone(tmp_path):
    r = chain3(tmp_path)
    layers_file = r.path("aufs", "layers", TOP)
    os.utime(layers_file, ns=(1, 2))
    snapshot.read_root(Paths.for_root(r.root))
    assert os.stat(layers_file).st_atime_ns == 1


# -- the whiteout table -----------------------------------------------------------------------------------

WH = [
    ({".wh.gone": False}, [(".wh.gone", aufs.MAKE_WHITEOUT, "gone")]),
    ({".wh.gone": True}, [(".wh.gone", aufs.MAKE_WHITEOUT, "gone")]),
    ({".wh..wh..opq": False}, [(".wh..wh..opq", aufs.SET_OPAQUE, None)]),
    ({".wh..wh.plnk": True, ".wh..wh.aufs": False, ".wh..wh.orph": True, ".wh..wh.other": False},
     [(n, aufs.DROP_INTERNAL, None) for n in (".wh..wh.plnk", ".wh..wh.aufs", ".wh..wh.orph", ".wh..wh.other")]),
    ({".wh.": False, ".wh..": False, ".wh...": False}, [(n, aufs.DROP_BAD, None) for n in (".wh.", ".wh..", ".wh...")]),
    ({"d": True, ".wh.d": False}, [(".wh.d", aufs.OPAQUE_CHILD, "d")]),
    ({"f": False, ".wh.f": False}, [(".wh.f", aufs.KEEP_ENTRY, "f")]),
    ({"a": False, "b": True}, []),
    ({b".wh.\xff\n": False}, [(b".wh.\xff\n", aufs.MAKE_WHITEOUT, b"\xff\n")]),
    ({b"x": True, b".wh.x": False, b".wh..wh..opq": False},
     [(b".wh.x", aufs.OPAQUE_CHILD, b"x"), (b".wh..wh..opq", aufs.SET_OPAQUE, None)]),
]


@pytest.mark.parametrize("entries,expected", WH, ids=[repr(list(e)) for e, _x in WH])
def test_whiteout_actions(entries, expected):
    assert [(a.name, a.action, a.target) for a in aufs.whiteout_actions(entries)] == expected


def test_every_action_has_its_finding():
    assert set(aufs.FINDING) == {aufs.MAKE_WHITEOUT, aufs.SET_OPAQUE, aufs.OPAQUE_CHILD, aufs.KEEP_ENTRY,
                                 aufs.DROP_BAD, aufs.DROP_INTERNAL, aufs.DROP_UNNEEDED, aufs.KEEP_INTERNAL}


def test_a_kept_internal_stays_and_a_finding_names_the_entry_whose_view_differs():
    entries = {b".wh..wh.x.1a2b": True, b".wh..wh.y.0001": False, b"k": False, b".wh.k": False}
    got = [(a.name, a.action, a.named) for a in aufs.whiteout_actions(entries, kept={b".wh..wh.x.1a2b"})]
    assert got == [(b".wh..wh.x.1a2b", aufs.KEEP_INTERNAL, b".wh..wh.x.1a2b"),
                   (b".wh..wh.y.0001", aufs.DROP_INTERNAL, b".wh..wh.y.0001"),
                   (b".wh.k", aufs.KEEP_ENTRY, b"k")]  # the finding names k, which aufs hid and overlay2 shows


def test_an_internal_is_kept_only_where_the_tar_split_reads_data(tmp_path):
    """A copy-up or an rmdir cut off leaves ``.wh..wh.<name>.<4 hex>``; ``docker save`` reads only files that
    hold data, so only those (and the directories on their way) are kept."""
    top = tree_of(tmp_path / "layer", [".wh..wh.e.0001", ".wh..wh.d.0002/", ".wh..wh.d.0002/.wh.gone",
                                     ".wh..wh.f.0003/sub/"])
    with open(os.path.join(top, ".wh..wh.full.0004"), "wb") as f:
        f.write(b"partial copy")
    os.makedirs(os.path.join(top, ".wh..wh.g.0005", "sub"))
    with open(os.path.join(top, ".wh..wh.g.0005", "sub", "data"), "wb") as f:
        f.write(b"x")
    os.symlink("target", os.path.join(top, ".wh..wh.l.0006"))
    kept = {n for n in os.listdir(top) if aufs.kept_in(top, n)}
    assert kept == {".wh..wh.full.0004", ".wh..wh.g.0005"}


def test_whiteouts_of_a_directory_merged_with_nothing_are_dropped():
    entries = {".wh.gone": False, ".wh..wh..opq": False, "d": True, ".wh.d": False, ".wh.": False}
    got = [(a.name, a.action, a.finding) for a in aufs.whiteout_actions(entries, merged=False)]
    assert got == [(".wh.gone", aufs.DROP_UNNEEDED, "whiteout-hides-nothing"),
                   (".wh..wh..opq", aufs.SET_OPAQUE, None), (".wh.d", aufs.OPAQUE_CHILD, "whiteout-beside-entry"),
                   (".wh.", aufs.DROP_BAD, "ignored-bad-whiteout")]


# -- is a layer's directory merged with one of its ancestors' (lowerview) ------------------------------------

MERGED = [  # (layer, ancestors nearest first, directory, merged?)
    (["a/", "a/.wh.x"], [], b"a", False),  # a base layer: nothing below
    (["a/", "a/.wh.x"], [["a/"]], b"a", True),
    (["a/", "a/.wh.x"], [["b/"]], b"a", False),  # no a/ below
    (["a/", "a/.wh.x"], [["a"]], b"a", False),  # a file below: not merged
    (["a/", "a/.wh.x"], [[".wh.a"], ["a/"]], b"a", False),  # whited out by the nearer ancestor
    (["a/", "a/.wh.x"], [["a/", ".wh.a"], ["a/"]], b"a", True),  # the whiteout hides below its own layer only
    (["a/b/", "a/b/.wh.x"], [["a/", "a/.wh..wh..opq"], ["a/b/"]], b"a/b", False),  # opaque a/ below hides b/
    (["a/b/", "a/b/.wh.x"], [["a/b/", "a/.wh..wh..opq"], ["a/b/"]], b"a/b", True),  # opaque, yet holds b/
    (["a/", "a/.wh..wh..opq", "a/.wh.x"], [["a/"]], b"a", False),  # opaque in the layer itself
    (["a/", ".wh.a", "a/.wh.x"], [["a/"]], b"a", False),  # .wh.a beside a/: opaque too
    (["a/b/", "a/.wh..wh..opq", "a/b/.wh.x"], [["a/b/"]], b"a/b", False),  # below an opaque directory
    (["a/b/", "a/b/.wh.x"], [["a/"], ["a/b/"]], b"a/b", True),  # merged through two ancestors
    ([".wh.x"], [["x"]], b"", True),  # the root of a layer with an ancestor
    ([".wh.x"], [], b"", False),
    ([".wh..wh..opq", "a/", "a/.wh.x"], [["a/"]], b"a", True),  # aufs ignores the marker at a branch root
]


@pytest.mark.parametrize("layer,ancestors,rel,merged", MERGED, ids=[str(i) for i in range(len(MERGED))])
def test_a_directory_is_merged_as_overlayfs_looks_it_up(tmp_path, layer, ancestors, rel, merged):
    from migrator.formats import lowerview

    top = tree_of(tmp_path / "layer", layer)
    lowers = [lowerview.Lower(tree_of(tmp_path / f"a{i}", paths)) for i, paths in enumerate(ancestors)]
    assert lowerview.is_merged(top, lowers, rel) is merged


DIFFERS = [  # (layer, ancestors nearest first, directory, what aufs did otherwise, or None)
    (["a/"], [["a/"], ["a"]], b"a", None),  # a file below, nothing under it: both stop there
    (["a/"], [["a"], ["a/", "a/b"]], b"a", "aufs-merged-through-non-directory"),  # aufs skips the file
    (["a/"], [["a"], [".wh.a"], ["a/"]], b"a", None),  # a whiteout ends aufs's lookup as well
    (["a/"], [["a"], ["b/"]], b"a", None),  # nothing to merge below the file
    (["a/"], [["a/"], ["a"], ["a/"]], b"a", "aufs-merged-through-non-directory"),
    (["a/", "a/.wh..wh..opq"], [["a/"]], b"a", None),  # one opaque directory: both stop at it
    (["a/", "a/.wh..wh..opq"], [["a/"], ["a/", "a/.wh..wh..opq"]], b"a", "aufs-merged-below-opaque"),
    (["a/"], [["a/", "a/.wh..wh..opq"], ["a/"], ["a/", "a/.wh..wh..opq"]], b"a", "aufs-merged-below-opaque"),
    (["a/"], [["a/", "a/.wh..wh..opq"], ["a/"], [".wh.a"], ["a/", "a/.wh..wh..opq"]], b"a", None),
    (["a/", ".wh.a"], [["a"], ["a/"]], b"a", None),  # whited out beside itself: its own finding says so
    (["a/b/"], [["a"], ["a/b/"]], b"a/b", None),  # below a directory that differs: named there only
    (["a/b/"], [["a/b"], ["a/b/"]], b"a/b", "aufs-merged-through-non-directory"),
]


@pytest.mark.parametrize("layer,ancestors,rel,differs", DIFFERS, ids=[str(i) for i in range(len(DIFFERS))])
def test_where_aufs_merged_further_than_overlayfs(tmp_path, layer, ancestors, rel, differs):
    """aufs's lookup skips a lower entry of another type, and ends a directory's merge at the lowest opaque
    directory it met, not the first (``au_lkup_dentry``; the real aufs in the VM agrees:
    tests/test_real_aufs.py)."""
    from migrator.formats import lowerview

    top = tree_of(tmp_path / "layer", layer)
    lowers = [lowerview.Lower(tree_of(tmp_path / f"a{i}", paths)) for i, paths in enumerate(ancestors)]
    merge = lowerview.at(top, lowers, rel)
    try:
        assert merge.differs == differs
    finally:
        merge.close()


def test_a_walk_names_each_directory_where_aufs_merged_further(tmp_path):
    """The survey (what plan and the in-place link step read) and the hardlink link step find the same."""
    from migrator.formats import lowerview
    from migrator.scan import survey
    from migrator.strategies import linker

    top = tree_of(tmp_path / "layer", ["x/", "x/a", "x/deeper/", "y/", "y/.wh..wh..opq", "z/"])
    lowers = [tree_of(tmp_path / "a0", ["x", "y/", "y/.wh..wh..opq", "z/"]),
              tree_of(tmp_path / "a1", ["x/", "x/b", "x/deeper/", "y/", "y/m", "z/"])]
    expected = {("aufs-merged-through-non-directory", "/x"), ("aufs-merged-below-opaque", "/y")}
    walked = survey.scan_layer(top, False, [lowerview.Lower(d) for d in lowers])
    assert {f for f in walked.findings if f[0].startswith("aufs-merged")} == expected
    os.makedirs(tmp_path / "tree")
    linked = linker.build_layer_tree(top, str(tmp_path / "tree"), "layer", lower_dirs=lowers)
    assert {f for f in linked.findings if f[0].startswith("aufs-merged")} == expected


def test_a_copy_up_pseudo_link_is_named_by_both_walks(tmp_path):
    """``.wh..wh.plnk/<aufs inode>.<inode>`` is a hardlink of a file copied up into a container's layer: its other
    names below show the lower file after a remount without ``auplink flush``, as after the migration."""
    from migrator.scan import survey
    from migrator.strategies import linker

    top = tree_of(tmp_path / "layer", [".wh..wh.plnk/", "d/", "other"])
    with open(os.path.join(top, "d", "copied"), "wb") as f:
        f.write(b"changed in the container")
    os.link(os.path.join(top, "d", "copied"), os.path.join(top, "d", "second-name"))
    ino = os.lstat(os.path.join(top, "d", "copied")).st_ino
    os.link(os.path.join(top, "d", "copied"), os.path.join(top, ".wh..wh.plnk", f"90210.{ino}"))
    expected = {("pseudo-link-not-flushed", "/d/copied"), ("pseudo-link-not-flushed", "/d/second-name")}
    walked = survey.scan_layer(top, True)
    assert {f for f in walked.findings if f[0] == "pseudo-link-not-flushed"} == expected
    os.makedirs(tmp_path / "tree")
    copied = linker.build_layer_tree(top, str(tmp_path / "tree"), "layer", copy=True)
    assert {f for f in copied.findings if f[0] == "pseudo-link-not-flushed"} == expected


def test_a_journaled_ancestor_is_read_as_aufs_had_it(tmp_path):
    """An in-place ancestor half converted by a cut: its journal puts back the aufs entries it moved into the
    stash (here ``a/.wh..wh..opq`` and ``.wh.c``)."""
    from migrator.formats import lowerview

    top = tree_of(tmp_path / "layer", ["a/b/", "a/b/.wh.x", "c/", "c/.wh.y"])
    below = tree_of(tmp_path / "below", ["a/"])
    deeper = lowerview.Lower(tree_of(tmp_path / "deeper", ["a/b/", "c/"]))
    assert lowerview.is_merged(top, [lowerview.Lower(below), deeper], b"a/b") is True
    assert lowerview.is_merged(top, [lowerview.Lower(below), deeper], b"c") is True
    journal = {b"/a": lowerview.JournaledDir(moved={b".wh..wh..opq"}), b"": lowerview.JournaledDir(moved={b".wh.c"})}
    assert lowerview.is_merged(top, [lowerview.Lower(below, journal), deeper], b"a/b") is False  # a/ was opaque
    assert lowerview.is_merged(top, [lowerview.Lower(below, journal), deeper], b"c") is False  # c was whited out


# -- strategies declare every step of the layer machine -----------------------------------------------------

def test_every_registered_strategy_defines_every_layer_step():
    for strategy in registry.every():
        assert undeclared_steps(strategy.task_class) == [], strategy.name


def test_a_task_without_its_steps_is_caught():
    class Half(LayerTask):
        def build_tree(self):
            pass

    assert undeclared_steps(Half) == ["convert_whiteouts_in_tree"]
    assert undeclared_steps(LayerTask) == list(LayerTask.STRATEGY_STEPS)
