"""Every location the migrator reads or writes, derived from the engine root."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

WORKDIR = ".aufs2overlay"
STATE_DB = "state.db"
TEMP_TREE = "overlay2.temp"
STAGING = "staging"  # in WORKDIR: named after no storage driver, so no engine ever takes it for one


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

    def __getattr__(self, name: str) -> str:
        rel = _RELATIVE.get(name)
        if rel is None:
            raise AttributeError(name)
        return os.path.join(self.root, *rel)


@dataclass(frozen=True)
class StagingPaths(Paths):
    """The paths of ``stage``: layers are built in ``WORKDIR/staging/``, which the cutover renames to
    ``overlay2.temp/`` (both hold an overlay2-shaped tree whose ``l/`` links are relative to it)."""

    @property
    def temp_tree(self) -> str:
        return self.staging


_RELATIVE = {
    "workdir": (WORKDIR,),
    "lock": (WORKDIR, "lock"),
    "stash": (WORKDIR, "stash"),
    "originals": (WORKDIR, "originals"),
    "aufs": ("aufs",),
    "aufs_diff": ("aufs", "diff"),
    "temp_tree": (TEMP_TREE,),
    "staging": (WORKDIR, STAGING),
    "tree": ("overlay2",),
    "image_dir": ("image",),
    "image_aufs": ("image", "aufs"),
    "image_stage": ("image", "overlay2.temp"),
    "image_overlay2": ("image", "overlay2"),
}
