"""The model of aufs (``tests/support/aufsview.py``) on plain trees, as any user: each rule of its docstring, one
case each, with what the model must show.  The model is the host suites' stand-in for the kernel, so a rule
broken here is a wrong oracle for every suite that uses it.  The cases marked "kernel" are the ones the real
aufs in the VM decided (tests/test_real_aufs.py's CASES): the model must go on showing them without the VM.
"""

import os

import pytest

from tests.support.aufsview import MAX_NAMELEN, aufs_view
from tests.support.manifest import describe


def _branches(tmp_path, layout):
    """``layout``: each branch's entries, top first.  A path ending in '/' is a directory, ``name -> target`` a
    symlink, anything else a file holding its branch and path (so an entry tells which branch it came from)."""
    dirs = []
    for i, entries in enumerate(layout):
        top = tmp_path / f"b{i}"
        top.mkdir()
        for entry in entries:
            if entry.endswith("/"):
                (top / entry).mkdir(parents=True, exist_ok=True)
            elif " -> " in entry:
                name, target = entry.split(" -> ")
                os.symlink(target, top / name)
            else:
                (top / entry).parent.mkdir(parents=True, exist_ok=True)
                (top / entry).write_bytes(f"{i}:{entry}".encode())
        dirs.append(str(top))
    return dirs


SCRATCH = []  # an image's chain is seen through a new, empty container layer on top

CASES = {  # name: (branches top first, reachable path -> the branch it shows from, unreachable path -> errno)
    "the topmost branch that has a name shows it": (
        [["f"], ["f", "g"]], {"f": 0, "g": 1}, {}),
    "a whiteout hides the name below its branch": (
        [[".wh.f"], ["f", "g"]], {"g": 1}, {}),
    "a whiteout hides nothing above its branch": (
        [["f"], [".wh.f"], ["f"]], {"f": 0}, {}),
    "directories of every branch merge": (
        [["d/", "d/a"], ["d/", "d/b"]], {"d": 0, "d/a": 0, "d/b": 1}, {}),
    "an opaque directory ends the merge": (
        [["d/", "d/.wh..wh..opq", "d/a"], ["d/", "d/b"]], {"d": 0, "d/a": 0}, {}),
    "an opaque marker at a branch root means nothing": (
        [[".wh..wh..opq", "a"], ["b"]], {"a": 0, "b": 1}, {}),
    "a non-directory ends the lookup": (
        [["f"], ["f/", "f/x"]], {"f": 0}, {}),
    "kernel: a directory merges past a file below it": (
        [SCRATCH, ["x/", "x/a"], ["x"], ["x/", "x/b"]], {"x": 1, "x/a": 1, "x/b": 3}, {}),
    "kernel: a directory merges past a symlink below it (usrmerge)": (
        [SCRATCH, ["bin/", "bin/new"], ["bin -> usr/bin", "usr/", "usr/bin/"], ["bin/", "bin/old"]],
        {"bin": 1, "bin/new": 1, "bin/old": 3, "usr": 2, "usr/bin": 2}, {}),
    "kernel: the merge ends at the lowest opaque directory it met": (
        [SCRATCH, ["x/", "x/.wh..wh..opq", "x/a"], ["x/", "x/m"], ["x/", "x/.wh..wh..opq", "x/n"], ["x/", "x/b"]],
        {"x": 1, "x/a": 1, "x/m": 2, "x/n": 3}, {}),
    "a whiteout beside its name in the first branch looked at: EIO": (
        [["f", ".wh.f"], ["f"]], {}, {"f": "EIO"}),
    "a whiteout beside its name in a lower branch hides both": (
        [SCRATCH, ["f", ".wh.f", "g"], ["f"]], {"g": 1}, {"f": "ENOENT"}),
    "kernel: a whiteout that is not a regular file: EIO": (
        [SCRATCH, ["gone/", "gone/init"], [".wh.gone/"], ["gone/", "gone/f", "kept"]], {"kept": 3},
        {"gone": "EIO"}),
    "kernel: an opaque marker that is not a regular file: EIO": (
        [SCRATCH, ["d/", "d/.wh..wh..opq/", "d/new"], ["d/", "d/old"]], {}, {"d": "EIO"}),
    "kernel: the whiteout prefix alone is listed and cannot be looked up": (
        [SCRATCH, [".wh.", "y"], ["z"]], {"y": 1, "z": 2}, {".wh.": "EPERM"}),
    "kernel: a name longer than aufs looks up is listed and cannot be": (
        [SCRATCH, ["a" * MAX_NAMELEN, "b" * (MAX_NAMELEN + 1), "c" * 255]], {"a" * MAX_NAMELEN: 1},
        {"b" * (MAX_NAMELEN + 1): "ENAMETOOLONG", "c" * 255: "ENAMETOOLONG"}),
    "a whiteout in a directory's lowest branch is listed beside its name, and hides it": (
        [["d/"], ["d/", "d/.wh.f", "d/f", "d/g"]], {"d": 0, "d/g": 1}, {"d/f": "ENOENT"}),
    "a whiteout of a directory hides all of it below": (
        [[".wh.d", "e"], ["d/", "d/old"]], {"e": 0}, {}),
    "a whiteout in a merged directory hides the name in the branches below": (
        [["d/", "d/.wh.x"], ["d/", "d/x/", "d/x/deep", "d/y"]], {"d": 0, "d/y": 1}, {}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_model_follows_its_rules(tmp_path, name):
    layout, reachable, unreachable = CASES[name]
    branches = _branches(tmp_path, layout)
    view = aufs_view(branches)
    assert view.entries.pop(b".") == describe(os.fsencode(branches[0]))  # the top branch's root
    shown = {os.fsdecode(path): entry for path, entry in view.entries.items()}
    assert sorted(shown) == sorted(reachable)
    for path, branch in reachable.items():
        assert shown[path] == describe(os.fsencode(os.path.join(branches[branch], path))), path
    assert {os.fsdecode(p): code for p, code in view.unreachable.items()} == unreachable


def test_the_model_and_the_migrator_agree_on_the_longest_name():
    """``AUFS_MAX_NAMELEN``: a name of 255 bytes less room for ``.wh..wh.<name>.<4 hex>``; the migrator's rule
    (``name-too-long-for-aufs``) and the model's must be the same number."""
    from migrator.formats import aufs

    assert MAX_NAMELEN == aufs.MAX_NAMELEN == 242


def test_names_of_one_inode_are_one_group_across_branches(tmp_path):
    """One inode shows one inode number (the xino table is per filesystem), whichever branches name it."""
    top, lower = _branches(tmp_path, [[], ["f", "other"]])
    os.link(os.path.join(lower, "f"), os.path.join(lower, "h"))
    os.link(os.path.join(lower, "f"), os.path.join(top, "g"))
    view = aufs_view([top, lower])
    assert view.groups == [[b"f", b"g", b"h"]]
    assert view.entries[b"g"] == view.entries[b"f"]


def test_a_directory_shows_its_topmost_branchs_metadata(tmp_path):
    top, lower = _branches(tmp_path, [["d/"], ["d/", "d/x"]])
    os.chmod(os.path.join(lower, "d"), 0o700)
    os.chmod(os.path.join(top, "d"), 0o751)
    view = aufs_view([top, lower])
    assert view.entries[b"d"][1] == 0o751
    assert b"d/x" in view.entries
