"""``status``: what a migration's state is and what to do next, answered fast.

Fleet tools poll it, so it reads the state database through ``migrations_state.reader`` (the standard
library's sqlite3) and imports nothing of the migrator's machinery, SQLAlchemy included: on 5,000 layers it
answers in about 0.1 s (docs/performance.md).
"""

from __future__ import annotations

import json
import os
from typing import Optional

from migrations_state import reader
from migrations_state.errors import StateDatabaseError
from migrations_state.machine import (
    CLEANED,
    CLEANING,
    COMMITTED,
    COMPLETED,
    CONVERTING,
    ROLLED_BACK,
    ROLLING_BACK,
    STAGING,
    SWITCHING,
)
from migrator.errors import EXIT_IN_PROGRESS, EXIT_OK, EXIT_ROLLED_BACK, EXIT_STATE_LOST, MigratorError
from migrator.formats import aufs
from migrator.paths import Paths

STATE_LOST = "state-lost"

NEXT_STEP = {
    None: "nothing to do",
    STATE_LOST: ("the migration's state is lost: 'aufs2overlay rollback --force' rebuilds the aufs root from what "
                 "is on disk, then 'aufs2overlay run' migrates afresh (docs/recovery.md)"),
    "not-started": "run 'aufs2overlay run' to migrate",
    STAGING: ("the engine may keep running; 'aufs2overlay stage' again stages what it committed since; then "
              "stop the engine and 'aufs2overlay run' (the cutover); or 'aufs2overlay rollback' discards the staging"),
    CONVERTING: "run 'aufs2overlay run' to resume, or 'aufs2overlay rollback' to undo",
    SWITCHING: "run 'aufs2overlay run' to resume, or 'aufs2overlay rollback' to undo",
    COMPLETED: "start the engine with storage-driver overlay2; 'aufs2overlay cleanup' once satisfied",
    CLEANING: "run 'aufs2overlay cleanup' to finish removing the aufs data",
    CLEANED: "nothing to do",
    ROLLING_BACK: "run 'aufs2overlay rollback' to finish the rollback",
    ROLLED_BACK: "the aufs data is as it was; start the engine with aufs, or run again",
}


def status(root: str, state_db: Optional[str] = None, as_json: bool = False) -> int:
    """Show the phase, each layer's state and what to do next."""
    paths = Paths.checked(root, state_db)
    if not os.path.exists(paths.state_db):
        from migrator.formats import snapshot

        snap = snapshot.read_root(paths)
        trees = [tree + "/" for tree in snap.trees_built()]
        if trees and snap.aufs_present:
            phase: Optional[str] = STATE_LOST
        else:
            phase = "not-started" if snap.aufs_present else None
        doc = {"root": paths.root, "phase": phase or "nothing-to-migrate", "strategy": None, "layers": [],
               "containers": [], "findings": [], "last_error": None, "cutover_seconds": None,
               "next": NEXT_STEP[phase]}
        if phase == STATE_LOST:
            doc["last_error"] = (f"no state database at {paths.state_db}, but the root holds a migration's "
                                 f"{', '.join(trees)}")
        code = EXIT_STATE_LOST if phase == STATE_LOST else EXIT_OK
    else:
        try:
            state = reader.read_status(paths.state_db)
        except StateDatabaseError as exc:
            raise MigratorError(f"{exc}; 'rollback --force' restores aufs without it") from None
        run_row = state["run"]
        doc = {
            "root": paths.root,
            "phase": run_row["phase"],
            "strategy": run_row["strategy"],
            "created_at": run_row["created_at"],
            "updated_at": run_row["updated_at"],
            "layers": [{"id": i, "state": st, "entries": n, "error": e} for i, st, n, e in state["layers"]],
            "containers": [{"id": i, "state": st, "note": note} for i, st, note in state["containers"]],
            "findings": [{"kind": k, "layer": lid, "detail": d} for k, lid, d in state["findings"]],
            "last_error": run_row["last_error"],
            "cutover_seconds": run_row["cutover_seconds"],
            "next": NEXT_STEP[run_row["phase"]],
        }
        if run_row["phase"] == STAGING:
            doc["staged"] = {"staged": sum(layer["state"] == COMMITTED for layer in doc["layers"]),
                             "staging": len(doc["layers"]), "root_layers": aufs.count_layers(paths.aufs_diff)}
        code = {COMPLETED: EXIT_OK, CLEANED: EXIT_OK, ROLLED_BACK: EXIT_ROLLED_BACK}.get(
            doc["phase"], EXIT_IN_PROGRESS)
    if as_json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(_status_text(doc))
    return code


def _status_text(doc: dict) -> str:
    lines = [f"root:       {doc['root']}", f"phase:      {doc['phase']}"]
    if doc["layers"]:
        counts: dict = {}
        for layer in doc["layers"]:
            counts[layer["state"]] = counts.get(layer["state"], 0) + 1
        if doc["phase"] == STAGING:
            staged = doc["staged"]
            lines.append(f"staged:     {staged['staged']} of {staged['root_layers']} layers ({staged['staging']} "
                         "in the staging; the rest are converted at the cutover)")
        if doc["phase"] == ROLLED_BACK:  # the states are where the conversion stood; nothing of it is left
            lines.append(f"layers:     {len(doc['layers'])} (rolled back: on aufs as before)")
        else:
            lines.append(f"layers:     {len(doc['layers'])} ("
                         + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + ")")
        for layer in doc["layers"]:
            if layer["error"]:
                lines.append(f"  error in {layer['id']}: {layer['error']}")
    if doc["containers"]:
        counts = {}
        for c in doc["containers"]:
            counts[c["state"]] = counts.get(c["state"], 0) + 1
        lines.append(f"containers: {len(doc['containers'])} ("
                     + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + ")")
    if doc["findings"]:
        lines.append(f"findings:   {len(doc['findings'])} (see --json)")
    if doc.get("cutover_seconds") is not None:
        lines.append(f"cutover:    {doc['cutover_seconds']:.2f} s (the run that completed it, from its start)")
    if doc["last_error"]:
        lines.append(f"last error: {doc['last_error']}")
    lines.append(f"next:       {doc['next']}")
    return "\n".join(lines)


