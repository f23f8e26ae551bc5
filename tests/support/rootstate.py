"""The state of an engine root, as the tests compare it: the whole root (but the migrator's work area) with its
hardlink groups, the aufs side alone, what aufs shows for every chain; and a wait for a stopped migrator."""

import os
import time

from tests.conftest import WORKDIR
from tests.support import realaufs
from tests.support.manifest import link_groups, manifest
from tests.support.overlaymount import mounted_chain


def whole_root(root):
    """The whole engine root but the migrator's own work area (its state database and lock), with the hardlink
    groups among its files (the in-place strategy moves aufs whiteouts that are links of one another)."""
    return manifest(root, skip={WORKDIR}), link_groups(root, skip={WORKDIR})


def aufs_side(root):
    return {"aufs": manifest(os.path.join(root, "aufs")),
            "image/aufs": manifest(os.path.join(root, "image", "aufs"))}


def aufs_chains(root):
    """Every layer's chain as aufs mounts it: its directory and its ancestors', top first."""
    return {lid: [os.path.join(root, d) for d in chain.dirs] for lid, chain in realaufs.chains_of(root).items()}


def aufs_views(root):
    """What aufs shows for every layer's chain (the model, ``aufsview.py``, which the real aufs judges in the
    fuzzer), read before the run (the in-place strategy moves the data)."""
    chains = realaufs.chains_of(root)
    assert chains, "no layers to check"
    return realaufs.RootViews(chains, realaufs.model_views(root, chains))


def assert_chains_match(root, views):
    """Every migrated chain, mounted, shows what aufs showed, but where a finding of the run says the view
    differs (``realaufs.VIEW_DIFFERS``)."""
    tree = os.path.join(root, "overlay2")
    findings = realaufs.findings_of(root)
    for lid, expected in views.views.items():
        with mounted_chain(tree, lid) as mnt:
            got = manifest(mnt)
        allowed = realaufs.allowed_paths(findings, views.chains[lid])
        wrong = realaufs.differences(expected.entries, got, allowed)
        assert not wrong, f"layer {lid}: (path, aufs, overlay) {wrong}"


def copy_for_the_guest(root, dest):
    """The root as it is now, kept for the real aufs to mount after the run (the in-place strategy moves it)."""
    realaufs.copy_tree(root, dest)
    return dest


def assert_real_aufs_agrees(guest, pre, root, views):
    """The real aufs (tests/support/aufsvm.py) mounts every chain of ``pre`` (the root before the run) and
    overlayfs in the same guest every migrated chain of ``root``: the model shows what the kernel shows, and
    the migrated chains what aufs showed, but where a finding of the run says otherwise."""
    seen = realaufs.ask(guest, pre, root, views.chains).views()
    judged = realaufs.judge_root(seen, views.chains, views.views, realaufs.findings_of(root))
    assert not judged.model, "the model and the real aufs disagree:\n" + realaufs.describe_differences(judged.model)
    assert not judged.migration, ("the migrated tree and the real aufs disagree:\n"
                                  + realaufs.describe_differences(judged.migration))


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
