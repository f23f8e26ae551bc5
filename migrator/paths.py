"""Every location the migrator reads or writes, derived from the engine root."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

# Names below the root: ``Paths`` joins them to it, and a reader holding a descriptor of the root opens them
# relative to it (``formats/snapshot.py``).
WORKDIR = ".aufs2overlay"
STATE_DB = "state.db"
ORIGINALS = os.path.join(WORKDIR, "originals")
STAGING_AREA = os.path.join(WORKDIR, "staging")  # named after no storage driver: no engine takes it for one
STAGED_IMAGE = os.path.join(WORKDIR, "staged-image")  # the image store's copy made by ``stage``
AUFS = "aufs"
AUFS_DIFF = os.path.join(AUFS, "diff")
IMAGE_AUFS = os.path.join("image", "aufs")
TEMP_TREE = "overlay2.temp"
TREE = "overlay2"
IMAGE_TEMP = os.path.join("image", "overlay2.temp")
IMAGE_OVERLAY2 = os.path.join("image", "overlay2")
BUILT_TREES = (STAGING_AREA, STAGED_IMAGE, TEMP_TREE, TREE, IMAGE_TEMP, IMAGE_OVERLAY2)  # in the order a
#                                                                         rollback without state removes them


@dataclass(frozen=True)
class Paths:
    """Every location the migrator reads or writes, derived from the engine root."""

    root: str
    state_db: str

    @classmethod
    def for_root(cls, root: str, state_db: Optional[str] = None) -> "Paths":
        root = os.path.abspath(root)
        return cls(root, os.path.abspath(state_db) if state_db else os.path.join(root, WORKDIR, STATE_DB))

    @classmethod
    def checked(cls, root: str, state_db: Optional[str] = None) -> "Paths":
        """``for_root`` of a root that must be a directory (what every command is given)."""
        if not os.path.isdir(root) or os.path.islink(root):
            from migrator.errors import EXIT_USAGE, MigratorError

            raise MigratorError(f"engine root {root} is not a directory", EXIT_USAGE)
        return cls.for_root(root, state_db)

    def for_staging(self) -> "StagingPaths":
        """The same root, with the tree a conversion builds (``temp_tree``) in the staging area."""
        return StagingPaths(self.root, self.state_db)

    def _at(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    # -- the migrator's work area -------------------------------------------------------------------------

    @property
    def workdir(self) -> str:
        return self._at(WORKDIR)

    @property
    def lock(self) -> str:
        return self._at(WORKDIR, "lock")

    @property
    def stash(self) -> str:
        """The in-place strategy's: the aufs entries it moved out of the layers, by layer."""
        return self._at(WORKDIR, "stash")

    @property
    def originals(self) -> str:
        """The containers' ``config.v2.json`` as found, kept for a rollback without the database."""
        return self._at(ORIGINALS)

    @property
    def staging(self) -> str:
        return self._at(STAGING_AREA)

    @property
    def staged_image(self) -> str:
        """The image store's copy that ``stage`` keeps up to date; the cutover moves it to ``image_temp``."""
        return self._at(STAGED_IMAGE)

    # -- the aufs driver's data ---------------------------------------------------------------------------

    @property
    def aufs(self) -> str:
        return self._at(AUFS)

    @property
    def aufs_diff(self) -> str:
        return self._at(AUFS_DIFF)

    def aufs_layer(self, layer_id: str) -> str:
        """``aufs/diff/<id>``: a layer's aufs data."""
        return self._at(AUFS_DIFF, layer_id)

    @property
    def image_dir(self) -> str:
        return self._at("image")

    @property
    def image_aufs(self) -> str:
        return self._at(IMAGE_AUFS)

    # -- what a migration builds --------------------------------------------------------------------------

    @property
    def temp_tree(self) -> str:
        """The overlay2 tree being built (renamed to ``tree`` by the switch)."""
        return self._at(TEMP_TREE)

    @property
    def tree(self) -> str:
        return self._at(TREE)

    @property
    def image_temp(self) -> str:
        """The copy of the image store being made (renamed to ``image_overlay2`` by the switch)."""
        return self._at(IMAGE_TEMP)

    @property
    def image_overlay2(self) -> str:
        return self._at(IMAGE_OVERLAY2)

    def built_trees(self) -> Tuple[str, ...]:
        """Every tree a migration (or a staging) builds, in the order a rollback without state removes them."""
        return tuple(self._at(name) for name in BUILT_TREES)


@dataclass(frozen=True)
class StagingPaths(Paths):
    """The paths of ``stage``: layers are built in ``WORKDIR/staging/``, which the cutover renames to
    ``overlay2.temp/`` (both hold an overlay2-shaped tree whose ``l/`` links are relative to it)."""

    @property
    def temp_tree(self) -> str:
        return self.staging
