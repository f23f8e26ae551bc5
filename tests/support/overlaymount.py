"""Mount a migrated layer's chain with the kernel's overlayfs, read-only, exactly as dockerd would find it:
``<id>/diff`` on top, then the ``lower`` file's ``l/<LINKID>`` entries, resolved from the overlay2 directory."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from typing import Iterator


def lowers_of(tree: str, layer_id: str) -> str:
    path = os.path.join(tree, layer_id, "lower")
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        return f.read()


@contextlib.contextmanager
def mounted_chain(tree: str, layer_id: str) -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="a2o-test-") as scratch:
        mnt, empty = os.path.join(scratch, "mnt"), os.path.join(scratch, "empty")
        os.mkdir(mnt)
        os.mkdir(empty)
        lower = lowers_of(tree, layer_id)
        layers = [f"{layer_id}/diff"] + ([lower] if lower else []) + [empty]
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", "ro,lowerdir=" + ":".join(layers), mnt],
                       cwd=tree, check=True, capture_output=True)
        try:
            yield mnt
        finally:
            subprocess.run(["umount", mnt], check=True)
