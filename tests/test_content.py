"""The content proof: ``verify --content`` (overlay2 side) and ``plan --content`` (aufs side) reassemble each image
layer's tar from its tar-split and the layer's files and check it against the layer's ``diff``; a damaged file
is named, with its layer.

The expected digests are the engine's own (the real balena root in ../shared/fixtures/, recorded by a real
balena-engine) or those ``migrator/tarsplit.py`` records when the sample builder writes a layer; an independent
reassembly in ``assemble`` below checks the latter.
"""

import base64
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest

from migrator import sample
from tests.conftest import cli, needs_root, run_args, unpack_fixture

pytestmark = needs_root

LID = sample.layer_id
BASE, TOP = LID("c-base"), LID("c-top")
FIXTURE_CACHE = "34999927091de7ae41baa85f0be576c4b70ff81bf30d6850bf84c16d5d8cb9f5"  # busybox's base layer


def verify(root, *extra):
    res = cli("verify", "--root", root, "--content", *extra)
    assert "Traceback" not in res.stderr, res.stderr
    return res


def plan(root, *extra):
    return cli("plan", "--root", root, "--engine-pidfile", "/nonexistent", "--content", *extra)


def status_of(res):
    lines = [line for line in res.stdout.splitlines() if line.startswith("layer ")]
    return {line.split()[1]: line.split("): ", 1)[1].split(":")[0].split(",")[0] for line in lines}


@pytest.fixture
def migrated_fixture(tmp_path, strategy):
    root = str(tmp_path / "balena")
    unpack_fixture(root)
    assert plan(root).returncode == 0
    cli(*run_args(root, strategy=strategy), check=0)
    return root


def test_real_root_checks_out_before_after_migration_and_after_cleanup(tmp_path, strategy):
    root = str(tmp_path / "balena")
    unpack_fixture(root)
    res = plan(root, "--json")
    doc = json.loads(res.stdout)
    assert res.returncode == 0 and doc["content"]["ok"] == 5 and doc["content"]["failed"] == 0, res.stdout
    assert {layer["status"] for layer in doc["content"]["layers"]} == {"ok"}
    cli(*run_args(root, strategy=strategy), check=0)
    res = verify(root)
    assert res.returncode == 0 and "content: 5 layer(s) ok, 0 failed, 0 unverifiable" in res.stdout, res.stdout
    assert set(status_of(res).values()) == {"ok"} and len(status_of(res)) == 5
    cli("cleanup", "--root", root, "--engine-pidfile", "/nonexistent", "-q", check=0)
    assert not os.path.exists(os.path.join(root, "aufs"))
    res = verify(root, "--json")
    doc = json.loads(res.stdout)
    assert res.returncode == 0 and doc["ok"] == 5 and doc["side"] == "overlay2"


def test_sample_root_checks_out(sample_root):
    res = plan(sample_root)
    assert res.returncode == 0 and "content:        4 layer(s) ok, 0 failed" in res.stdout, res.stdout
    cli(*run_args(sample_root), check=0)
    res = verify(sample_root, "--jobs", "1")
    assert res.returncode == 0 and "content: 4 layer(s) ok, 0 failed" in res.stdout, res.stdout


def _layer_file(root, *rel):
    return os.path.join(root, "overlay2", FIXTURE_CACHE, "diff", *rel)


def test_damaged_files_are_named_with_their_layer(migrated_fixture):
    root = migrated_fixture
    with open(_layer_file(root, "bin", "busybox"), "r+b") as f:  # a byte flipped (bin/[ is its name in the tar)
        f.seek(4096)
        byte = f.read(1)
        f.seek(4096)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.truncate(_layer_file(root, "etc", "group"), 10)
    os.unlink(_layer_file(root, "etc", "passwd"))
    res = verify(root)
    assert res.returncode == 1, res.stdout
    failed = [line for line in res.stdout.splitlines() if "FAILED" in line]
    assert len(failed) == 1 and FIXTURE_CACHE in failed[0] and "reassembled to sha256:" in failed[0]
    assert "  changed: bin/[ (" in res.stdout
    assert "  wrong-size: etc/group (10 bytes, recorded 306)" in res.stdout
    assert "  missing: etc/passwd (" in res.stdout
    assert "content: 4 layer(s) ok, 1 failed, 0 unverifiable" in res.stdout
    doc = json.loads(verify(root, "--json").stdout)
    bad = [layer for layer in doc["layers"] if layer["status"] == "failed"]
    assert [layer["cache_id"] for layer in bad] == [FIXTURE_CACHE]
    assert sorted((f["kind"], f["path"]) for f in bad[0]["files"]) == [
        ("changed", "bin/["), ("missing", "etc/passwd"), ("wrong-size", "etc/group")]


def test_a_grown_file_and_a_file_turned_into_a_symlink(migrated_fixture):
    root = migrated_fixture
    with open(_layer_file(root, "etc", "group"), "ab") as f:
        f.write(b"extra\n")
    os.unlink(_layer_file(root, "etc", "passwd"))
    os.symlink("/etc/passwd", _layer_file(root, "etc", "passwd"))  # never followed
    res = verify(root)
    assert res.returncode == 1
    assert "  wrong-size: etc/group (312 bytes, recorded 306)" in res.stdout, res.stdout
    assert "  missing: etc/passwd (" in res.stdout


def test_a_layer_without_tar_split_is_unverifiable_not_failed(migrated_fixture):
    root = migrated_fixture
    sha = os.path.join(root, "image", "overlay2", "layerdb", "sha256")
    chain = next(c for c in os.listdir(sha) if open(os.path.join(sha, c, "cache-id")).read() == FIXTURE_CACHE)
    os.unlink(os.path.join(sha, chain, "tar-split.json.gz"))
    res = verify(root)
    assert res.returncode == 0, res.stdout
    assert f"layer sha256:{chain} (cache-id {FIXTURE_CACHE}): unverifiable: no tar-split.json.gz" in res.stdout
    assert "content: 4 layer(s) ok, 0 failed, 1 unverifiable" in res.stdout


def test_plan_reports_a_layer_damaged_on_aufs_before_anything_is_touched(tmp_path):
    root = str(tmp_path / "balena")
    unpack_fixture(root)
    os.truncate(os.path.join(root, "aufs", "diff", FIXTURE_CACHE, "etc", "group"), 1)
    res = plan(root)
    assert res.returncode == 3 and "verdict:        no" in res.stdout
    assert f"(cache-id {FIXTURE_CACHE}) is damaged on aufs already" in res.stdout
    assert "re-pull the image that uses it" in res.stdout
    assert "wrong-size: etc/group" in res.stdout
    assert not os.path.exists(os.path.join(root, "overlay2"))


def _special_root(tmp_path):
    """A sparse file (holes and data), a non-UTF-8 name, a hardlink and whiteouts, in image layers."""
    root = str(tmp_path / "docker")
    base = [(b"srv", "dir", {}), (b"srv/sparse", "sparse", {"size": 96 << 20, "data": [(0, b"head"),
                                                                                        (40 << 20, b"middle" * 100)]}),
            (b"srv/caf\xe9-\xff", "file", {"data": b"latin-1 name" * 100}), (b"srv/a", "file", {"data": b"a" * 5000}),
            (b"srv/b", "hard", {"to": b"srv/a"}), (b"gone", "file", {"data": b"x"}), (b"dir", "dir", {}),
            (b"dir/old", "file", {"data": b"old"})]
    top = [(b"gone", "wh", {}), (b"dir", "dir", {}), (b"dir/.wh..wh..opq", "opq", {}),
           (b"dir/new", "file", {"data": b"new"})]
    sample.build_aufs_root(root, {BASE: ([], base), TOP: ([BASE], top)}, {"img": [BASE, TOP]}, {})
    return root


def assemble(tar_split, diff_dir):
    """An independent reassembly: the tar the engine would stream, as bytes (small layers only)."""
    out = io.BytesIO()
    with gzip.open(tar_split) as f:
        for line in f:
            entry = json.loads(line)
            if entry["type"] == 2:
                out.write(base64.b64decode(entry["payload"]))
            elif entry.get("size"):
                name = base64.b64decode(entry["name_raw"]) if entry.get("name_raw") else entry["name"].encode()
                with open(os.path.join(os.fsencode(diff_dir), name), "rb") as g:
                    out.write(g.read())
    return out.getvalue()


def test_sparse_files_non_utf8_names_hardlinks_and_whiteouts(tmp_path, strategy):
    root = _special_root(tmp_path)
    sha = os.path.join(root, "image", "aufs", "layerdb", "sha256")
    for chain in os.listdir(sha):
        lid = open(os.path.join(sha, chain, "cache-id")).read()
        data = assemble(os.path.join(sha, chain, "tar-split.json.gz"), os.path.join(root, "aufs", "diff", lid))
        assert "sha256:" + hashlib.sha256(data).hexdigest() == open(os.path.join(sha, chain, "diff")).read()
        names = tarfile.open(fileobj=io.BytesIO(data)).getnames()  # a real tar, as the engine streams it
        assert names
    assert plan(root).returncode == 0
    cli(*run_args(root, strategy=strategy), check=0)
    res = verify(root)
    assert res.returncode == 0 and "content: 2 layer(s) ok, 0 failed" in res.stdout, res.stdout
    sparse = os.path.join(root, "overlay2", BASE, "diff", "srv", "sparse")
    with open(sparse, "r+b") as f:  # data written into a hole
        f.seek(70 << 20)
        f.write(b"!")
    with open(os.path.join(os.fsencode(root), b"overlay2", BASE.encode(), b"diff", b"srv", b"caf\xe9-\xff"),
              "r+b") as f:
        f.write(b"L")
    res = verify(root)
    assert res.returncode == 1
    assert "  changed: srv/sparse (" in res.stdout
    assert "  changed: srv/caf\\xe9-\\xff (" in res.stdout, res.stdout


def test_a_file_larger_than_memory_is_streamed_with_memory_flat(tmp_path):
    """A 1 GiB layer file (written, not sparse) checks out while the checking process stays under 128 MiB."""
    root = str(tmp_path / "docker")
    sample.build_aufs_root(root, {BASE: ([], [(b"big", "dir", {})])}, {}, {})
    big = os.path.join(root, "aufs", "diff", BASE, "big", "blob")
    with open(big, "wb") as f:
        block = os.urandom(1 << 20)
        for _ in range(1024):
            f.write(block)
    sample.build_aufs_root(root, {}, {"img": [BASE]}, {})  # the layer store entry, with its tar-split
    # VmHWM: the peak RSS of this process image (ru_maxrss would carry the forking test process's over exec)
    code = ("import re, sys; from migrator.cli import main; rc = main(sys.argv[1:]); "
            "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1), file=sys.stderr); "
            "sys.exit(rc)")
    res = subprocess.run([sys.executable, "-c", code, "plan", "--root", root, "--engine-pidfile", "/nonexistent",
                          "--content", "--jobs", "1"], capture_output=True, text=True)
    assert res.returncode == 0 and "content:        1 layer(s) ok" in res.stdout, res.stdout + res.stderr
    peak_kib = int(res.stderr.strip().splitlines()[-1])
    assert peak_kib < 128 * 1024, f"peak RSS {peak_kib} KiB"


def test_verify_content_before_migration_is_refused_with_the_way_forward(sample_root):
    res = verify(sample_root)
    assert res.returncode == 3 and "nothing is migrated yet" in res.stderr and "plan --content" in res.stderr
