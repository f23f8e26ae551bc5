"""What a container sees through an aufs chain: the union of layer directories under aufs semantics.

Independent test code, written from aufs's rules, not from the migrator:
- layers are listed topmost first; for each name the topmost layer that has it decides what it is;
- ``.wh.<name>`` in a layer hides ``<name>`` in every layer below it (not in its own layer);
- ``.wh..wh..opq`` in a directory hides that directory's contents in every layer below, but not at a layer's
  root: aufs tests the marker on the directories it looks up (``au_do_lookup`` → ``au_diropq_test`` in
  ``fs/aufs/dentry.c``), and the root is never looked up (its ``di_bdiropq`` stays -1 from ``au_di_init``, so
  lookups and ``readdir`` in it go down to the last branch);
- a directory merges with same-named directories below it until a non-directory of that name is met;
- every ``.wh.``-prefixed name (whiteouts, markers, aufs internals such as ``.wh..wh.plnk``) is invisible.
"""

from __future__ import annotations

import os
import stat
from typing import Dict, List

from tests.support.manifest import Entry, describe

WH = b".wh."
WH_META = b".wh..wh."
OPQ = b".wh..wh..opq"


def aufs_view(layers: List[str]) -> Dict[bytes, Entry]:
    """``{relative path: entry}`` of the merged view of ``layers`` (topmost first), root directory included."""
    roots = [os.fsencode(p) for p in layers]
    view: Dict[bytes, Entry] = {b".": describe(roots[0])}
    pending = [(b"", roots)]
    while pending:
        rel, contributors = pending.pop()
        decided: Dict[bytes, list] = {}
        blocked: set = set()
        for directory in contributors:
            names = sorted(os.listdir(directory))
            whiteouts = {n[len(WH):] for n in names if n.startswith(WH) and not n.startswith(WH_META)}
            for name in names:
                if name.startswith(WH) or name in blocked:
                    continue
                path = os.path.join(directory, name)
                is_dir = stat.S_ISDIR(os.lstat(path).st_mode)
                if name not in decided:
                    decided[name] = [path, is_dir]
                    if not is_dir:
                        blocked.add(name)
                elif is_dir:
                    decided[name].append(path)
                else:
                    blocked.add(name)  # a non-directory below ends the merge of that directory
            blocked |= whiteouts
            if OPQ in names and rel:
                break
        for name, (path, is_dir, *lower_dirs) in decided.items():
            child = os.path.join(rel, name) if rel else name
            view[child] = describe(path)
            if is_dir:
                pending.append((child, [path] + lower_dirs))
    return view
