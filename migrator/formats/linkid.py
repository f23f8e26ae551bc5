"""overlay2 link ids: 26 base32 characters, as dockerd's ``generateID(16)`` makes them."""

from __future__ import annotations

import base64
import os
import re
from typing import List

LINK_ID_RE = re.compile(r"^[A-Z2-7]{26}$")


def new_link_id() -> str:
    return base64.b32encode(os.urandom(16)).decode("ascii").rstrip("=")


def new_link_ids(n: int) -> List[str]:
    """``n`` distinct link ids (a collision of 128 random bits is not expected, but is still ruled out)."""
    seen: set = set()
    ids: List[str] = []
    while len(ids) < n:
        link = new_link_id()
        if link not in seen:
            seen.add(link)
            ids.append(link)
    return ids
