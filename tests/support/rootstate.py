"""The state of an engine root, as the tests compare it: the whole root (but the migrator's work area) with its
hardlink groups, the aufs side alone, what aufs shows for every chain; and a wait for a stopped migrator."""

import os
import time

from tests.conftest import WORKDIR
from tests.support.aufsview import aufs_view
from tests.support.manifest import diff_manifests, link_groups, manifest
from tests.support.overlaymount import mounted_chain


def whole_root(root):
    """The whole engine root but the migrator's own work area (its state database and lock), with the hardlink
    groups among its files (the in-place strategy moves aufs whiteouts that are links of one another)."""
    return manifest(root, skip={WORKDIR}), link_groups(root, skip={WORKDIR})


def aufs_side(root):
    return {"aufs": manifest(os.path.join(root, "aufs")),
            "image/aufs": manifest(os.path.join(root, "image", "aufs"))}


def aufs_chains(root):
    layers_dir = os.path.join(root, "aufs", "layers")
    chains = {}
    for lid in os.listdir(os.path.join(root, "aufs", "diff")):
        lfile = os.path.join(layers_dir, lid)
        if not os.path.exists(lfile):
            continue
        with open(lfile) as f:
            ancestors = [line for line in f.read().split("\n") if line]
        chains[lid] = [os.path.join(root, "aufs", "diff", x) for x in [lid] + ancestors]
    return chains


def aufs_views(root):
    """What aufs shows for every layer's chain, read before the run (the in-place strategy moves the data)."""
    chains = aufs_chains(root)
    assert chains, "no layers to check"
    return {lid: aufs_view(chain) for lid, chain in chains.items()}


def assert_chains_match(root, views):
    tree = os.path.join(root, "overlay2")
    for lid, expected in views.items():
        with mounted_chain(tree, lid) as mnt:
            got = manifest(mnt)
        assert got == expected, f"layer {lid}: {diff_manifests(expected, got)}"


def wait_stopped(proc, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"migrator exited ({proc.returncode}) before its stop point")
        with open(f"/proc/{proc.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.01)
    raise AssertionError("migrator never stopped")
