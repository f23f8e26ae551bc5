"""Rules the migration applies, on plain files, as any user: what an aufs ``.wh.`` name is and what it becomes,
which aufs internals a layer's tar needs, the lower view followed by a walk against the one looked up, and the
snapshot's reading of a root (``tests/support/smallroot.py``).  The whiteout table's main cases and the merges
are in test_rootfacts.py; these are the edges around them.
"""

import os
import shutil

import pytest

from migrator.formats import aufs, lowerview, snapshot
from migrator.paths import Paths
from migrator.sample import layer_id as LID
from tests.support import realaufs
from tests.support.smallroot import SmallRoot, make_fifo, tree_of, write

BASE, MID, TOP, CID = LID("base"), LID("mid"), LID("top"), LID("container")

# -- what a name is to aufs ---------------------------------------------------------------------------------

KINDS = [
    ("file", None, None),
    (".wh", None, None),
    (".wh.x", aufs.WHITEOUT, "x"),
    (".wh..x", aufs.WHITEOUT, ".x"),  # a hidden file's whiteout
    (".wh..opq", aufs.WHITEOUT, ".opq"),  # not the opaque marker, which has two prefixes
    (".wh..wh..opq", aufs.OPAQUE, None),
    (".wh..wh.", aufs.INTERNAL, None),
    (".wh..wh.aufs", aufs.INTERNAL, None),
    (".wh..wh..opq.1a2b", aufs.INTERNAL, None),
    (".wh.", aufs.WHITEOUT, ""),  # whites out nothing: dropped (DROP_BAD)
    ("x.wh.y", None, None),
]


@pytest.mark.parametrize("name,kind,target", KINDS, ids=[k[0] for k in KINDS])
def test_what_a_name_is_to_aufs_in_str_and_bytes(name, kind, target):
    assert aufs.whiteout_kind(name) == kind
    assert aufs.whiteout_kind(os.fsencode(name)) == kind
    if kind == aufs.WHITEOUT:
        assert aufs.whiteout_target(name) == target
        assert aufs.whiteout_target(os.fsencode(name)) == os.fsencode(target)


EDGES = [  # (entries of one directory, merged, kept) -> (name, action, target) of each aufs entry, in order
    (({".wh..opq": False}, True, ()), [(".wh..opq", aufs.MAKE_WHITEOUT, ".opq")]),
    (({".wh..wh.": False}, True, ()), [(".wh..wh.", aufs.DROP_INTERNAL, None)]),
    (({".wh..x": False, ".x": True}, True, ()), [(".wh..x", aufs.OPAQUE_CHILD, ".x")]),
    (({".wh.x": False, "x": False}, False, ()), [(".wh.x", aufs.KEEP_ENTRY, "x")]),  # merged or not
    (({".wh..wh..opq": False}, False, ()), [(".wh..wh..opq", aufs.SET_OPAQUE, None)]),
    (({".wh..": False, ".wh...": False}, False, ()), [(".wh..", aufs.DROP_BAD, None), (".wh...", aufs.DROP_BAD, None)]),
    (({".wh..wh.x.0001": False, ".wh.y": False}, False, {".wh..wh.x.0001"}),
     [(".wh..wh.x.0001", aufs.KEEP_INTERNAL, None), (".wh.y", aufs.DROP_UNNEEDED, "y")]),
    (({".wh.b": False, "a": False, ".wh.a": False}, True, ()),  # in the directory's order, whatever it is
     [(".wh.b", aufs.MAKE_WHITEOUT, "b"), (".wh.a", aufs.KEEP_ENTRY, "a")]),
    (({".wh.x": False, ".wh..wh.x": False}, True, {".wh.x"}),  # only internals are ever kept
     [(".wh.x", aufs.MAKE_WHITEOUT, "x"), (".wh..wh.x", aufs.DROP_INTERNAL, None)]),
    (({".wh..wh.d": True, "d": True}, True, ()), [(".wh..wh.d", aufs.DROP_INTERNAL, None)]),
]


@pytest.mark.parametrize("given,expected", EDGES, ids=[repr(list(g[0])) for g, _x in EDGES])
def test_whiteout_action_edges(given, expected):
    entries, merged, kept = given
    got = aufs.whiteout_actions(entries, merged=merged, kept=set(kept))
    assert [(a.name, a.action, a.target) for a in got] == expected


def test_each_finding_names_the_entry_whose_view_it_is_about():
    entries = {"d": True, ".wh.d": False, ".wh.gone": False, ".wh.": False, ".wh..wh.plnk": True}
    got = {a.name: (a.finding, a.named) for a in aufs.whiteout_actions(entries, merged=False)}
    assert got == {".wh.d": ("whiteout-beside-entry", "d"), ".wh.gone": ("whiteout-hides-nothing", ".wh.gone"),
                   ".wh.": ("ignored-bad-whiteout", ".wh."), ".wh..wh.plnk": ("dropped-aufs-internal", ".wh..wh.plnk")}


def test_the_findings_where_the_view_differs_are_the_oracles():
    """The migrator's list of the findings that excuse a difference from aufs (``aufs.VIEW_DIFFERS``) is the one
    the real-aufs judge excuses (``realaufs.VIEW_DIFFERS``): one more on either side hides or invents a bug."""
    assert set(aufs.VIEW_DIFFERS) == realaufs.VIEW_DIFFERS
    assert len(aufs.VIEW_DIFFERS) == len(set(aufs.VIEW_DIFFERS))
    assert {lowerview.THROUGH_NON_DIRECTORY, lowerview.BELOW_OPAQUE} <= realaufs.VIEW_DIFFERS
    differing = {aufs.FINDING[a] for a in (aufs.OPAQUE_CHILD, aufs.KEEP_ENTRY, aufs.DROP_BAD, aufs.KEEP_INTERNAL)}
    assert differing <= realaufs.VIEW_DIFFERS
    # making a whiteout, setting opaque, dropping what hides nothing or aufs's own: aufs's view kept
    assert not {aufs.FINDING[a] for a in (aufs.MAKE_WHITEOUT, aufs.SET_OPAQUE, aufs.DROP_UNNEEDED,
                                          aufs.DROP_INTERNAL)} & realaufs.VIEW_DIFFERS


# -- which aufs internals hold data the layer's tar reads ----------------------------------------------------

def _data(path, data=b"x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


HOLDS = {
    "missing": (lambda p: None, False),
    "empty file": (lambda p: _data(p, b""), False),
    "file with data": (lambda p: _data(p), True),
    "symlink": (lambda p: os.symlink("/etc/passwd", p), False),
    "fifo": (make_fifo, False),
    "empty directory": (os.makedirs, False),
    "directory of empty files": (lambda p: (_data(os.path.join(p, "a"), b""), os.makedirs(os.path.join(p, "d"))),
                                 False),
    "directory with data deep below": (lambda p: _data(os.path.join(p, "a", "b", "c", "f")), True),
    "directory with a symlink to data": (lambda p: (os.makedirs(p), _data(os.path.join(os.path.dirname(p), "t")),
                                                    os.symlink("../t", os.path.join(p, "l"))), False),
    "directory with a fifo": (lambda p: (os.makedirs(p), make_fifo(os.path.join(p, "q"))), False),
}


@pytest.mark.parametrize("what", sorted(HOLDS))
def test_an_internal_is_kept_only_for_data(tmp_path, what):
    make, kept = HOLDS[what]
    layer = tmp_path / "layer"
    layer.mkdir()
    make(str(layer / ".wh..wh.x.0001"))
    assert aufs.kept_in(str(layer), ".wh..wh.x.0001") is kept
    assert aufs.kept_in(os.fsencode(str(layer)), b".wh..wh.x.0001") is kept


def test_removing_names():
    assert aufs.is_removing(TOP + "-removing") and not aufs.is_removing(TOP)
    assert aufs.removed_id(TOP + "-removing") == TOP
    assert not aufs.is_removing(TOP + "-init")


# -- the lower view: followed by a walk, or looked up -------------------------------------------------------

LAYER = ["a/", "a/b/", "a/b/c/", "x/", "x/y/", "o/", "o/.wh..wh..opq", "o/p/", "w/", ".wh.w", "w/v/", "n/",
         "n/m/", "deep/", "deep/er/", "deep/er/est/"]
ANCESTORS = [
    ["a/", "x", "o/", "o/p/", "w/", "w/v/", "n/", "n/.wh..wh..opq", "deep/", "deep/er"],
    ["a/", "a/b/", "x/", "x/y/", "o/", "o/p/", "w/", "n/", "n/m/", "n/.wh..wh..opq", "deep/", "deep/er/",
     "deep/er/est/"],
    ["a/", "a/b/", "a/b/c/", "x/", "x/y/"],
]


def _walk(top):
    """The layer's directories top-down, as the walks name them (b"" the root, b"/a", b"/a/b"), each with
    whether it is opaque and the names its whiteouts white out."""
    out = []
    pending = [b""]
    while pending:
        rel = pending.pop(0)
        names = os.listdir(os.fsencode(top) + rel)
        opaque = aufs.OPAQUE_MARKER.encode() in names
        whiteouts = {aufs.whiteout_target(n) for n in names if aufs.whiteout_kind(n) == aufs.WHITEOUT}
        out.append((rel, opaque, whiteouts))
        pending.extend(sorted(rel + b"/" + n for n in names
                              if os.path.isdir(os.fsencode(top) + rel + b"/" + n) and not aufs.whiteout_kind(n)))
    return out


def test_a_walk_follows_the_same_merges_as_each_lookup(tmp_path):
    """``Tracker`` (what the link step and the survey follow, directory by directory) and ``at`` (one path,
    from the root) agree on every directory: what overlayfs merges, and where aufs merged more."""
    top = tree_of(tmp_path / "layer", LAYER)
    lowers = [lowerview.Lower(tree_of(tmp_path / f"a{i}", paths)) for i, paths in enumerate(ANCESTORS)]
    tracker = lowerview.Tracker(top, lowers)
    followed, looked_up = {}, {}
    try:
        for rel, opaque, whiteouts in _walk(top):
            merge = tracker.enter(rel, opaque, whiteouts)
            followed[rel] = (len(merge.dirs), merge.differs)
            one = lowerview.at(top, lowers, rel)
            try:
                looked_up[rel] = (len(one.dirs), one.differs)
            finally:
                one.close()
    finally:
        tracker.close()
    assert followed == looked_up
    assert followed == {
        b"": (3, None), b"/a": (3, None), b"/a/b": (2, None), b"/a/b/c": (1, None),
        b"/x": (0, "aufs-merged-through-non-directory"), b"/x/y": (0, None),  # named once, at x
        b"/o": (0, None), b"/o/p": (0, None),  # opaque in the layer itself: nothing below counts
        b"/w": (0, None), b"/w/v": (0, None),  # whited out beside itself: its own finding names it
        b"/n": (1, "aufs-merged-below-opaque"), b"/n/m": (0, None),
        b"/deep": (2, None), b"/deep/er": (0, "aufs-merged-through-non-directory"), b"/deep/er/est": (0, None),
    }


def test_a_device_an_ancestors_journal_made_is_not_what_aufs_had(tmp_path):
    """An in-place ancestor cut off mid-conversion holds a whiteout device its journal made where aufs had
    ``.wh.<name>``: read as aufs had it, the name is absent there (and the moved ``.wh.<name>`` whites it out)."""
    top = tree_of(tmp_path / "layer", ["d/", "d/.wh.x"])
    near = tree_of(tmp_path / "near", ["d"])  # the device the journal made, standing in as a file
    deep = lowerview.Lower(tree_of(tmp_path / "deep", ["d/"]))
    assert lowerview.is_merged(top, [lowerview.Lower(near), deep], b"d") is False  # a non-directory stops it
    made = {b"": lowerview.JournaledDir(made={b"d"})}
    assert lowerview.is_merged(top, [lowerview.Lower(near, made), deep], b"d") is True
    whited = {b"": lowerview.JournaledDir(made={b"d"}, moved={b".wh.d"})}
    assert lowerview.is_merged(top, [lowerview.Lower(near, whited), deep], b"d") is False


def test_a_layer_without_ancestors_merges_nothing_and_a_missing_ancestor_shows_nothing(tmp_path):
    top = tree_of(tmp_path / "layer", ["a/", "a/.wh.x"])
    assert lowerview.is_merged(top, [], b"") is False
    assert lowerview.is_merged(top, [lowerview.Lower(str(tmp_path / "gone"))], b"a") is False
    assert lowerview.is_merged(top, [lowerview.Lower(str(tmp_path / "gone")),
                                     lowerview.Lower(tree_of(tmp_path / "a1", ["a/"]))], b"a") is True
    assert lowerview.is_merged(top, [lowerview.Lower(tree_of(tmp_path / "a2", ["a/"]))], b"nope") is False


# -- the snapshot's reading of a root -----------------------------------------------------------------------

def _read(root):
    return snapshot.read_root(Paths.for_root(root))


def _chain(tmp_path, **kw):
    return SmallRoot(str(tmp_path / "docker"), {BASE: [], MID: [BASE], TOP: [MID, BASE]}, **kw)


def test_a_snapshot_reads_layers_store_and_containers(tmp_path):
    r = _chain(tmp_path)
    r.container(CID, "aufs")
    r.container("c-overlay", "overlay2")
    r.container("c-empty", "")  # dockerd 20.10 reads an empty Driver as aufs
    snap = _read(r.root)
    assert snap.diff_state == "present" and snap.aufs_present and snap.image_aufs_present
    assert snap.present == {BASE, MID, TOP} and not snap.being_removed
    assert {lid: f.ancestors for lid, f in snap.layers.items()} == {BASE: (), MID: (BASE,), TOP: (MID, BASE)}
    assert snap.store.cache_ids == {BASE, MID, TOP} and snap.store.imagedb and snap.store.images == 1
    assert {cid: (c.driver, c.on_aufs) for cid, c in snap.containers.items()} == {
        CID: ("aufs", True), "c-overlay": ("overlay2", False), "c-empty": ("", True)}
    assert not snap.unreadable and snap.unreadable_refusal() is None and not snap.nothing_to_migrate()


def test_a_snapshot_tells_layers_being_removed_from_layers(tmp_path):
    r = _chain(tmp_path)
    os.rename(r.path("aufs", "diff", TOP), r.path("aufs", "diff", TOP + "-removing"))
    os.rename(r.path("aufs", "layers", MID), r.path("aufs", "layers", MID + "-removing"))
    snap = _read(r.root)
    assert snap.present == {BASE, MID} and snap.being_removed == {TOP}
    assert set(snap.layers) == {BASE, TOP}  # a layers file being removed is no layer's


def test_a_garbled_layers_file_is_read_as_such(tmp_path):
    r = _chain(tmp_path)
    write(r.path("aufs", "layers", TOP), b"../escape\n")
    snap = _read(r.root)
    assert snap.layers[TOP].ancestors is None and "escape" in snap.layers[TOP].problem
    assert snap.layers[MID].ancestors == (BASE,) and snap.layers[MID].problem == ""


@pytest.mark.parametrize("how,state", [("missing", "missing"), ("file", "not a directory"),
                                       ("symlink", "not a directory")])
def test_what_aufs_diff_is(tmp_path, how, state):
    r = _chain(tmp_path)
    shutil.rmtree(r.path("aufs", "diff"))
    if how == "file":
        write(r.path("aufs", "diff"), b"")
    elif how == "symlink":
        os.symlink(str(tmp_path), r.path("aufs", "diff"))
    snap = _read(r.root)
    assert snap.diff_state == state and not snap.diff and not snap.present


def test_nothing_to_migrate_only_where_nothing_names_aufs(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _read(str(empty)).nothing_to_migrate()
    done = SmallRoot(str(tmp_path / "done"), {}, images=False)  # cleaned up: image/aufs/ gone, containers moved
    shutil.rmtree(done.path("image", "aufs"))
    done.container(CID, "overlay2")
    assert _read(done.root).nothing_to_migrate()
    done.container("c2", "aufs")  # a container still on aufs, with its storage gone: not nothing
    assert not _read(done.root).nothing_to_migrate()
    only_store = SmallRoot(str(tmp_path / "store"), {}, images=False)  # image/aufs/ alone
    assert not _read(only_store.root).nothing_to_migrate()


def test_the_refusal_names_the_first_unreadable_file_and_counts_the_rest(tmp_path):
    r = _chain(tmp_path)
    r.container(CID, "aufs")
    for path in (r.path("aufs", "layers", TOP), r.path("containers", CID, "config.v2.json")):
        os.unlink(path)
        make_fifo(path)
    snap = _read(r.root)
    assert [p for p, _why in snap.unreadable] == [f"aufs/layers/{TOP}", f"containers/{CID}/config.v2.json"]
    line = snap.unreadable_refusal()
    assert line.startswith(f"aufs/layers/{TOP} is unreadable (") and "(and 1 more)" in line
    assert "nothing was changed" in line
    assert snap.containers[CID].problem and snap.containers[CID].driver is None
