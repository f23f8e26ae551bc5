"""What a walk of a layer or a layer step found: entries, findings for the operator, directories to convert."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional, Set, Tuple

from migrator.formats import aufs
from migrator.formats.overlay2 import reads_as_whiteout


@dataclass
class StepResult:
    """What a step did, for the state record: entries carried over, findings worth reporting, and (link step)
    the directories that hold whiteouts or opaque markers, which the next step converts."""

    entries: int = 0
    findings: List[Tuple[str, str]] = field(default_factory=list)
    whiteout_dirs: List[bytes] = field(default_factory=list)
    plinks: Set[int] = field(default_factory=set, repr=False)  # a writable layer's (``aufs.pseudo_link_inodes``)

    def note(self, kind: str, rel: bytes, name: Optional[str] = None) -> None:
        path = rel + (b"/" + os.fsencode(name) if name is not None else b"")
        self.findings.append((kind, (path or b"/").decode("utf-8", "backslashreplace")))

    def marks(self, rel: bytes, image: bool) -> "DirMarks":
        """What the directory ``rel`` holds of aufs's, read entry by entry as a walk lists it (``image``: the
        layer is an image's, not a container's own)."""
        return DirMarks(self, rel, image)

    def note_pseudo_link(self, st: os.stat_result, rel: bytes, name: str) -> None:
        """A file of a writable layer that a pseudo-link holds (``aufs.pseudo_link_inodes``): its other names
        in the lower layers show the lower file, as they did in aufs after a remount without ``auplink``."""
        if st.st_ino in self.plinks and st.st_nlink > 1:
            self.note("pseudo-link-not-flushed", rel, name)

    def note_zero_device(self, entry: os.DirEntry, rel: bytes) -> None:
        """aufs shows a 0/0 character device as a device; overlayfs can only read it as a whiteout: report it.
        (Only entries that are neither files nor symlinks, by ``d_type``, are ``stat``-ed.)"""
        if not entry.is_file(follow_symlinks=False) and not entry.is_symlink():
            if reads_as_whiteout(entry.stat(follow_symlinks=False)):
                self.note("device-0-0-reads-as-whiteout", rel, entry.name)


class DirMarks:
    """aufs's marks in one directory of a layer, gathered by a walk (``ordinary`` for each entry listed): its
    opaque marker, the names its whiteouts white out, whether it holds any (the whiteout step's list), and
    the findings of what aufs showed otherwise (``aufs.VIEW_DIFFERS``)."""

    def __init__(self, result: StepResult, rel: bytes, image: bool) -> None:
        self.result = result
        self.rel = rel
        self.image = image
        self.opaque = False
        self.whited: Set[bytes] = set()
        self.whiteouts = False

    def ordinary(self, dir_fd: int, entry: os.DirEntry) -> bool:
        """Whether the walk carries ``entry`` over as an entry of the layer (and enters it, if a directory).
        An aufs internal is left out, but one below an image layer's root that holds data
        (``aufs.keeps_for_tar_split``); whiteouts and opaque markers are left to the whiteout step."""
        name = entry.name
        kind = aufs.whiteout_kind(name)
        if kind is None:
            if len(os.fsencode(name)) > aufs.MAX_NAMELEN:
                self.result.note("name-too-long-for-aufs", self.rel, name)
            return True
        if kind == aufs.INTERNAL:
            if self.image and self.rel and aufs.keeps_for_tar_split(dir_fd, name):
                self.result.note(aufs.FINDING[aufs.KEEP_INTERNAL], self.rel, name)
                return True
            self.result.note(aufs.FINDING[aufs.DROP_INTERNAL], self.rel, name)
            self.whiteouts = True  # the in-place strategy moves it out in the whiteout step
            return False
        self.whiteouts = True
        regular = entry.is_file(follow_symlinks=False)
        if kind == aufs.OPAQUE:
            self.opaque = True
            if not regular:
                self.result.note("opaque-marker-not-a-regular-file", self.rel)
        else:
            target = aufs.whiteout_target(name)
            self.whited.add(os.fsencode(target))
            if not regular:
                self.result.note("whiteout-not-a-regular-file", self.rel, target)
        return False
