"""A sample aufs engine root with every kind of entry the migration must carry over (for ``demo`` and tests).

It is written the way moby's aufs driver leaves a root: ``aufs/diff/<id>`` per layer with ``.wh.`` files,
``aufs/layers/<id>`` ancestor lists, ``image/aufs`` with a layer store, containers with ``"Driver": "aufs"``.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from typing import Dict, List, Tuple

import xattr

from migrator.formats import tarsplit

T0 = 1_600_000_000_000_000_000  # a fixed epoch in ns so trees are comparable across builds


def layer_id(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


# Entries: (relative path as bytes, kind, options).  Kinds: dir, file, link (symlink), hard (hardlink of
# options['to']), fifo, sock, chr, blk, wh (an aufs whiteout file .wh.<name>), opq (.wh..wh..opq).
Entry = Tuple[bytes, str, dict]

BASE: List[Entry] = [
    (b"bin", "dir", {}),
    (b"bin/busybox", "file", {"data": b"\x7fELF busybox" * 50, "mode": 0o755}),
    (b"bin/sh", "link", {"to": b"/bin/busybox"}),
    (b"bin/ls", "link", {"to": b"busybox"}),
    (b"bin/su", "file", {"data": b"su", "mode": 0o4755}),
    (b"bin/wall", "file", {"data": b"wall", "mode": 0o2755, "gid": 5}),
    (b"bin/hl1", "file", {"data": b"hardlinked content", "mode": 0o644}),
    (b"bin/hl2", "hard", {"to": b"bin/hl1"}),
    (b"etc", "dir", {}),
    (b"etc/passwd", "file", {"data": b"root:x:0:0:root:/root:/bin/sh\n"}),
    (b"etc/old.conf", "file", {"data": b"old"}),
    (b"etc/conf", "file", {"data": b"base conf"}),
    (b"etc/shadow-link", "link", {"to": b"/etc/shadow"}),
    (b"etc/escape", "link", {"to": b"../../../../../etc/passwd"}),
    (b"etc/dangling", "link", {"to": b"/nonexistent/target"}),
    (b"etc/empty", "file", {"data": b""}),
    (b"etc/attrs", "file", {"data": b"xattrs", "xattrs": {b"user.origin": b"base", b"user.empty": b""}}),
    (b"usr", "dir", {}),
    (b"usr/share", "dir", {}),
    (b"usr/share/doc", "dir", {}),
    (b"usr/share/doc/readme", "file", {"data": b"docs"}),
    (b"usr/share/doc/sub", "dir", {}),
    (b"usr/share/doc/sub/deep", "file", {"data": b"deep"}),
    (b"usr/lib", "dir", {"xattrs": {b"user.dirattr": b"1"}}),
    (b"usr/lib/libc.so", "file", {"data": b"libc" * 1000}),
    (b"var", "dir", {}),
    (b"var/mail", "dir", {"mode": 0o2775, "gid": 8}),
    (b"var/cache", "dir", {}),
    (b"var/cache/old1", "file", {"data": b"cache1"}),
    (b"var/cache/olddir", "dir", {}),
    (b"var/cache/olddir/x", "file", {"data": b"x"}),
    (b"opt", "dir", {}),
    (b"opt/a", "dir", {}),
    (b"opt/a/base-a", "file", {"data": b"a"}),
    (b"opt/a/b", "dir", {}),
    (b"opt/a/b/base-b", "file", {"data": b"b"}),
    (b"srv", "dir", {}),
    (b"srv/base-srv", "file", {"data": b"srv"}),
    (b"tmp", "dir", {"mode": 0o1777}),
    (b"home", "dir", {}),
    (b"home/user", "dir", {"uid": 1000, "gid": 1000, "mode": 0o750}),
    (b"home/user/.profile", "file", {"data": b"export A=1\n", "uid": 1000, "gid": 1000}),
    (b"dev", "dir", {}),
    (b"dev/null", "chr", {"rdev": (1, 3), "mode": 0o666}),
    (b"dev/loop9", "blk", {"rdev": (7, 9), "mode": 0o660, "gid": 6}),
    (b"run", "dir", {}),
    (b"run/fifo", "fifo", {"mode": 0o620}),
    (b"run/sock", "sock", {"mode": 0o755}),
    (b"names", "dir", {}),
    (b"names/caf\xe9-latin1", "file", {"data": b"not utf-8"}),
    (b"names/new\nline", "file", {"data": b"newline"}),
    (b"names/" + b"n" * 255, "file", {"data": b"long name"}),
    (b"names/sp ace", "file", {"data": b"space"}),
]

APP: List[Entry] = [  # an image layer on BASE: whiteouts, opaque dirs (nested), a recreated directory
    (b"etc", "dir", {}),
    (b"etc/old.conf", "wh", {}),
    (b"etc/new.conf", "file", {"data": b"new"}),
    (b"usr", "dir", {}),
    (b"usr/share", "dir", {}),
    (b"usr/share/doc", "wh", {}),
    (b"var", "dir", {}),
    (b"var/cache", "dir", {"mode": 0o700}),
    (b"var/cache/.wh..wh..opq", "opq", {}),
    (b"var/cache/fresh", "file", {"data": b"fresh"}),
    (b"opt", "dir", {}),
    (b"opt/a", "dir", {}),
    (b"opt/a/.wh..wh..opq", "opq", {}),
    (b"opt/a/app-a", "file", {"data": b"app a"}),
    (b"opt/a/b", "dir", {}),
    (b"opt/a/b/.wh..wh..opq", "opq", {}),
    (b"opt/a/b/app-b", "file", {"data": b"app b"}),
    (b"bin", "dir", {}),
    (b"bin/su", "file", {"data": b"su v2", "mode": 0o4755}),
    (b"names", "dir", {}),
    (b"names/caf\xe9-latin1", "wh", {}),
]

APP_TOP: List[Entry] = [  # a name and its whiteout in one layer, a directory whited out and re-made, and aufs
    #                        names below the root: one holding data (its tar names it: kept), an rmdir cut off
    (b"etc", "dir", {}),
    (b"etc/conf", "file", {"data": b"top conf"}),
    (b"etc/conf", "wh", {}),
    (b"srv", "dir", {"mode": 0o711}),
    (b"srv", "wh", {}),
    (b"srv/top-srv", "file", {"data": b"top srv"}),
    (b"etc/.wh..wh.strange", "file", {"data": b"aufs metadata"}),
    (b"etc/.wh..wh.gone.0a1b", "dir", {}),
    (b"etc/.wh..wh.gone.0a1b/old", "wh", {}),
]

OTHER: List[Entry] = [  # a second image sharing BASE
    (b"bin", "dir", {}),
    (b"bin/ls", "wh", {}),
    (b"bin/ls", "file", {"data": b"real ls", "mode": 0o755}),
    (b"tmp", "dir", {"mode": 0o1777}),
    (b"tmp/other", "file", {"data": b"other"}),
]

INIT: List[Entry] = [
    (b"etc", "dir", {}),
    (b"etc/hosts", "file", {"data": b""}),
    (b"etc/resolv.conf", "file", {"data": b""}),
    (b"dev", "dir", {}),
    (b"dev/console", "file", {"data": b""}),
    (b".dockerenv", "file", {"data": b""}),
]

CONTAINER: List[Entry] = [  # a writable layer as aufs leaves it after a power cut with the container running
    (b".wh..wh.aufs", "file", {"data": b"", "mode": 0o444}),
    (b".wh..wh.plnk", "dir", {"mode": 0o700}),
    (b".wh..wh.plnk/1234.5678", "file", {"data": b"pseudo-link"}),
    (b".wh..wh.orph", "dir", {"mode": 0o700}),
    (b"etc", "dir", {}),
    (b"etc/passwd", "wh", {"hardlink_base": True}),
    (b"etc/added", "file", {"data": b"added in container"}),
    (b"home", "dir", {}),
    (b"home/user", "wh", {"hardlink_base": True}),
    (b"tmp", "dir", {"mode": 0o1777}),
    (b"tmp/scratch", "file", {"data": b"scratch" * 100}),
    (b"tmp/h1", "file", {"data": b"linked in the container", "mode": 0o640, "uid": 1000}),
    (b"tmp/h2", "hard", {"to": b"tmp/h1"}),
]


def _mkentry(root: bytes, rel: bytes, kind: str, opts: dict) -> None:
    path = os.path.join(root, rel)
    parent, name = os.path.split(path)
    mode = opts.get("mode")
    if kind == "dir":
        os.makedirs(path, exist_ok=True)
        os.chmod(path, mode if mode is not None else 0o755)
    elif kind == "file":
        with open(path, "wb") as f:
            f.write(opts["data"])
        os.chmod(path, mode if mode is not None else 0o644)
    elif kind == "sparse":  # opts: size, and data: [(offset, bytes)] written into the holes
        with open(path, "wb") as f:
            for offset, data in opts.get("data", ()):
                f.seek(offset)
                f.write(data)
            f.truncate(opts["size"])
        os.chmod(path, mode if mode is not None else 0o644)
    elif kind == "link":
        os.symlink(opts["to"], path)
    elif kind == "hard":
        os.link(os.path.join(root, opts["to"]), path)
        return
    elif kind in ("fifo", "sock", "chr", "blk"):
        fmt = {"fifo": stat.S_IFIFO, "sock": stat.S_IFSOCK, "chr": stat.S_IFCHR, "blk": stat.S_IFBLK}[kind]
        rdev = os.makedev(*opts.get("rdev", (0, 0)))
        os.mknod(path, fmt | 0o600, rdev)
        os.chmod(path, mode if mode is not None else 0o644)
    elif kind in ("wh", "opq"):
        target = os.path.join(parent, b".wh." + name) if kind == "wh" else path
        base = os.path.join(root, b".wh..wh.aufs")
        if opts.get("hardlink_base") and os.path.exists(base):
            os.link(base, target)  # writable layers: every whiteout is a hardlink of .wh..wh.aufs
        else:
            with open(target, "wb"):
                pass
            os.chmod(target, 0o444)
        return
    os.lchown(path, opts.get("uid", 0), opts.get("gid", 0))
    if kind == "dir":
        os.chmod(path, mode if mode is not None else 0o755)  # chown may clear set-id bits: mode last
    elif kind in ("file", "sparse", "fifo", "sock", "chr", "blk"):
        os.chmod(path, mode if mode is not None else 0o644)
    for key, value in opts.get("xattrs", {}).items():
        xattr.set(path, key, value, nofollow=True)


def _set_times(root: bytes) -> None:
    """Give every entry a distinct, fixed mtime, directories last and bottom-up (as a tar extract does)."""
    paths = []
    for top, dirs, files in os.walk(root):
        for name in files + dirs:
            paths.append(os.path.join(top, name))
    paths.sort(key=lambda p: (-p.count(b"/"), p))
    for i, path in enumerate(paths):
        t = T0 + (hashlib.sha256(path[len(root):]).digest()[0] + i) * 1_000_000_007
        os.utime(path, ns=(t, t), follow_symlinks=False)
    os.utime(root, ns=(T0, T0))


def write_layer(diff: bytes, entries: List[Entry]) -> None:
    os.makedirs(diff, exist_ok=True)
    os.chmod(diff, 0o755)
    for rel, kind, opts in entries:
        _mkentry(diff, rel, kind, opts)
    _set_times(diff)


def _write(path: str, data: bytes, mode: int = 0o644) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def build_aufs_root(root: str, layers: Dict[str, Tuple[List[str], List[Entry]]],
                    images: Dict[str, List[str]], containers: Dict[str, Tuple[str, str]]) -> None:
    """Write an aufs root.  ``layers``: id -> (ancestors nearest first, entries); ``images``: name -> layer
    ids base first; ``containers``: container id -> (image name, config Driver value)."""
    os.makedirs(root, exist_ok=True)
    os.chmod(root, 0o710)
    for sub in ("aufs/diff", "aufs/layers", "aufs/mnt"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for lid, (ancestors, entries) in layers.items():
        write_layer(os.fsencode(os.path.join(root, "aufs", "diff", lid)), entries)
        os.makedirs(os.path.join(root, "aufs", "mnt", lid), exist_ok=True)
        _write(os.path.join(root, "aufs", "layers", lid), "".join(a + "\n" for a in ancestors).encode())
    layerdb = os.path.join(root, "image", "aufs", "layerdb")
    for sub in ("layerdb", "imagedb/content/sha256", "imagedb/metadata/sha256"):  # what an engine makes at start
        os.makedirs(os.path.join(root, "image", "aufs", sub), exist_ok=True)
    chain_of: Dict[str, str] = {}
    for name, chain in images.items():
        parent_chain = ""
        for lid in chain:
            tar_split = os.path.join(root, "image", "aufs", "layerdb", "tmp", f"{lid}.json.gz")
            os.makedirs(os.path.dirname(tar_split), exist_ok=True)
            diff_id, size = tarsplit.write(os.path.join(root, "aufs", "diff", lid), tar_split)
            chain_id = diff_id if not parent_chain else "sha256:" + hashlib.sha256(
                (parent_chain + " " + diff_id).encode()).hexdigest()
            d = os.path.join(layerdb, "sha256", chain_id.split(":")[1])
            _write(os.path.join(d, "cache-id"), lid.encode())
            _write(os.path.join(d, "diff"), diff_id.encode())
            _write(os.path.join(d, "size"), str(size).encode())
            os.replace(tar_split, os.path.join(d, "tar-split.json.gz"))
            if parent_chain:
                _write(os.path.join(d, "parent"), parent_chain.encode())
            parent_chain = chain_id
        chain_of[name] = parent_chain
        config = json.dumps({"rootfs": {"type": "layers"}, "name": name}).encode()
        _write(os.path.join(root, "image", "aufs", "imagedb", "content", "sha256",
                            hashlib.sha256(config).hexdigest()), config)
    _write(os.path.join(root, "image", "aufs", "repositories.json"),
           json.dumps({"Repositories": {n: {f"{n}:latest": chain_of[n]} for n in images}}).encode())
    for cid, (image, driver) in containers.items():
        m = os.path.join(layerdb, "mounts", cid)
        _write(os.path.join(m, "mount-id"), cid.encode())
        _write(os.path.join(m, "init-id"), f"{cid}-init".encode())
        _write(os.path.join(m, "parent"), chain_of[image].encode())
        config = ('{"StreamConfig":{},"State":{"Running":false,"Pid":0},"ID":"%s","Created":"2021-01-25T10:00:00Z",'
                  '"Image":"%s","Driver":"%s","Big":18446744073709551615,"Html":"<a&b>",'
                  '"MountPoints":{"/data":{"Driver":"local","Name":"vol"}}}') % (cid, image, driver)
        _write(os.path.join(root, "containers", cid, "config.v2.json"), config.encode(), 0o600)
        _write(os.path.join(root, "containers", cid, "hostconfig.json"), b'{"Binds":null}', 0o644)


def build_sample_root(root: str) -> None:
    """The demo's root: two images sharing a base, a container with its -init layer, and aufs debris."""
    base, app, top, other = (layer_id(n) for n in ("base", "app", "app-top", "other"))
    cid = layer_id("container")
    layers = {
        base: ([], BASE),
        app: ([base], APP),
        top: ([app, base], APP_TOP),
        other: ([base], OTHER),
        f"{cid}-init": ([top, app, base], INIT),
        cid: ([f"{cid}-init", top, app, base], CONTAINER),
    }
    build_aufs_root(root, layers, {"app": [base, app, top], "other": [base, other]}, {cid: ("app", "aufs")})
    removing = os.path.join(root, "aufs", "diff", layer_id("gone") + "-removing")
    os.makedirs(os.path.join(removing, "etc"))
    os.makedirs(os.path.join(root, "containers", layer_id("no-config")))
