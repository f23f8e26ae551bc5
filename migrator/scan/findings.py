"""What a walk of a layer or a layer step found: entries, findings for the operator, directories to convert."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from migrator.formats.overlay2 import reads_as_whiteout


@dataclass
class StepResult:
    """What a step did, for the state record: entries carried over, findings worth reporting, and (link step)
    the directories that hold whiteouts or opaque markers, which the next step converts."""

    entries: int = 0
    findings: List[Tuple[str, str]] = field(default_factory=list)
    whiteout_dirs: List[bytes] = field(default_factory=list)

    def note(self, kind: str, rel: bytes, name: Optional[str] = None) -> None:
        path = rel + (b"/" + os.fsencode(name) if name is not None else b"")
        self.findings.append((kind, (path or b"/").decode("utf-8", "backslashreplace")))

    def note_zero_device(self, entry: os.DirEntry, rel: bytes) -> None:
        """aufs shows a 0/0 character device as a device; overlayfs can only read it as a whiteout: report it.
        (Only entries that are neither files nor symlinks, by ``d_type``, are ``stat``-ed.)"""
        if not entry.is_file(follow_symlinks=False) and not entry.is_symlink():
            if reads_as_whiteout(entry.stat(follow_symlinks=False)):
                self.note("device-0-0-reads-as-whiteout", rel, entry.name)
