"""What the operator asked for: one record, built once by the CLI from the command line and passed by name to the
command (``commands.py``), so every command reads the same option under the same name."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional, Sequence

from migrator.procs import DEFAULT_JOBS

DEFAULT_ROOT = "/var/lib/docker"


@dataclass(frozen=True)
class Options:
    root: str = DEFAULT_ROOT
    state_db: Optional[str] = None  # default ROOT/.aufs2overlay/state.db
    strategy: Optional[str] = None  # None: the default for a new migration, the recorded one for a resume
    engine_pidfiles: Optional[Sequence[str]] = None  # None: the default pidfiles
    quiet: bool = False
    log_file: Optional[str] = None
    jobs: int = DEFAULT_JOBS
    engine_config: Optional[str] = None  # run --set-engine-config
    skip_if_rolled_back: bool = False  # run: the boot unit leaves an operator's rollback alone
    accept_missing_storage: bool = False
    content: bool = False  # plan/verify --content
    as_json: bool = False
    force: bool = False  # rollback --force
    keep: bool = False  # demo --keep
    nice: bool = True  # stage: lowest CPU and I/O priority (--no-nice to keep the caller's)

    def __post_init__(self) -> None:
        """An option record names a known strategy, whoever built it (the CLI's choices, a test, a script)."""
        from migrator.strategies import registry

        registry.check_name(self.strategy)

    @classmethod
    def from_args(cls, args: Any) -> "Options":
        """The options a parsed command line holds (an option a command does not take keeps its default)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})
