"""Running the generator against the oracle: ``explore`` tries ``examples`` roots for one strategy (with a kill
or without), counts what it tried, and on a divergence lets Hypothesis shrink it to a minimal root and raises,
with that root kept in ``Tally.failing`` under the divergence's kind."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Set

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from tests.fuzz import judge, rootgen

EXAMPLES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "examples")


@dataclass
class Tally:
    """What a session tried: roots, their entries and chains, kills, and the divergences' minimal roots."""

    roots: int = 0
    entries: int = 0
    chains: int = 0
    kills: int = 0
    divergences: list = field(default_factory=list)
    failing: dict = field(default_factory=dict)  # kind -> the last root that failed so (after shrinking: minimal)
    known: Set[str] = field(default_factory=set)  # kinds already found: counted, not shrunk again
    known_hits: dict = field(default_factory=dict)


def kind_of(exc: BaseException) -> str:
    """A divergence's kind, for telling a new bug from one already found: what failed and how, without the
    names, ids and numbers of the example."""
    if isinstance(exc, judge.Divergence):
        return exc.kind
    if isinstance(exc, FileNotFoundError) and "/mnt/" in str(exc):
        return "chain view: the mount lists an entry it cannot look up (a whiteout shown in a directory)"
    return f"{type(exc).__name__} in the judge"


def explore(strategy: str, examples: int, crash: bool = False, seed_value: Optional[int] = 0,
            tally: Optional[Tally] = None, shrink: bool = True, max_layers: int = 12, guest=None) -> Tally:
    """Judge ``examples`` generated roots; ``seed_value`` None draws a fresh seed (the long run); ``guest``: the
    real aufs judges too (``judge.judge``)."""
    tally = tally or Tally()
    phases = [Phase.explicit, Phase.generate] + ([Phase.shrink] if shrink else [])

    @settings(max_examples=examples, deadline=None, database=None, phases=phases, print_blob=False,
              suppress_health_check=list(HealthCheck))
    @given(spec=rootgen.roots(max_layers=max_layers), jobs=st.sampled_from([1, 1, 2]),
           kill_fraction=st.floats(0, 0.999) if crash else st.none())
    def one(spec, jobs, kill_fraction):
        try:
            done = judge.judge(spec, strategy, jobs=jobs, kill_fraction=kill_fraction, guest=guest)
        except Exception as exc:  # a divergence, or the oracle tripping over what the migrator made
            kind = kind_of(exc)
            if kind in tally.known:
                tally.known_hits[kind] = tally.known_hits.get(kind, 0) + 1
                return
            tally.failing[kind] = spec
            raise
        tally.roots += 1
        tally.entries += done["entries"]
        tally.chains += done["chains"]
        tally.kills += done["killed_at"] is not None

    if seed_value is not None:
        one = seed(seed_value)(one)
    one()
    return tally
