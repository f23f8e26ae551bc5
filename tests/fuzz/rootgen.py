"""Generated aufs roots (Hypothesis strategies), written with ``migrator.sample.build_aufs_root``.

A root is drawn as a *spec*, plain Python literals (so a failing one can be kept in ``examples/`` as text and
read back with ``ast.literal_eval``)::

    {"layers": [{"parent": None | index of an earlier layer, "entries": [(path, kind, options), ...]}, ...],
     "containers": [{"image": index of a layer, "init": [...entries], "rw": [...entries]}, ...]}

Layers form a forest (depth 1-12, several chains, shared ancestors); every leaf is an image.  Names come
mostly from a small pool, so the same path meets itself across layers with another type, under a whiteout,
under an opaque directory; the rest are random bytes (0x01-0xff but ``/``), newlines, 255-byte names.
"""

from __future__ import annotations

import os
from typing import Dict, List, Tuple

from hypothesis import strategies as st

from migrator import sample

POOL = [b"a", b"b", b"c", b"etc", b"lib"]
WH, OPQ = b".wh.", b".wh..wh..opq"
SAFE_BYTES = bytes(b for b in range(1, 256) if b != ord("/"))


def _clean(name: bytes) -> bytes:
    name = name.replace(b"/", b"_").replace(b"\0", b"_")[:255]
    return b"_" + name if name in (b"", b".", b"..") else name


names = st.one_of(
    st.sampled_from(POOL), st.sampled_from(POOL), st.sampled_from(POOL), st.sampled_from(POOL),
    st.binary(min_size=1, max_size=12).map(_clean),
    st.sampled_from([b"new\nline", b"\xff\xfe", b" ", b"-", b"x" * 255, b"\x01", b".hidden", b".wh"]),
)
modes_dir = st.sampled_from([0o755, 0o755, 0o700, 0o000, 0o1777, 0o2755, 0o4711, 0o555])
modes_file = st.sampled_from([0o644, 0o644, 0o755, 0o000, 0o4755, 0o2755, 0o1644, 0o400])
owners = st.sampled_from([0, 0, 1, 1000, 65534, 2 ** 31])
xattrs = st.dictionaries(
    st.sampled_from([b"user.a", b"user.b", b"trusted.t", b"trusted.overlay.opaque", b"trusted.overlay.redirect"]),
    st.sampled_from([b"", b"y", b"\x00\xff", b"v" * 100]), max_size=2)
special_xattrs = st.dictionaries(st.sampled_from([b"trusted.t", b"trusted.u"]),  # user.* is refused there
                                 st.sampled_from([b"", b"v"]), max_size=2)
devices = st.tuples(st.integers(1, 255), st.integers(0, 255))


def _owned(draw, opts: dict, file_like: bool, special: bool = False) -> dict:
    opts["mode"] = draw(modes_file if file_like else modes_dir)
    opts["uid"], opts["gid"] = draw(owners), draw(owners)
    if draw(st.integers(0, 3)) == 3:  # Hypothesis shrinks towards 0: the plain case
        opts["xattrs"] = draw(special_xattrs if special else xattrs)
    return opts


@st.composite
def directory(draw, depth: int) -> List[Tuple[bytes, str, dict]]:
    """The entries of one directory (paths relative to it), its subdirectories' included."""
    out: List[Tuple[bytes, str, dict]] = []
    used: set = {OPQ}  # names on disk (a whiteout of "x" is ".wh.x"); an opaque marker may come last
    for _ in range(draw(st.integers(0, 5 if depth else 7))):
        name = draw(names)
        kind = draw(st.sampled_from(["file", "file", "dir", "dir", "link", "wh", "wh", "hard", "empty",
                                     "sparse", "fifo", "sock", "chr", "blk"]))
        if draw(st.integers(0, 15)) == 15:  # now and then a state only aufs itself, or a cut, leaves
            out.extend(_odd(draw, name, used))
            continue
        if kind == "wh":
            name = name[:251]  # ".wh." + name must fit in NAME_MAX
            if WH + name not in used:
                used.add(WH + name)
                out.append((name, "wh", {}))
            continue
        if name in used:
            continue
        used.add(name)
        if kind == "dir":
            opts = _owned(draw, {}, False)
            out.append((name, "dir", opts))
            if depth < 3:
                out.extend((name + b"/" + rel, k, o) for rel, k, o in draw(directory(depth + 1)))
            if draw(st.integers(0, 2)) == 2:  # now and then a directory, not the regular file aufs makes
                out.append((name + b"/.wh..wh..opq", "dir" if draw(st.integers(0, 9)) == 9 else "opq", {}))
        elif kind in ("file", "empty"):
            data = b"" if kind == "empty" else draw(st.binary(max_size=64))
            out.append((name, "file", _owned(draw, {"data": data}, True)))
        elif kind == "sparse":
            size = draw(st.sampled_from([1 << 20, 1 << 22, 5000]))  # tar-split reads holes too
            out.append((name, "sparse", _owned(draw, {"size": size, "data": [(size // 2, b"mid")]}, True)))
        elif kind == "link":
            to = draw(st.sampled_from([b"/etc/passwd", b"../" * 5 + b"etc", b"a", b"dangling", b"..", b"/",
                                       b"x" * 200]))
            out.append((name, "link", {"to": to}))
        elif kind == "hard":
            out.append((name, "hard", {}))  # to an earlier file of the layer, chosen in ``_resolve``
        elif kind in ("chr", "blk"):
            out.append((name, kind, _owned(draw, {"rdev": draw(devices)}, True, special=True)))
        else:
            out.append((name, kind, _owned(draw, {}, True, special=True)))
    return out


def _odd(draw, name: bytes, used: set) -> List[Tuple[bytes, str, dict]]:
    """What aufs or a power cut leaves that no image build makes on purpose: a copy-up or an rmdir cut off
    (``.wh..wh.<name>.<4 hex>``, holding data or only whiteouts; at a layer's root it is aufs's own), a whiteout
    that is not a regular file, ``.wh.`` itself, a name longer than aufs looks up."""
    odd = draw(st.sampled_from(["whtmp-file", "whtmp-dir", "whtmp-empty", "wh-dir", "wh-link", "wh-itself",
                                "long-name"]))
    tmp = b".wh..wh." + name[:200] + b".%04x" % draw(st.integers(0, 0xffff))
    if odd == "long-name":
        made = [(b"n" * draw(st.sampled_from([243, 250, 255])), "file", {"data": b"long"})]
    elif odd == "whtmp-file":
        made = [(tmp, "file", {"data": draw(st.binary(min_size=1, max_size=16))})]
    elif odd == "whtmp-dir":
        made = [(tmp, "dir", {}), (tmp + b"/" + name, "file", {"data": b"copied up"}), (tmp + b"/gone", "wh", {})]
    elif odd == "whtmp-empty":
        made = [(tmp, "dir", {}), (tmp + b"/" + name[:251], "wh", {})]
    elif odd == "wh-dir":
        made = [(b".wh." + name[:251], "dir", {})]
    elif odd == "wh-link":
        made = [(b".wh." + name[:251], "link", {"to": b"nowhere"})]
    else:
        made = [(b".wh.", "file", {"data": b""})]
    top = made[0][0]
    if top in used:
        return []
    used.add(top)
    return made


def _resolve(entries: List[Tuple[bytes, str, dict]]) -> List[Tuple[bytes, str, dict]]:
    """Hardlinks name an earlier regular file of the same layer (or become empty files)."""
    files: List[bytes] = []
    out = []
    for rel, kind, opts in entries:
        if kind == "hard":
            if files:
                opts = {"to": files[(len(rel) * 7) % len(files)]}
            else:
                kind, opts = "file", {"data": b"no file to link to"}
        if kind in ("file", "sparse"):
            files.append(rel)
        out.append((rel, kind, opts))
    return out


def _top_name(entry: Tuple[bytes, str, dict]) -> bytes:
    """The name an entry (or the subtree it is in) has on disk at the layer's top."""
    rel, kind, _opts = entry
    if b"/" in rel:
        return rel.split(b"/", 1)[0]
    return WH + rel if kind == "wh" else (OPQ if kind == "opq" else rel)


@st.composite
def layer(draw, writable: bool = False) -> List[Tuple[bytes, str, dict]]:
    entries = draw(directory(0))
    extra: List[Tuple[bytes, str, dict]] = []
    if writable or draw(st.integers(0, 9)) == 9:  # aufs's own bookkeeping at a branch's top
        extra.append((b".wh..wh.aufs", "file", {"data": b"", "mode": 0o444}))
        extra.append((b".wh..wh.plnk", "dir", {"mode": 0o700}))
        extra.append((b".wh..wh.plnk/1234.5678", "file", {"data": b"pseudo-link"}))
        extra.append((b".wh..wh.orph", "dir", {"mode": 0o700}))
    if draw(st.integers(0, 15)) == 15:
        extra.append((b".wh..wh..opq", "opq", {}))  # at a branch's root: aufs does not honour it there
    taken = {rel for rel, _k, _o in extra} | {OPQ}
    entries = extra + [e for e in entries if _top_name(e) not in taken]  # an entry may be named as aufs's own
    if writable:  # every whiteout of a writable branch is a hardlink of .wh..wh.aufs
        entries = [(r, k, dict(o, hardlink_base=True) if k in ("wh", "opq") else o) for r, k, o in entries]
    return _resolve(entries)


@st.composite
def roots(draw, max_layers: int = 12) -> dict:
    count = draw(st.integers(1, max_layers))
    layers = []
    for i in range(count):
        parent = None if i == 0 or draw(st.integers(0, 3)) == 0 else draw(st.integers(0, i - 1))
        layers.append({"parent": parent, "entries": draw(layer())})
    parents = {x["parent"] for x in layers}
    leaves = [i for i in range(count) if i not in parents]
    containers = []
    for _ in range(draw(st.integers(0, 2))):
        containers.append({"image": draw(st.sampled_from(leaves)), "init": draw(layer()),
                           "rw": draw(layer(writable=True))})
    spec = {"layers": layers, "containers": containers}
    if draw(st.integers(0, 7)) == 7:  # a power cut emptied a layers file (moby writes it without fsync)
        spec["emptied"] = [draw(st.sampled_from(layer_ids(spec) + all_container_layers(spec)))]
    return spec


def all_container_layers(spec: dict) -> List[str]:
    ids = []
    for n in range(len(spec["containers"])):
        cid = sample.layer_id(f"fuzz-container-{n}")
        ids += [f"{cid}-init", cid]
    return ids


def _chain(spec: dict, index: int) -> List[int]:
    """``index`` and its ancestors, nearest first."""
    out = []
    while index is not None:
        out.append(index)
        index = spec["layers"][index]["parent"]
    return out


def layer_ids(spec: dict) -> List[str]:
    return [sample.layer_id(f"fuzz-{i}") for i in range(len(spec["layers"]))]


def build(spec: dict, root: str) -> None:
    """Write the aufs root ``spec`` describes at ``root``."""
    ids = layer_ids(spec)
    layers: Dict[str, Tuple[List[str], list]] = {}
    for i, lay in enumerate(spec["layers"]):
        layers[ids[i]] = ([ids[a] for a in _chain(spec, i)[1:]], lay["entries"])
    parents = {x["parent"] for x in spec["layers"]}
    images = {f"img{i}": [ids[a] for a in reversed(_chain(spec, i))]
              for i in range(len(spec["layers"])) if i not in parents}
    containers = {}
    for n, c in enumerate(spec["containers"]):
        cid = sample.layer_id(f"fuzz-container-{n}")
        image_chain = [ids[a] for a in _chain(spec, c["image"])]
        layers[f"{cid}-init"] = (image_chain, c["init"])
        layers[cid] = ([f"{cid}-init"] + image_chain, c["rw"])
        containers[cid] = (f"img{c['image']}", "aufs")
    sample.build_aufs_root(root, layers, images, containers)
    for lid in spec.get("emptied", ()):
        open(os.path.join(root, "aufs", "layers", lid), "wb").close()


def entry_count(spec: dict) -> int:
    return sum(len(x["entries"]) for x in spec["layers"]) + sum(
        len(c["init"]) + len(c["rw"]) for c in spec["containers"])


def save_example(spec: dict, folder: str, name: str) -> str:
    """Keep ``spec`` as a regression case: its ``repr``, read back by ``ast.literal_eval``."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name + ".spec")
    with open(path, "w", encoding="ascii") as f:
        f.write(repr(spec) + "\n")
    return path
