"""Errors of the state database, and what the filesystem lacks when SQLite says only that it failed."""

from __future__ import annotations

import os


class StateDatabaseError(Exception):
    """The state database is missing a run, unreadable, or from another schema."""


def filesystem_hint(path: str) -> str:
    """Why SQLite may have failed where it says only "unable to open database file"."""
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(path)))
    except OSError:
        return ""
    if st.f_flag & os.ST_RDONLY:
        return " (the filesystem is read-only)"
    if st.f_bavail == 0:
        return " (no space left on the filesystem)"
    if st.f_favail == 0:
        return " (no free inodes left on the filesystem)"
    return ""
