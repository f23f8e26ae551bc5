"""The strategies, by name: the one place (with the CLI's choices) that names them.

Looking a name up imports nothing heavy; ``get`` imports the strategy's module only when it is needed, so the
CLI can ask ``walks_first`` before SQLAlchemy is imported (``scan/prescan.py``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Dict, NamedTuple

if TYPE_CHECKING:
    from migrator.strategies.base import Strategy


class Registered(NamedTuple):
    module: str
    cls: str
    walks_first: bool  # its conversion starts from a walk of every layer: the CLI starts it early
    frugal: bool  # needs a few inodes and blocks per layer, not per entry: what to suggest on a full disk


DEFAULT = "hardlink"
BESIDE_ENGINE = "hardlink"  # the one that never changes aufs data: ``stage`` runs it beside a serving engine
STRATEGIES: Dict[str, Registered] = {
    "hardlink": Registered("migrator.strategies.hardlink", "HardlinkStrategy", walks_first=False, frugal=False),
    "inplace": Registered("migrator.strategies.inplace", "InPlaceStrategy", walks_first=True, frugal=True),
}
NAMES = tuple(STRATEGIES)


def check_name(name: "str | None") -> None:
    """A strategy asked for by name (None: the default) must be one of ``NAMES``: a usage error otherwise."""
    if name is not None and name not in STRATEGIES:
        from migrator.errors import EXIT_USAGE, MigratorError

        raise MigratorError(f"unknown strategy {name!r}; choose one of {', '.join(NAMES)}", EXIT_USAGE)


def walks_first(name: str) -> bool:
    return name in STRATEGIES and STRATEGIES[name].walks_first


def frugal_alternative(name: str) -> "str | None":
    """The strategy to suggest when ``name`` needs more room than there is (None: ``name`` is the frugal one)."""
    if STRATEGIES[name].frugal:
        return None
    return next((n for n, entry in STRATEGIES.items() if entry.frugal), None)


def every() -> "list[Strategy]":
    """Every strategy (for what must be asked of each: what they may have left on disk)."""
    return [get(name) for name in NAMES]


def get(name: str) -> "Strategy":
    """The strategy called ``name`` (a name from ``NAMES``)."""
    from migrator.strategies.base import undeclared_steps

    entry = STRATEGIES[name]
    strategy = getattr(importlib.import_module(entry.module), entry.cls)()
    missing = undeclared_steps(strategy.task_class)
    if missing:
        raise TypeError(f"strategy {name}: its task {strategy.task_class.__name__} does not define {missing}")
    strategy.name, strategy.walks_first = name, entry.walks_first
    strategy.frugal_alternative = frugal_alternative(name)
    return strategy
