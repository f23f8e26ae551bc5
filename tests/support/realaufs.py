"""Judging a migration by the real aufs: the chains of a root as moby mounts them, what the aufs kernel in the
guest (``aufsvm.py``) shows for each before the migration, what overlayfs in the same guest shows for the
migrated tree, what the model (``aufsview.py``) says, and the differences between them.

A chain is seen as a container sees it: an image's layers below a new, empty container layer (the guest's
``scratch`` branch, the model's empty folder with the layer root's attributes), a container's layers below its
own writable layer.  The top directory's mtime is not compared: aufs creates its bookkeeping entries
(``.wh..wh.aufs``, ``.wh..wh.plnk``, ``.wh..wh.orph``) in the writable branch when it mounts, which moves it.

Where the migrated view may differ from aufs's: only at the paths the migrator names in a finding whose kind
says so (``VIEW_DIFFERS``), for a layer of the chain, and below them.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

from tests.support.aufsview import View, aufs_view, normalized

# The finding kinds that name a path whose view after the migration is not aufs's (docs/design.md, "Where the
# view differs from aufs").
VIEW_DIFFERS = frozenset({
    "whiteout-beside-entry", "ignored-bad-whiteout", "device-0-0-reads-as-whiteout",
    "aufs-merged-through-non-directory", "aufs-merged-below-opaque", "name-too-long-for-aufs",
    "opaque-marker-not-a-regular-file", "whiteout-not-a-regular-file", "aufs-internal-kept-for-tar-split",
    "layers-file-repaired", "hardlink-into-another-layer-copied",
})


@dataclass
class Chain:
    """A layer's chain: its directory and its ancestors' (top first), relative to the root; writable when it is
    a container's own layer (the branch a container writes into)."""

    layer: str
    dirs: List[str]
    writable: bool


def chains_of(root: str) -> Dict[str, Chain]:
    """Every layer of ``aufs/diff`` that has a layers file, with its chain."""
    writable = set()
    mounts = os.path.join(root, "image", "aufs", "layerdb", "mounts")
    if os.path.isdir(mounts):
        for cid in os.listdir(mounts):
            try:
                with open(os.path.join(mounts, cid, "mount-id")) as f:
                    writable.add(f.read().strip())
            except OSError:
                pass
    chains = {}
    for lid in sorted(os.listdir(os.path.join(root, "aufs", "diff"))):
        lfile = os.path.join(root, "aufs", "layers", lid)
        if not os.path.isfile(lfile):
            continue
        with open(lfile) as f:
            ancestors = [line for line in f.read().split("\n") if line]
        chains[lid] = Chain(lid, [os.path.join("aufs", "diff", x) for x in [lid] + ancestors], lid in writable)
    return chains


@dataclass
class RootViews:
    """What aufs shows for each chain of a root (the model), with the chains."""

    chains: Dict[str, Chain]
    views: Dict[str, View]

    def only(self, *layers: str) -> "RootViews":
        return RootViews({lid: self.chains[lid] for lid in layers}, {lid: self.views[lid] for lid in layers})

    def __len__(self) -> int:
        return len(self.views)

    def __contains__(self, layer: object) -> bool:
        return layer in self.views


def model_views(root: str, chains: Dict[str, Chain]) -> Dict[str, View]:
    """What the model says each chain shows."""
    scratch_base = tempfile.mkdtemp(prefix="a2o-scratch-")
    try:
        views = {}
        for lid, chain in chains.items():
            branches = [os.path.join(root, d) for d in chain.dirs]
            if not chain.writable:
                scratch = os.path.join(scratch_base, lid)
                os.mkdir(scratch)
                st = os.lstat(branches[0])
                os.chmod(scratch, stat.S_IMODE(st.st_mode))
                os.chown(scratch, st.st_uid, st.st_gid)
                os.utime(scratch, ns=(st.st_atime_ns, st.st_mtime_ns))
                branches = [scratch] + branches
            views[lid] = aufs_view(branches)
        return views
    finally:
        shutil.rmtree(scratch_base, ignore_errors=True)


def aufs_specs(chains: Dict[str, Chain], prefix: str) -> Dict[str, dict]:
    """The guest's ``views`` requests for the aufs chains of a root copied at ``prefix`` in the image."""
    specs = {}
    for lid, chain in chains.items():
        dirs = [os.path.join(prefix, d) for d in chain.dirs]
        top = [(dirs[0], "rw")] if chain.writable else [(None, "rw"), (dirs[0], "ro+wh")]
        specs["aufs " + lid] = {"fs": "aufs", "branches": top + [(d, "ro+wh") for d in dirs[1:]]}
    return specs


def overlay_specs(tree: str, layers: Iterable[str], prefix: str) -> Dict[str, dict]:
    """The guest's ``views`` requests for the chains of the migrated overlay2 tree ``tree`` (on the host),
    copied at ``prefix`` in the image: ``<id>/diff`` on top, then the ``lower`` file's entries."""
    specs = {}
    for lid in layers:
        lower_file = os.path.join(tree, lid, "lower")
        lower = open(lower_file).read() if os.path.exists(lower_file) else ""
        specs["overlay " + lid] = {"fs": "overlay", "top": f"{lid}/diff", "lower": lower,
                                   "cwd": os.path.join(prefix, "overlay2")}
    return specs


def image_with(path: str, trees: Dict[str, str]) -> None:
    from tests.support.aufsvm import ext4_image

    ext4_image(path, trees)


class Asked:
    """A guest's ``views`` request under way: an image of some trees in the share, being read."""

    def __init__(self, guest, share_name: str, trees: Dict[str, str], specs: Dict[str, dict]) -> None:
        self.image = os.path.join(guest.share, share_name)
        image_with(self.image, trees)
        self.pending = guest.send("views", image=f"/run/a2o/share/{share_name}", chains=specs)

    def views(self) -> Dict[str, object]:
        try:
            return self.pending.result(900)
        finally:
            if os.path.exists(self.image):
                os.unlink(self.image)


def ask(guest, pre: str, post: str, chains: Dict[str, Chain], name: str = "root.img") -> Asked:
    """Ask the guest's kernel for the aufs chains of ``pre`` (the root before the migration) and the overlay
    chains of ``post`` (the migrated root), in one request; ``judge_root`` takes the answer.  The trees are
    copied into the image now, so both may change meanwhile."""
    specs = aufs_specs(chains, "pre")
    specs.update(overlay_specs(os.path.join(post, "overlay2"), chains, "post"))
    return Asked(guest, name, {"pre": pre, "post": post}, specs)


def _without_top_mtime(entries: Dict[bytes, tuple]) -> Dict[bytes, tuple]:
    out = dict(entries)
    if b"." in out and out[b"."][0] != "error":
        out[b"."] = out[b"."][:4] + (None,) + out[b"."][5:]
    return out


def allowed_paths(findings: Iterable[Tuple[str, str, str]], chain: "Chain | Iterable[str]") -> Dict[str, str]:
    """The paths of ``chain`` (a ``Chain``, or its layer ids) whose view the findings say may differ, each
    with the finding that says so (paths as the findings spell them: relative, bytes that are not UTF-8 as
    ``\\xNN``)."""
    layers = {os.path.basename(d) for d in chain.dirs} if isinstance(chain, Chain) else set(chain)
    return {detail.strip("/") or ".": f"{kind} in {layer[:12]}" for kind, layer, detail in findings
            if kind in VIEW_DIFFERS and layer in layers}


def covered(path: bytes, allowed: Dict[str, str]) -> Optional[str]:
    """The finding of ``allowed`` that names ``path`` or a directory above it (None: none does)."""
    text = path.decode("utf-8", "backslashreplace")
    while text:
        if text in allowed:
            return allowed[text]
        text = text.rpartition("/")[0]
    return allowed.get(".")


def differences(expected: Dict[bytes, tuple], got: Dict[bytes, tuple], allowed: Optional[Dict[str, str]] = None,
                limit: int = 8) -> List[tuple]:
    """(path, expected, got) where the two views differ, outside the ``allowed`` paths and what is below them."""
    out = []
    for path in sorted(set(expected) | set(got)):
        a, b = expected.get(path), got.get(path)
        if a != b and not covered(path, allowed or {}):
            out.append((path, a, b))
            if len(out) >= limit:
                break
    return out


@dataclass
class Judgement:
    """What the kernel says against the model (``model``) and against the migrated tree (``migration``)."""

    model: Dict[str, List[tuple]]
    migration: Dict[str, List[tuple]]
    chains: int


def judge_root(views: Dict[str, object], chains: Dict[str, Chain], models: Dict[str, View],
               findings: List[Tuple[str, str, str]]) -> Judgement:
    """What the guest's kernel showed (``Asked.views``) against the model, and the migrated chains against
    aufs's."""
    model_diffs, migration_diffs = {}, {}
    for lid, chain in chains.items():
        seen = views["aufs " + lid]
        if seen[0] == "mount-error":
            raise AssertionError(f"aufs refused to mount the chain of {lid}: {seen[1]}")
        kernel, unreachable = normalized(_without_top_mtime(seen[0]))
        model = models[lid]
        wrong = differences(_without_top_mtime(model.entries), kernel)
        wrong += [(p, "listed, unreachable: " + model.unreachable.get(p, "not predicted"), "listed, " + e)
                  for p, e in unreachable.items() if p not in model.unreachable]
        if seen[1] != model.groups:
            wrong.append(("hardlink groups", model.groups, seen[1]))
        if wrong:
            model_diffs[lid] = wrong
        mounted = views["overlay " + lid]
        if mounted[0] == "mount-error":
            migration_diffs[lid] = [("mount", "mounted", mounted[1])]
            continue
        overlay, ghosts = normalized(_without_top_mtime(mounted[0]))
        allowed = allowed_paths(findings, chain)
        wrong = differences(kernel, overlay, allowed)
        wrong += [(p, "not listed", f"listed, {e} (a whiteout shown as an entry)") for p, e in ghosts.items()]
        if _groups(seen[1], allowed) != _groups(mounted[1], allowed):
            wrong.append(("hardlink groups", seen[1], mounted[1]))
        if wrong:
            migration_diffs[lid] = wrong
    return Judgement(model_diffs, migration_diffs, len(chains))


def _groups(groups: List[List[bytes]], allowed: Dict[str, str]) -> List[List[bytes]]:
    out = []
    for group in groups:
        kept = [p for p in group if not covered(p, allowed)]
        if len(kept) > 1:
            out.append(kept)
    return sorted(out)


def copy_tree(src: str, dest: str) -> None:
    subprocess.run(["cp", "-a", "--sparse=always", src, dest], check=True)


def findings_of(root: str) -> List[Tuple[str, str, str]]:
    from migrations_state import reader

    db = os.path.join(root, ".aufs2overlay", "state.db")
    return list(reader.read_status(db)["findings"]) if os.path.exists(db) else []


def describe_differences(diffs: Dict[str, List[tuple]], limit: int = 3) -> str:
    parts = []
    for lid, wrong in list(diffs.items())[:limit]:
        parts.append(f"layer {lid[:12]}: " + "; ".join(f"{p!r}: {a!r} -> {b!r}" for p, a, b in wrong[:4]))
    return "\n".join(parts)


def first_kind(diffs: Dict[str, List[tuple]], what: str) -> str:
    """A difference's kind without the example's names (the long run counts each kind once)."""
    for wrong in diffs.values():
        for path, a, b in wrong:
            if path == "hardlink groups":
                return f"{what}: the hardlink groups differ"
            if a is None:
                return f"{what}: an entry aufs does not show appears"
            if b is None:
                return f"{what}: an entry aufs shows is missing"
            if isinstance(a, str) or isinstance(b, str):
                return f"{what}: {str(a).split(':')[0]} / {str(b).split(',')[0]}"
            fields = ("type", "mode", "owner", "group", "mtime", "content", "xattrs")
            return f"{what}: the entry's " + "/".join(f for f, x, y in zip(fields, a, b) if x != y) + " differ"
    return what
