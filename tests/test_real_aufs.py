"""What the real aufs shows, decided by the kernel (tests/support/aufsvm.py), for each place where the model of
aufs and the kernel could part, and what the migration makes of it.

Each case is a small root; it is planned, migrated with each strategy on a copy, and then, in one request to
the guest, every chain of the root is mounted with the real aufs as moby mounts it and every migrated chain
with overlayfs.  For every case: the model (tests/support/aufsview.py) shows what the kernel shows, and the
migrated chains show what aufs showed except at the paths a finding names (``realaufs.VIEW_DIFFERS``).  Then
each case's own facts: what aufs showed there, what overlay2 shows, and the finding that names it (the same
in ``plan``, before anything is done).  docs/design.md, "Where the view differs from aufs", argues each.
"""

import json
import os
import shutil
import subprocess
import tempfile

import pytest

from migrator import sample
from tests.conftest import cli, needs_root
from tests.fuzz import rootgen
from tests.support import realaufs

pytestmark = needs_root

OPQ_IN_X = (b"x/.wh..wh..opq", "opq", {})


def _image(*layers):
    """A spec of image layers, each on the previous one (the last is the image)."""
    return {"layers": [{"parent": i - 1 if i else None, "entries": list(e)} for i, e in enumerate(layers)],
            "containers": []}


def _with_container(spec, rw, init=()):
    spec["containers"] = [{"image": len(spec["layers"]) - 1, "init": list(init), "rw": list(rw)}]
    return spec


def _f(name, data=b"x"):
    return (name, "file", {"data": data})


def _d(name, **opts):
    return (name, "dir", opts)


CID = sample.layer_id("fuzz-container-0")


def _layer(spec, index):
    return rootgen.layer_ids(spec)[index]


def _plink(root):
    """The container's layer as aufs leaves it after copying up a hardlinked lower file with no ``auplink
    flush``: the copy, and ``.wh..wh.plnk/<aufs inode>.<inode>`` a hardlink of it."""
    layer = os.path.join(root, "aufs", "diff", CID)
    os.makedirs(os.path.join(layer, ".wh..wh.plnk"), exist_ok=True)
    ino = os.lstat(os.path.join(layer, "etc", "shared")).st_ino
    os.link(os.path.join(layer, "etc", "shared"), os.path.join(layer, ".wh..wh.plnk", f"4242.{ino}"))


def _empty_layers_file(root):
    open(os.path.join(root, "aufs", "layers", CID), "wb").close()


def _writable_bases(root):
    """A second whiteout base, as aufs makes one after EMLINK (``reinit_br_wh``): whiteouts in two groups."""
    layer = os.path.join(root, "aufs", "diff", CID)
    os.rename(os.path.join(layer, ".wh..wh.aufs"), os.path.join(layer, ".wh..wh.orph", "old-base"))
    with open(os.path.join(layer, ".wh..wh.aufs"), "wb"):
        pass
    os.chmod(os.path.join(layer, ".wh..wh.aufs"), 0o444)
    os.unlink(os.path.join(layer, "etc", ".wh.b"))
    os.link(os.path.join(layer, ".wh..wh.aufs"), os.path.join(layer, "etc", ".wh.b"))


WRITABLE = [(b".wh..wh.aufs", "file", {"data": b"", "mode": 0o444}), _d(b".wh..wh.plnk", mode=0o700),
            _d(b".wh..wh.orph", mode=0o700)]

# name: (spec, what to do to the built root, the chain to look at, its expectations)
CASES = {
    "directory-through-file": (
        _image([_d(b"x"), _f(b"x/b")], [_f(b"x", b"a file")], [_d(b"x"), _f(b"x/a")]), None, 2,
        {"aufs": {b"x/a", b"x/b"}, "overlay": {b"x/a"}, "finding": ("aufs-merged-through-non-directory", 2, "/x")}),
    "usrmerge-bin-over-symlink": (
        _image([_d(b"bin"), _f(b"bin/old")], [(b"bin", "link", {"to": b"usr/bin"}), _d(b"usr"), _d(b"usr/bin")],
               [_d(b"bin"), _f(b"bin/new")]), None, 2,
        {"aufs": {b"bin/old", b"bin/new"}, "overlay": {b"bin/new"},
         "finding": ("aufs-merged-through-non-directory", 2, "/bin")}),
    "opaque-below-opaque": (
        _image([_d(b"x"), _f(b"x/b")], [_d(b"x"), OPQ_IN_X, _f(b"x/n")], [_d(b"x"), _f(b"x/m")],
               [_d(b"x"), OPQ_IN_X, _f(b"x/a")]), None, 3,
        {"aufs": {b"x/a", b"x/m", b"x/n"}, "overlay": {b"x/a"}, "finding": ("aufs-merged-below-opaque", 3, "/x")}),
    "copy-up-and-rmdir-cut-off": (
        _with_container(_image([_d(b"d"), _d(b"d/x"), _f(b"d/x/f"), _d(b"d/y")],
                               [_d(b"d"), _d(b"d/.wh..wh.x.1a2b"), _f(b"d/.wh..wh.x.1a2b/f", b"partial copy"),
                                _d(b"d/.wh..wh.y.0001"), (b"d/.wh..wh.y.0001/gone", "wh", {})]),
                        WRITABLE + [_d(b"e"), _f(b"e/.wh..wh.z.0002", b"partial")]), None, 1,
        {"aufs": {b"d/x/f"}, "overlay": {b"d/x/f", b"d/.wh..wh.x.1a2b", b"d/.wh..wh.x.1a2b/f"},
         "finding": ("aufs-internal-kept-for-tar-split", 1, "/d/.wh..wh.x.1a2b"),
         "dropped": [(1, "/d/.wh..wh.y.0001"), ("container", "/e/.wh..wh.z.0002")]}),
    "pseudo-link-not-flushed": (
        _with_container(_image([_d(b"etc"), _f(b"etc/shared", b"lower"), (b"etc/twin", "hard", {"to": b"etc/shared"})]),
                        WRITABLE + [_d(b"etc"), _f(b"etc/shared", b"changed in the container")]), _plink, "container",
        {"content": {b"etc/shared": b"changed in the container", b"etc/twin": b"lower"},
         "finding": ("pseudo-link-not-flushed", "container", "/etc/shared")}),
    "layers-file-emptied-by-a-power-cut": (
        _with_container(_image([_d(b"bin"), _f(b"bin/sh")]), WRITABLE + [_f(b"written")]), _empty_layers_file,
        "container",
        {"aufs": {b"written"}, "overlay": {b"bin", b"bin/sh", b"written"},
         "finding": ("layers-file-repaired", "container", "/")}),
    "whiteout-that-is-a-directory": (
        _with_container(_image([_d(b"gone"), _f(b"gone/f"), _f(b"kept")], [(b".wh.gone", "dir", {})]),
                        WRITABLE, init=[_d(b"gone"), _f(b"gone/init")]), None, "container",
        {"unreachable": {b"gone": "EIO"}, "overlay": {b"gone", b"gone/init", b"kept"},
         "finding": ("whiteout-not-a-regular-file", 1, "/gone")}),
    "whiteout-beside-its-entry": (
        _with_container(_image([_f(b"x", b"base"), _d(b"d"), _f(b"d/low")],
                               [_f(b"x", b"image"), (b"x", "wh", {}), _d(b"d"), (b"d", "wh", {}), _f(b"d/in")]),
                        WRITABLE + [_f(b"y", b"container"), (b"y", "wh", {"hardlink_base": True})]), None,
        "container",
        {"absent": {b"x", b"d"}, "overlay": {b"x", b"d", b"d/in", b"y"},
         "finding": ("whiteout-beside-entry", 1, "/x"), "also": [("whiteout-beside-entry", "container", "/y")]}),
    "names-longer-than-aufs-looks-up": (
        _image([_f(b"a" * 242), _f(b"b" * 243), _f(b"c" * 255), _d(b"e" * 250)]), None, 0,
        {"aufs": {b"a" * 242}, "unreachable": {b"b" * 243: "ENAMETOOLONG", b"c" * 255: "ENAMETOOLONG"},
         "overlay": {b"a" * 242, b"b" * 243, b"c" * 255, b"e" * 250},
         "finding": ("name-too-long-for-aufs", 0, "/" + "c" * 255)}),
    "opaque-marker-that-is-a-directory": (
        _image([_d(b"d"), _f(b"d/old")], [_d(b"d"), _d(b"d/.wh..wh..opq"), _f(b"d/new")]), None, 1,
        {"unreachable": {b"d": "EIO"}, "overlay": {b"d", b"d/new"},
         "finding": ("opaque-marker-not-a-regular-file", 1, "/d")}),
    "whiteout-prefix-alone": (
        _image([_f(b"z")], [_f(b".wh.", b""), _f(b"y")]), None, 1,
        {"unreachable": {b".wh.": "EPERM"}, "overlay": {b"y", b"z"},
         "finding": ("ignored-bad-whiteout", 1, "/.wh.")}),
    "writable-branch-bookkeeping": (
        _with_container(_image([_d(b"etc"), _f(b"etc/a"), _f(b"etc/b"), _f(b"etc/c")]),
                        WRITABLE + [_d(b"etc"), (b"etc/a", "wh", {"hardlink_base": True}),
                                    (b"etc/b", "wh", {"hardlink_base": True})],
                        init=WRITABLE + [_d(b"etc"), (b"etc/c", "wh", {"hardlink_base": True})]),
        _writable_bases, "container",
        {"aufs": set(), "overlay": set()}),
}


@pytest.fixture(scope="module")
def judged(aufs_guest):
    """Every case built, planned, migrated by both strategies, and shown by the guest's kernel (one request)."""
    base = tempfile.mkdtemp(prefix="a2o-realaufs-", dir="/var/tmp")
    trees, specs, facts = {}, {}, {}
    try:
        for name, (spec, mutate, _look, _expect) in CASES.items():
            pre = os.path.join(base, name, "pre")
            rootgen.build(spec, pre)
            if mutate:
                mutate(pre)
            chains = realaufs.chains_of(pre)
            plan = json.loads(cli("plan", "--root", pre, "--engine-pidfile", "/nonexistent", "--json").stdout)
            facts[name] = {"chains": chains, "models": realaufs.model_views(pre, chains), "plan": plan,
                           "findings": {}, "roots": {}}
            trees[f"{name}/pre"] = pre
            specs.update({f"{name} {k}": v for k, v in realaufs.aufs_specs(chains, f"{name}/pre").items()})
            for strategy in ("hardlink", "inplace"):
                root = os.path.join(base, name, strategy)
                subprocess.run(["cp", "-a", pre, root], check=True)
                if mutate is _plink:  # the pseudo-link names an inode: a copy has others
                    shutil.rmtree(root)
                    rootgen.build(spec, root)
                    mutate(root)
                cli("run", "--root", root, "--engine-pidfile", "/nonexistent", "-q", "--strategy", strategy,
                    check=0)
                facts[name]["findings"][strategy] = realaufs.findings_of(root)
                facts[name]["roots"][strategy] = root
                trees[f"{name}/{strategy}"] = root
                specs.update({f"{name} {strategy} {k}": v for k, v in realaufs.overlay_specs(
                    os.path.join(root, "overlay2"), chains, f"{name}/{strategy}").items()})
        views = realaufs.Asked(aufs_guest, "cases.img", trees, specs).views()
        for name, fact in facts.items():
            fact["kernel"] = {k[len(name) + 1:]: v for k, v in views.items() if k.startswith(name + " ")}
        yield facts
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _lid(name, look):
    spec = CASES[name][0]
    if look == "container":
        return CID
    return _layer(spec, look)


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_model_shows_what_the_kernel_shows(judged, name):
    fact = judged[name]
    kernel = {f"aufs {lid}": fact["kernel"][f"aufs {lid}"] for lid in fact["chains"]}
    got = realaufs.judge_root(dict(kernel, **{f"overlay {lid}": ("mount-error", "not asked") for lid in
                                              fact["chains"]}), fact["chains"], fact["models"], [])
    assert not got.model, realaufs.describe_differences(got.model)


@pytest.mark.parametrize("strategy", ("hardlink", "inplace"))
@pytest.mark.parametrize("name", sorted(CASES))
def test_the_migrated_chains_show_what_aufs_showed_or_say_why_not(judged, name, strategy):
    fact = judged[name]
    views = {f"aufs {lid}": fact["kernel"][f"aufs {lid}"] for lid in fact["chains"]}
    views.update({f"overlay {lid}": fact["kernel"][f"{strategy} overlay {lid}"] for lid in fact["chains"]})
    got = realaufs.judge_root(views, fact["chains"], fact["models"], fact["findings"][strategy])
    assert not got.migration, realaufs.describe_differences(got.migration)


def _names(view):
    return {p for p, e in view[0].items() if p != b"." and e[0] != "error"}


def _where(name, layer):
    return CID if layer == "container" else _layer(CASES[name][0], layer)


@pytest.mark.parametrize("strategy", ("hardlink", "inplace"))
@pytest.mark.parametrize("name", sorted(CASES))
def test_what_aufs_showed_and_what_the_migration_made_of_it(judged, name, strategy):
    spec, _mutate, look, expect = CASES[name]
    fact = judged[name]
    lid = _lid(name, look)
    aufs, overlay = fact["kernel"][f"aufs {lid}"], fact["kernel"][f"{strategy} overlay {lid}"]
    if "aufs" in expect:
        assert _names(aufs) - {b".wh..wh.aufs"} >= expect["aufs"] and not (
            _names(aufs) & (expect.get("overlay", set()) - expect["aufs"])), sorted(_names(aufs))
    for path, code in expect.get("unreachable", {}).items():
        assert aufs[0].get(path) in (("error", code), None), (path, aufs[0].get(path))
        assert aufs[0].get(path) is not None or code == "EIO", path  # aufs lists what it cannot open
    for path in expect.get("absent", ()):
        assert aufs[0].get(path, ("error", "ENOENT"))[0] == "error", path
    if "overlay" in expect:
        got = _names(overlay)
        assert expect["overlay"] <= got, sorted(got)
        extra = got - expect["overlay"] - _names(aufs)
        assert not extra, sorted(extra)
    for path, data in expect.get("content", {}).items():
        for view in (aufs, overlay):
            assert view[0][path][5] == (len(data), _digest(data)), path
    findings = fact["findings"][strategy]
    wanted = [expect["finding"]] + expect.get("also", []) if "finding" in expect else expect.get("also", [])
    for kind, layer, path in wanted:
        assert (kind, _where(name, layer), path) in findings, findings
        planned = [(f["kind"], f.get("layer"), f["detail"]) for f in fact["plan"]["findings"]]
        assert (kind, _where(name, layer), path) in planned, planned  # named before anything is done
    for layer, path in expect.get("dropped", ()):
        assert ("dropped-aufs-internal", _where(name, layer), path) in findings, findings


def _digest(data):
    import hashlib

    stripped = data.rstrip(b"\0")
    return hashlib.sha256(b"0:" + stripped).hexdigest() if stripped else hashlib.sha256().hexdigest()


def test_each_whiteout_of_a_writable_branch_is_a_device_of_its_own(judged):
    """aufs hardlinks every whiteout of a writable branch to ``.wh..wh.aufs`` (a new base after EMLINK):
    overlay2 gets one 0/0 device per whiteout, and none of aufs's bookkeeping."""
    fact = judged["writable-branch-bookkeeping"]
    for strategy in ("hardlink", "inplace"):
        dropped = {(lid, d) for k, lid, d in fact["findings"][strategy] if k == "dropped-aufs-internal"}
        for lid in (CID, CID + "-init"):
            assert {(lid, "/.wh..wh.aufs"), (lid, "/.wh..wh.plnk"), (lid, "/.wh..wh.orph")} <= dropped
        tree = os.path.join(fact["roots"][strategy], "overlay2")
        made = [os.lstat(os.path.join(tree, lid, "diff", "etc", n)) for lid, n in
                ((CID, "a"), (CID, "b"), (CID + "-init", "c"))]
        assert all(st.st_rdev == 0 and st.st_nlink == 1 and (st.st_mode & 0o170000) == 0o020000 for st in made)
        assert len({st.st_ino for st in made}) == 3
        assert not [n for lid in (CID, CID + "-init") for n in os.listdir(os.path.join(tree, lid, "diff"))
                    if n.startswith(".wh.")]
