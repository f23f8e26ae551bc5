"""A fast, read-only look at the state database, for ``status``.

``status`` is what fleet tools poll, and must answer in well under 0.3 s even for thousands of layers.
Importing SQLAlchemy alone takes about 0.14 s here, so this one reader uses the standard library's ``sqlite3``
with plain ``SELECT``s.  The column names are the schema's (``migrations_state/schema.py``);
``tests/test_units.py`` reads a database the store wrote, so a renamed column fails a test, not an operator.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any, Dict

from migrations_state.errors import StateDatabaseError, filesystem_hint


def read_status(path: str) -> Dict[str, Any]:
    """The run row, and (id, state, entries, error) of every layer, containers and findings, in order."""
    if not os.path.exists(path):
        raise StateDatabaseError(f"no state database at {path}")
    try:
        conn = sqlite3.connect(path, timeout=5)
    except sqlite3.Error as exc:
        raise StateDatabaseError(f"state database {path} is unreadable: {exc}{filesystem_hint(path)}") from exc
    try:
        conn.row_factory = sqlite3.Row
        run = conn.execute("SELECT * FROM run WHERE id = 1").fetchone()  # a schema-2 database has no cutover time
        if run is None:
            raise StateDatabaseError(f"state database {path} holds no migration")
        layers = [tuple(r) for r in conn.execute("SELECT id, state, entries, error FROM layer ORDER BY seq")]
        containers = [tuple(r) for r in conn.execute("SELECT id, state, note FROM container ORDER BY id")]
        findings = [tuple(r) for r in conn.execute("SELECT kind, layer_id, detail FROM finding ORDER BY id")]
    except sqlite3.Error as exc:
        raise StateDatabaseError(f"state database {path} is unreadable: {exc}{filesystem_hint(path)}") from exc
    finally:
        conn.close()
    return {"run": dict(run, cutover_seconds=run["cutover_seconds"] if "cutover_seconds" in run.keys() else None),
            "layers": layers, "containers": containers, "findings": findings}
