"""Pure functions, no root needed."""

import os

import pytest

from migrator.formats import aufs, containers, linkid
from migrator.formats import overlay2 as overlay


def test_driver_is_changed_and_nothing_else():
    raw = (b'{"ID":"x", "Driver" : "aufs","Big":18446744073709551615,"Html":"<a&b>\\u00e9",'
           b'"MountPoints":{"/d":{"Driver":"aufs"}},"Name":"caf\xc3\xa9"}\n')
    new = containers.with_driver(raw, "overlay2")
    assert new == raw.replace(b'"Driver" : "aufs"', b'"Driver" : "overlay2"')


def test_last_driver_key_wins_like_go():
    raw = b'{"Driver":"x","Driver":"aufs"}'
    assert containers.locate_driver(raw.decode())[0] == "aufs"
    assert containers.with_driver(raw, "overlay2") == b'{"Driver":"x","Driver":"overlay2"}'


@pytest.mark.parametrize("bad", [b"", b"[]", b'{"Driver":1}', b'{"A":1}', b'{"Driver":"aufs"', b'{"Driver":"a"} x'])
def test_bad_configs_are_rejected(bad):
    with pytest.raises(ValueError):
        containers.locate_driver(bad.decode())


def test_layers_file_parsing():
    assert aufs.parse_layers_file(b"") == []
    assert aufs.parse_layers_file(b"a1\nb2\n") == ["a1", "b2"]
    assert aufs.parse_layers_file(b"a1\nb2") == ["a1", "b2"]
    for bad in (b"a1\n\nb2\n", b"../x\n", b"a b\n"):
        with pytest.raises(ValueError):
            aufs.parse_layers_file(bad)
    with pytest.raises(UnicodeDecodeError):
        aufs.parse_layers_file(b"\xff\n")


def test_link_ids_look_like_dockerds():
    ids = linkid.new_link_ids(500)
    assert len(set(ids)) == 500
    assert all(linkid.LINK_ID_RE.match(i) for i in ids)


def test_lower_value_has_no_newline():
    assert overlay.lower_value(["A" * 26, "B" * 26]) == b"l/" + b"A" * 26 + b":l/" + b"B" * 26


def test_layer_ids():
    assert aufs.valid_id("a" * 64) and aufs.valid_id("a" * 64 + "-init")
    for bad in ("", ".", "..", "a/b", "a b", "a\nb", "caf\udce9", "-x"):
        assert not aufs.valid_id(bad)


def test_status_reader_reads_what_the_store_wrote(tmp_path):
    """reader.py uses plain SQL for speed: this keeps its column names honest against the ORM schema."""
    from migrations_state import reader
    from migrations_state.schema import ContainerRecord, FindingRecord, LayerRecord
    from migrations_state.store import LayerStep, Store

    db = str(tmp_path / "state.db")
    layers = [LayerRecord(id=f"l{i}", seq=i, parent=None, ancestors="", link_id=f"{'A' * 25}{i}", has_child=False,
                          state="discovered") for i in range(3)]
    store = Store.create(db, "/root", "hardlink", layers, [ContainerRecord(id="c", state="pending")],
                         [FindingRecord(layer_id="l1", kind="k", detail="d")])
    store.set_layer_states([LayerStep("l1", "linked", entries=7)])
    store.close()
    doc = reader.read_status(db)
    assert doc["run"]["phase"] == "converting" and doc["run"]["strategy"] == "hardlink"
    assert doc["layers"] == [("l0", "discovered", 0, None), ("l1", "linked", 7, None), ("l2", "discovered", 0, None)]
    assert doc["containers"] == [("c", "pending", None)]
    assert doc["findings"] == [("k", "l1", "d")]


@pytest.mark.parametrize("cold", [False, True])
def test_early_walk_finds_what_the_plan_walk_finds(tmp_path, monkeypatch, cold):
    """The in-place run's early walk (any number of walkers) gives every layer exactly the plan's own walk."""
    from migrator.scan import prescan, survey

    diff = tmp_path / "aufs" / "diff"
    for i in range(7):
        layer = diff / f"layer{i}"
        for d in range(i + 1):
            sub = layer / f"d{d}" / "e"
            sub.mkdir(parents=True)
            (sub / "f").write_text("x")
            (layer / f"d{d}" / ".wh.gone").write_text("")
        if i % 3 == 0:
            (layer / "d0" / ".wh..wh..opq").write_text("")
        (layer / b"name-\xff".decode("utf-8", "surrogateescape")).symlink_to("/nonexistent")
    monkeypatch.setattr(prescan, "_cold", lambda _diff, _names: cold)
    early = prescan.start(str(diff), 2).take()
    assert sorted(early) == [f"layer{i}" for i in range(7)]
    for name, found in early.items():
        walked = survey.scan_layer(str(diff / name))
        assert (found.entries, found.directories, found.whiteouts, found.opaque, sorted(found.whiteout_dirs),
                sorted(found.converting)) == (walked.entries, walked.directories, walked.whiteouts, walked.opaque,
                                              sorted(walked.whiteout_dirs), sorted(walked.converting))
        # base layers: nothing below, so the whiteouts hide nothing and no device is made (counted as such)
        assert found.whiteouts == 0
        assert sum(kind == "whiteout-hides-nothing" for kind, _ in found.converting) == int(name[-1]) + 1


@pytest.mark.parametrize("budget", [1, 5, 17])
def test_a_layer_linked_in_parts_is_the_layer_linked_whole(tmp_path, budget):
    """The link step cut below its root into parts (several workers on one big layer) builds the same tree,
    times included, and finds the same entries, whiteout directories and findings as one walk of the layer."""
    from migrator.formats import overlay2
    from migrator.strategies import linker
    from tests.support.manifest import manifest

    src = tmp_path / "aufs" / "diff" / "big"
    for top in ("usr", "etc", "var"):
        for sub in ("a", "b", "c\xff".encode().decode("utf-8", "surrogateescape")):
            leaf = src / top / sub / "deep" / "deeper"
            leaf.mkdir(parents=True)
            (leaf / "f").write_text(top + sub)
            (src / top / sub / "g").write_text("g")
        (src / top / ".wh.gone").write_text("")
        (src / top / "a" / ".wh..wh..opq").write_text("")
    (src / "usr" / "b" / "deep" / ".wh.x").write_text("")
    (src / "usr" / ".wh..wh.plnk").mkdir()
    (src / "top-file").write_text("t")
    for d in sorted(src.rglob("*"), key=lambda p: -len(p.parts)):
        os.utime(d, ns=(1_000_000_000, 2_000_000_000 + len(str(d))), follow_symlinks=False)
    built = {}
    for how in ("whole", "parts"):
        tree_root = str(tmp_path / how)
        os.makedirs(os.path.join(tree_root, "l"))
        if how == "whole":
            result = linker.build_layer_tree(str(src), tree_root, "big")
        else:
            result, parts = linker.start_layer(str(src), tree_root, "big", budget=budget)
            assert parts
            found = []
            while parts:  # as the workers do: each part within the budget, what it leaves goes out again
                part_result, more = linker.link_part(str(src), tree_root, "big", parts.pop(), budget=budget)
                found.append(part_result)
                parts.extend(more)
            result = linker.merge(result, found)
        tree = manifest(overlay2.diff_dir(tree_root, "big"))
        for rel in result.whiteout_dirs:  # their times are the whiteout step's to set
            key = rel.lstrip(b"/") or b"."
            tree[key] = tree[key][:4] + (None,) + tree[key][5:]
        built[how] = (result.entries, sorted(result.whiteout_dirs), sorted(result.findings), tree)
    assert built["parts"] == built["whole"]
    assert built["whole"][1] == [b"/etc", b"/etc/a", b"/usr", b"/usr/a", b"/usr/b/deep", b"/var", b"/var/a"]


def test_big_layers_shared_out_to_workers_in_pieces_build_what_one_walk_builds(tmp_path, monkeypatch):
    """The link wave's share-out (``hardlink.share_out``, 2 workers, pieces of 3 entries): every layer, cut into
    pieces that come back and go out again, is the tree one walk of it builds, with the same result."""
    import types

    from migrator import procs
    from migrator.formats import overlay2
    from migrator.paths import Paths
    from migrator.strategies import hardlink, linker
    from tests.support.manifest import manifest

    monkeypatch.setattr(hardlink, "PART_ENTRIES", 3)
    root = tmp_path / "docker"
    for n, lid in enumerate(("one", "two", "three")):
        for d in range(n + 2):
            leaf = root / "aufs" / "diff" / lid / f"d{d}" / "e" / "f"
            leaf.mkdir(parents=True)
            (leaf / "x").write_text(lid)
            (leaf.parent / ".wh.gone").write_text("")
    paths = Paths.for_root(str(root))
    os.makedirs(os.path.join(paths.temp_tree, "l"))
    strategy = hardlink.HardlinkStrategy()
    conv = types.SimpleNamespace(paths=paths)
    tasks = [strategy.task(types.SimpleNamespace(id=lid, writable=False, ancestor_ids=[], state="discovered"), conv, [])
             for lid in ("one", "two", "three")]
    with procs.pool(2) as pool:
        outcomes = hardlink.share_out(pool, 2, tasks)
    whole_root = str(tmp_path / "whole")
    os.makedirs(os.path.join(whole_root, "l"))
    for task in tasks:
        ok, shared = outcomes[task]
        assert ok, shared
        whole = linker.build_layer_tree(task.src, whole_root, task.id)
        assert (shared.entries, sorted(shared.whiteout_dirs), sorted(shared.findings)) == \
               (whole.entries, sorted(whole.whiteout_dirs), sorted(whole.findings))
        got, want = (manifest(overlay2.diff_dir(t, task.id)) for t in (paths.temp_tree, whole_root))
        for rel in whole.whiteout_dirs:  # their times are the whiteout step's to set
            key = rel.lstrip(b"/") or b"."
            got[key], want[key] = got[key][:4] + got[key][5:], want[key][:4] + want[key][5:]
        assert got == want


def test_an_unknown_option_gets_the_commands_usage_and_demo_has_a_description():
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "migrator", "run", "--bogus"], capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.startswith("usage: aufs2overlay run ") and res.stderr.rstrip().endswith(
        "aufs2overlay run: error: unrecognized arguments: --bogus"), res.stderr
    res = subprocess.run([sys.executable, "-m", "migrator", "demo", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "Build a sample aufs root" in res.stdout


def test_plan_text_names_a_probe_that_did_not_run_and_says_content_once():
    from migrator.checks import plan, probe

    result = plan.Plan(root="/r", strategy="hardlink")
    result.probe = probe.ProbeResult(problems=["the overlay probe cannot run in /r (Read-only file system)"])
    result.problems = list(result.probe.problems)
    result.content_lines = ["content: 3 layer(s) ok, 0 failed, 0 unverifiable; 1.0 MiB in 0.10s (10 MiB/s)"]
    text = plan.render(result)
    assert "overlay probe:  did not run" in text and "d_type no" not in text
    assert "content:        3 layer(s) ok" in text and "content: content:" not in text
    result.probe = probe.ProbeResult(ran=True, d_type=True, trusted_xattrs=True, whiteout_devices=True,
                                     overlay_mount=True)
    assert "overlay probe:  d_type yes, trusted.* xattrs yes, whiteout devices yes, mount yes" in plan.render(result)


def test_a_layer_proof_holds_until_a_directory_changes(tmp_path):
    """``scan/proof.py``: every kind of change to a directory breaks the proof, a change to a file's content does
    not (the staged file is the same inode), and a directory changed too recently is not trusted."""
    import time

    from migrator.scan import proof

    layer = tmp_path / "layer"
    for d in ("a/b", "a/c/d", "e"):
        (layer / d).mkdir(parents=True)
    (layer / "a" / "f").write_bytes(b"one")
    os.symlink("a", layer / "s")
    assert proof.take(str(layer)) is None  # just made: racily clean
    later = time.time_ns() + 10 * proof.RACY_NS
    taken = proof.take(str(layer), now_ns=later)
    assert taken.dirs.split(proof.SEP) == [b"", b"a", b"a/b", b"a/c", b"a/c/d", b"e"]
    assert proof.holds(str(layer), taken) is None
    (layer / "a" / "f").write_bytes(b"two")  # content in place: the staged hardlink shows it too
    assert proof.holds(str(layer), taken) is None
    changes = [lambda: (layer / "a" / "c" / "new").write_bytes(b""), lambda: os.chmod(layer / "e", 0o700),
               lambda: os.rename(layer / "a" / "b", layer / "a" / "b2"),
               lambda: (os.rmdir(layer / "e"), os.symlink("a", layer / "e"))]
    for change in changes:
        again = proof.take(str(layer), now_ns=later)
        change()
        assert proof.holds(str(layer), again) is not None
    assert "not there" in proof.holds(str(tmp_path / "gone"), taken)
    assert proof.holds(str(layer), proof.Proof(b"x\0y", "0")) == "its proof is malformed"
