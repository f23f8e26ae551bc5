"""Every message the tool can end with, read from its source: the raises of MigratorError (and its kinds) and
StateDatabaseError, and the problems plan and verify report.  For each, its longest fixed piece of text (the
parts between ``{…}`` placeholders), which docs/troubleshooting.md must quote."""

from __future__ import annotations

import ast
import os
import re
from typing import List, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCES = [os.path.join(REPO, pkg) for pkg in ("migrator", "migrations_state")]
RAISED = {"MigratorError", "Refused", "Locked", "StateDatabaseError"}


def _text(node: ast.AST) -> List[str]:
    """The fixed pieces of a (possibly implicitly concatenated) string or f-string argument."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        pieces, current = [], ""
        for value in node.values:
            if isinstance(value, ast.Constant):
                current += value.value
            else:
                pieces.append(current)
                current = ""
        return pieces + [current]
    if isinstance(node, ast.BinOp):
        return _text(node.left) + _text(node.right)
    return []


def messages() -> List[Tuple[str, int, str]]:
    """(file, line, longest fixed piece) of every operator-facing message."""
    found = []
    paths = sorted(os.path.join(top, name) for base in SOURCES for top, _dirs, names in os.walk(base)
                   for name in names if name.endswith(".py"))
    for path in paths:
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            func = node.func
            callee = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            is_problem = callee == "append" and isinstance(func, ast.Attribute) and \
                getattr(func.value, "attr", getattr(func.value, "id", "")) == "problems"
            if callee not in RAISED and not is_problem:
                continue
            pieces = [p.strip(" ;:,.()") for p in _text(node.args[0])]
            longest = max(pieces, key=len, default="")
            if len(longest) >= 8:
                found.append((os.path.relpath(path, REPO), node.lineno, longest))
    return found




KIND = re.compile(r"^[a-z]+(-[a-z0-9]+)+$")


def finding_kinds() -> List[Tuple[str, int, str]]:
    """(file, line, kind) of every finding the tool can record: a hyphenated name given to ``note(…)``, put
    first in a ``(kind, detail)`` pair appended to a list, or a value of ``aufs.FINDING``.  operations.md must
    name each."""
    found = []
    paths = sorted(os.path.join(top, name) for base in SOURCES for top, _dirs, names in os.walk(base)
                   for name in names if name.endswith(".py") and name != "sample.py")
    for path in paths:
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            candidates: List[ast.AST] = []
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "note" and node.args:
                candidates.append(node.args[0])
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "append" and node.args \
                    and isinstance(node.args[0], ast.Tuple) and len(node.args[0].elts) == 2:
                candidates.append(node.args[0].elts[0])
            elif isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "FINDING" for t in node.targets) \
                    and isinstance(node.value, ast.Dict):
                candidates.extend(node.value.values)
            for c in candidates:
                if isinstance(c, ast.Constant) and isinstance(c.value, str) and KIND.match(c.value):
                    found.append((os.path.relpath(path, REPO), c.lineno, c.value))
    return found


def exit_codes() -> List[Tuple[str, int]]:
    """(name, value) of every ``EXIT_*`` code in ``migrator/errors.py``."""
    import importlib

    errors = importlib.import_module("migrator.errors")
    return [(name, value) for name, value in vars(errors).items() if name.startswith("EXIT_")]


if __name__ == "__main__":
    for file, line, text in messages():
        print(f"{file}:{line}: {text}")
