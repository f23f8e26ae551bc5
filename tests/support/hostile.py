"""Hostile and broken aufs roots, one builder per case (``c_…``), and the checks some cases add (``check_…``):
layer data that came from images is untrusted, and roots are damaged in every way seen in the field."""

import os
import stat

import xattr

from migrator import sample

LID = sample.layer_id
BASE, MID, TOP, CID = LID("h-base"), LID("h-mid"), LID("h-top"), LID("h-container")


def base_root(tmp_path, base_entries=(), top_entries=(), container_entries=()):
    """A small root: BASE <- MID <- TOP (an image), and a container on it with its -init layer."""
    outside = str(tmp_path / "outside")
    root = str(tmp_path / "docker")
    layers = {
        BASE: ([], [(b"etc", "dir", {}), (b"etc/passwd", "file", {"data": b"root"})] + list(base_entries)),
        MID: ([BASE], [(b"etc", "dir", {}), (b"etc/mid", "file", {"data": b"mid"})]),
        TOP: ([MID, BASE], [(b"srv", "dir", {})] + list(top_entries)),
        f"{CID}-init": ([TOP, MID, BASE], [(b"etc", "dir", {}), (b"etc/hosts", "file", {"data": b""})]),
        CID: ([f"{CID}-init", TOP, MID, BASE], [(b"tmp", "dir", {})] + list(container_entries)),
    }
    sample.build_aufs_root(root, layers, {"img": [BASE, MID, TOP]}, {CID: ("img", "aufs")})
    return root, outside


def make_outside(outside):
    os.makedirs(os.path.join(outside, "dir"))
    with open(os.path.join(outside, "secret"), "w") as f:
        f.write("host file")
    with open(os.path.join(outside, "dir", "f"), "w") as f:
        f.write("host dir file")


def diff(root, lid, *parts):
    return os.path.join(root, "aufs", "diff", lid, *parts)


# Each case: (name, build(tmp_path) -> (root, outside), expected) with expected either
# ("refused", words) or ("migrated", finding kinds that must be reported, extra check or None).

def c_parent_cycle(tmp_path):
    root, outside = base_root(tmp_path)
    with open(os.path.join(root, "aufs", "layers", BASE), "w") as f:
        f.write(TOP + "\n")
    return root, outside


def c_missing_parent(tmp_path):
    root, outside = base_root(tmp_path)
    os.rename(diff(root, MID), os.path.join(root, "aufs", "diff", MID + "-removing"))
    return root, outside


def c_store_layer_without_layers_file(tmp_path):
    root, outside = base_root(tmp_path)
    os.unlink(os.path.join(root, "aufs", "layers", TOP))
    return root, outside


def c_garbled_layers_file(tmp_path):
    root, outside = base_root(tmp_path)
    with open(os.path.join(root, "aufs", "layers", TOP), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
    return root, outside


def c_blank_line_in_layers_file(tmp_path):
    root, outside = base_root(tmp_path)
    with open(os.path.join(root, "aufs", "layers", TOP), "w") as f:
        f.write(f"{MID}\n\n{BASE}\n")
    return root, outside


def c_layers_disagree(tmp_path):
    root, outside = base_root(tmp_path)
    with open(os.path.join(root, "aufs", "layers", TOP), "w") as f:
        f.write(f"{MID}\n")  # MID's own file says BASE is below it
    return root, outside


def c_chain_too_deep(tmp_path):
    root = str(tmp_path / "docker")
    ids = [LID(f"deep{i}") for i in range(131)]
    sample.build_aufs_root(root, {lid: (list(reversed(ids[:i])), []) for i, lid in enumerate(ids)}, {}, {})
    return root, str(tmp_path / "outside")


def c_layer_dir_symlink_out_of_root(tmp_path):
    root, outside = base_root(tmp_path)
    make_outside(outside)
    os.symlink(outside, os.path.join(root, "aufs", "diff", LID("evil")))
    with open(os.path.join(root, "aufs", "layers", LID("evil")), "w") as f:
        f.write("")
    return root, outside


def c_diff_dir_symlink(tmp_path):
    root, outside = base_root(tmp_path)
    make_outside(outside)
    real = os.path.join(root, "aufs", "diff")
    os.rename(real, os.path.join(outside, "diff"))
    os.symlink(os.path.join(outside, "diff"), real)
    return root, outside


def c_layers_file_symlink(tmp_path):
    root, outside = base_root(tmp_path)
    make_outside(outside)
    path = os.path.join(root, "aufs", "layers", TOP)
    os.unlink(path)
    os.symlink(os.path.join(outside, "secret"), path)
    return root, outside


def c_bad_layer_name(tmp_path):
    root, outside = base_root(tmp_path)
    os.makedirs(os.path.join(root, "aufs", "diff", "bad name\n"))
    return root, outside


def c_garbage_config(tmp_path):
    root, outside = base_root(tmp_path)
    with open(os.path.join(root, "containers", CID, "config.v2.json"), "wb") as f:
        f.write(b"\x00\x01 not json")
    return root, outside


def c_config_symlink_to_host(tmp_path):
    root, outside = base_root(tmp_path)
    make_outside(outside)
    cfg = os.path.join(root, "containers", CID, "config.v2.json")
    with open(os.path.join(outside, "config.v2.json"), "w") as f:
        f.write('{"Driver":"aufs"}')
    os.unlink(cfg)
    os.symlink(os.path.join(outside, "config.v2.json"), cfg)
    return root, outside


def c_symlinks_out(tmp_path):
    root, outside = base_root(tmp_path)
    make_outside(outside)
    entries = [(b"abs", "link", {"to": os.path.join(outside, "secret").encode()}),
               (b"rel", "link", {"to": b"../../../../../../../../" + outside.encode().lstrip(b"/") + b"/secret"}),
               (b"dangling", "link", {"to": b"/no/such/file"}),
               (b"loop", "link", {"to": b"loop"})]
    return base_root(tmp_path, base_entries=entries, container_entries=entries)[0], outside


def c_symlinked_dir_under_a_real_dir(tmp_path):
    """Lower layer: d -> /outside/dir (a symlink); upper layer: d/ a real directory with entries; the writable
    layer: the same.  Nothing may be written through the symlink."""
    outside = str(tmp_path / "outside")
    make_outside(outside)
    entries = [(b"d", "dir", {}), (b"d/new", "file", {"data": b"x"}), (b"d/sub", "dir", {}),
               (b"d/sub/g", "file", {"data": b"y"})]
    root, _ = base_root(tmp_path, base_entries=[(b"d", "link", {"to": os.path.join(outside, "dir").encode()})],
                        top_entries=entries, container_entries=entries)
    return root, outside


def c_awkward_names(tmp_path):
    names = [b"new\nline", b"caf\xe9", b"\xff\xfe", b"x" * 255, b"-rf", b" lead", b"tab\there", b"*?[", b"\\"]
    entries = [(n, "file", {"data": n}) for n in names] + [(b"d" + b"\x80", "dir", {}),
                                                            (b"d\x80/in", "file", {"data": b"in"})]
    wh = [(b"caf\xe9", "wh", {}), (b"x" * 251, "file", {"data": b"251"}), (b"x" * 251, "wh", {})]
    return base_root(tmp_path, base_entries=entries, top_entries=wh, container_entries=wh)


def c_sparse_tib(tmp_path):
    root, outside = base_root(tmp_path)
    for lid in (BASE, CID):
        path = diff(root, lid, "huge")
        with open(path, "wb") as f:
            f.seek(1 << 30)
            f.write(b"middle")
            f.truncate(1 << 40)
    return root, outside


def check_sparse(root):
    for lid in (BASE, CID):
        st = os.stat(os.path.join(root, "overlay2", lid, "diff", "huge"))
        assert st.st_size == 1 << 40 and st.st_blocks * 512 < 1 << 20  # still sparse, in the copy too


def c_special_files(tmp_path):
    entries = [(b"fifo", "fifo", {"mode": 0o600}), (b"sock", "sock", {}), (b"null", "chr", {"rdev": (1, 3)}),
               (b"sda", "blk", {"rdev": (8, 0)})]
    return base_root(tmp_path, base_entries=entries, container_entries=entries)


def c_zero_device(tmp_path):
    """A 0/0 character device in layer data: aufs shows it, overlayfs can only read it as a whiteout (dockerd's
    own overlay2 driver has the same limit).  Migrated as it is, and reported."""
    return base_root(tmp_path, top_entries=[(b"zero-dev", "chr", {"rdev": (0, 0)})])


def check_zero_device(root):
    st = os.lstat(os.path.join(root, "overlay2", TOP, "diff", "zero-dev"))
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def c_unexpected_files(tmp_path):
    root, outside = base_root(tmp_path)
    with open(os.path.join(root, "aufs", "diff", "README"), "w") as f:
        f.write("not a layer")
    os.makedirs(os.path.join(root, "aufs", "diff", LID("gone") + "-removing", "etc"))
    with open(os.path.join(root, "aufs", "layers", LID("orphan-layers-file")), "w") as f:
        f.write("")
    return root, outside


def c_dangling_cache_id(tmp_path):
    root, outside = base_root(tmp_path)
    d = os.path.join(root, "image", "aufs", "layerdb", "sha256", "f" * 64)
    os.makedirs(d)
    with open(os.path.join(d, "cache-id"), "w") as f:
        f.write(LID("missing"))
    return root, outside


def c_bad_whiteouts(tmp_path):
    entries = [(b".wh...", "file", {"data": b""}), (b".wh.", "file", {"data": b""}),
               (b".wh..wh.unknown", "file", {"data": b""}), (b"dirwh", "dir", {}),
               (b".wh.etc", "dir", {}), (b"opqdir", "dir", {}), (b"opqdir/.wh..wh..opq", "dir", {})]
    return base_root(tmp_path, top_entries=entries, container_entries=entries)


def c_overlay_xattrs_in_layer(tmp_path):
    root, outside = base_root(tmp_path, top_entries=[(b"etc", "dir", {})])
    xattr.set(diff(root, TOP, "etc"), b"trusted.overlay.redirect", b"/srv")
    xattr.set(diff(root, TOP, "srv"), b"trusted.overlay.opaque", b"y")
    return root, outside


def check_overlay_xattrs(root):
    names = xattr.list(os.path.join(root, "overlay2", TOP, "diff", "etc"), nofollow=True)
    assert b"trusted.overlay.redirect" not in names
    assert b"trusted.overlay.opaque" not in xattr.list(os.path.join(root, "overlay2", TOP, "diff", "srv"))


def c_deep_tree(tmp_path):
    deep = [(b"/".join([b"d"] * i), "dir", {}) for i in range(1, 301)]
    return base_root(tmp_path, base_entries=deep + [(b"/".join([b"d"] * 300) + b"/leaf", "file", {"data": b"x"})],
                     container_entries=deep[:50])


def c_hardlink_across_layers(tmp_path):
    root, outside = base_root(tmp_path)
    os.link(diff(root, BASE, "etc", "passwd"), diff(root, MID, "etc", "passwd-twin"))
    os.link(diff(root, BASE, "etc", "passwd"), diff(root, CID, "tmp", "passwd-twin"))
    return root, outside


def c_odd_containers(tmp_path):
    root, outside = base_root(tmp_path)
    with open(os.path.join(root, "containers", "stray-file"), "w") as f:
        f.write("x")
    other = os.path.join(root, "containers", LID("dm"))
    os.makedirs(other)
    with open(os.path.join(other, "config.v2.json"), "w") as f:
        f.write('{"ID":"x","Driver":"devicemapper"}')
    os.makedirs(os.path.join(root, "containers", LID("noconfig")))
    return root, outside


def c_empty_layer_and_modes(tmp_path):
    # Below a setgid directory a new one inherits its group and the bit: "plain" must lose both, "inherits"
    # has them already; "owned" is another user's 0755 directory, "sub" one below an unreadable one.
    entries = [(b"sticky", "dir", {"mode": 0o1777}), (b"setgid", "dir", {"mode": 0o2750, "gid": 50}),
               (b"setgid/plain", "dir", {"mode": 0o755}), (b"setgid/inherits", "dir", {"mode": 0o2755, "gid": 50}),
               (b"setgid/inherits/deeper", "dir", {"mode": 0o755, "gid": 50}),
               (b"owned", "dir", {"mode": 0o755, "uid": 1000, "gid": 1000}), (b"owned/in", "dir", {"mode": 0o755}),
               (b"noperm", "dir", {"mode": 0o000}), (b"noperm/sub", "dir", {"mode": 0o755}),
               (b"noperm-file", "file", {"data": b"x", "mode": 0o000}),
               (b"suid", "file", {"data": b"x", "mode": 0o4755, "uid": 1234})]
    return base_root(tmp_path, base_entries=entries, container_entries=entries)


