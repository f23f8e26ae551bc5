"""Checks of a migrated tree: every layer's overlay2 structure, no aufs residue, each chain mounts and, while
the aufs data is still there (hardlink strategy, before cleanup), shows exactly what aufs showed."""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import tempfile
from typing import Dict, Iterator, List, Optional

from migrations_state.machine import FINISHED, SWITCHED
from migrations_state.store import Store
from migrator.checks import views
from migrator.errors import MigratorError
from migrator.formats import aufs, containers, overlay2
from migrator.fs import fsio
from migrator.paths import Paths
from migrator.ui.progress import Reporter


def _read(path: str) -> "bytes | None":
    """A layer file of the new tree (``link``, ``lower``, ``committed``) or a container config; None when it is
    missing, and what makes it unfit (a FIFO, a directory, a huge file) when it is not a small regular file."""
    try:
        return fsio.read_small(path, containers.CONFIG_MAX)[0]
    except FileNotFoundError:
        return None
    except fsio.NotSmallFile as exc:
        return f"<{exc}>".encode()


def aufs_residue(diff_dir: str, image: bool = False) -> List[str]:
    """Names that must not survive into overlay2: any ``.wh.`` entry (whiteout, opaque marker, aufs internal),
    but in an image's layer an internal below the root that holds data (``aufs.keeps_for_tar_split``)."""
    found = []
    top_b = os.fsencode(diff_dir)
    for top, dirs, files in os.walk(top_b):
        kept = set()
        for name in dirs + files:
            kind = aufs.whiteout_kind(name)
            if kind is None:
                continue
            if image and top != top_b and kind == aufs.INTERNAL and aufs.kept_in(top, name):
                kept.add(name)
                continue
            found.append(os.path.join(top, name).decode("utf-8", "backslashreplace"))
        dirs[:] = [d for d in dirs if aufs.whiteout_kind(d) is None or d in kept]
    return found


def layer_problems(tree: str, layer_id: str, link_id: str, ancestor_links: List[str], has_child: bool,
                   image: bool = False) -> List[str]:
    problems = []
    ldir = os.path.join(tree, layer_id)
    if not os.path.isdir(os.path.join(ldir, overlay2.DIFF)):
        return [f"{layer_id}: no diff/ directory"]
    if _read(os.path.join(ldir, overlay2.LINK)) != link_id.encode():
        problems.append(f"{layer_id}: link file is not {link_id}")
    try:
        target = os.readlink(os.path.join(tree, overlay2.LINKS_DIR, link_id))
        if target != f"../{layer_id}/{overlay2.DIFF}":
            problems.append(f"{layer_id}: l/{link_id} points to {target}")
    except OSError:
        problems.append(f"{layer_id}: l/{link_id} is missing")
    lower = _read(os.path.join(ldir, overlay2.LOWER))
    if ancestor_links:
        if lower != overlay2.lower_value(ancestor_links):
            problems.append(f"{layer_id}: lower is {lower!r}")
        if not os.path.isdir(os.path.join(ldir, overlay2.WORK)):
            problems.append(f"{layer_id}: no work/ directory")
    elif lower is not None:
        problems.append(f"{layer_id}: a base layer with a lower file")
    if has_child and _read(os.path.join(ldir, overlay2.COMMITTED)) is None:
        problems.append(f"{layer_id}: no committed marker")
    residue = aufs_residue(os.path.join(ldir, overlay2.DIFF), image)
    problems += [f"{layer_id}: aufs entry left in the tree: {p}" for p in residue]
    return problems


@contextlib.contextmanager
def mounted_chain(tree: str, layer_id: str, ancestor_links: List[str]) -> Iterator[str]:
    """Mount the layer's chain read-only, the way dockerd does (relative ``l/`` paths from the tree), on a
    private temporary mountpoint; yield the mountpoint.  Raises MigratorError if the kernel refuses."""
    with tempfile.TemporaryDirectory(prefix="a2o-verify-") as scratch:
        mnt, empty = os.path.join(scratch, "mnt"), os.path.join(scratch, "empty")
        os.mkdir(mnt)
        os.mkdir(empty)
        # Without an upper layer overlayfs wants two lowers: an empty one stands in under a base layer.
        lowers = ":".join([f"{layer_id}/diff"] + [f"l/{link}" for link in ancestor_links] + [empty])
        res = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={lowers}", mnt],
                             cwd=tree, capture_output=True, text=True)
        if res.returncode != 0:
            raise MigratorError(f"{layer_id}: the kernel refuses to mount its chain: {res.stderr.strip()}")
        try:
            yield mnt
        finally:
            subprocess.run(["umount", mnt], check=False)


def chain_problems(paths: Paths, layer_id: str, ancestors: List[str], ancestor_links: List[str],
                   images: List[bool], limit: int = 20) -> List[str]:
    """Mount the chain; when every layer of it is still in ``aufs/diff``, compare what it shows with the
    aufs view of the same chain."""
    chain = [paths.aufs_layer(i) for i in [layer_id] + ancestors]
    compare = all(os.path.isdir(d) and not os.path.islink(d) for d in chain)
    try:
        with mounted_chain(paths.tree, layer_id, ancestor_links) as mnt:
            if not compare:
                os.listdir(mnt)
                return []
            got = views.mounted_view(mnt)
    except MigratorError as exc:
        return [str(exc)]
    found = list(itertools.islice(views.differences(views.aufs_view(chain, images), got), limit + 1))
    more = [f"{layer_id}: more differences not shown"] if len(found) > limit else []
    return [f"{layer_id}: {d}" for d in found[:limit]] + more


def verify(paths: Paths, store: Store, progress: Optional[Reporter] = None) -> List[str]:
    """Every layer's overlay2 files and, as root, its chain mounted (and compared with aufs while that is
    there); the image store; each switched container's driver.  After ``cleanup`` the same, from the record."""
    run = store.run()
    if run.phase not in FINISHED:
        return [f"the migration is {run.phase}, not completed"]
    problems: List[str] = []
    records = store.layers()
    links: Dict[str, str] = {r.id: r.link_id for r in records}
    image: Dict[str, bool] = {r.id: not r.writable for r in records}
    can_mount = os.geteuid() == 0
    if progress is not None:
        progress.start(len(records), 0)
    for r in records:
        ancestors = r.ancestor_ids
        ancestor_links = [links[a] for a in ancestors]
        found = layer_problems(paths.tree, r.id, r.link_id, ancestor_links, r.has_child, image[r.id])
        if not found and can_mount:
            found = chain_problems(paths, r.id, ancestors, ancestor_links, [image[i] for i in [r.id] + ancestors])
        problems += found
        if progress is not None:
            progress.layer_checked("verify")
    if os.path.isdir(paths.image_aufs) and not os.path.isdir(paths.image_overlay2):
        problems.append("image/overlay2/ is missing")
    for c in store.containers():
        if c.state != SWITCHED:
            continue
        data = _read(os.path.join(paths.root, "containers", c.id, containers.CONFIG))
        try:
            driver = containers.locate_driver(data.decode("utf-8"))[0] if data is not None else None
        except ValueError:
            driver = None
        if driver != "overlay2":
            problems.append(f"container {c.id}: Driver is {driver!r}, not 'overlay2'")
    return problems
