"""The two state machines, declared as data (pytransitions).

A layer moves ``discovered → linked → whiteouts-converted → lowers-written → committed``; the run moves through
its phases.  Only the moves declared here exist (``auto_transitions=False``).  Each transition's ``before``
callback does the filesystem work and makes it durable; its ``after`` callback records the new state.  If the
work raises, transitions leaves the state where it was and nothing is recorded; if the recording fails, the
database still holds the old state and the work is redone, idempotently, on the next start.
"""

from __future__ import annotations

from typing import Dict

from transitions import Machine

LAYER_STATES = ["discovered", "linked", "whiteouts-converted", "lowers-written", "committed"]

LAYER_TRANSITIONS = [
    {"trigger": "link", "source": "discovered", "dest": "linked",
     "before": "build_tree", "after": "record_state"},
    {"trigger": "convert_whiteouts", "source": "linked", "dest": "whiteouts-converted",
     "before": "convert_whiteouts_in_tree", "after": "record_state"},
    {"trigger": "write_lowers", "source": "whiteouts-converted", "dest": "lowers-written",
     "before": "write_lower_files", "after": "record_state"},
    {"trigger": "commit", "source": "lowers-written", "dest": "committed",
     "before": "write_committed_marker", "after": "record_state"},
]

# The one trigger that leads out of each non-final layer state.
LAYER_NEXT: Dict[str, str] = {t["source"]: t["trigger"] for t in LAYER_TRANSITIONS}

PHASES = ["converting", "switching", "completed", "cleaning", "cleaned", "rolling-back", "rolled-back"]

PHASE_TRANSITIONS = [
    {"trigger": "start_switching", "source": "converting", "dest": "switching",
     "conditions": "all_layers_committed", "after": "record_phase"},
    {"trigger": "finish_switching", "source": "switching", "dest": "completed",
     "before": "switch_to_overlay2", "after": "record_phase"},
    {"trigger": "start_cleanup", "source": "completed", "dest": "cleaning", "after": "record_phase"},
    {"trigger": "finish_cleanup", "source": "cleaning", "dest": "cleaned",
     "before": "remove_aufs_data", "after": "record_phase"},
    {"trigger": "start_rollback", "source": ["converting", "switching", "completed"], "dest": "rolling-back",
     "after": "record_phase"},
    {"trigger": "finish_rollback", "source": "rolling-back", "dest": "rolled-back",
     "before": "undo_migration", "after": "record_phase"},
]

# Phases from which rollback can start without --force / needs --force.
ROLLBACK_FREE = ("converting", "switching")
ROLLBACK_FORCED = ("completed",)


def layer_machine() -> Machine:
    """One machine shared by all layer models (cheap for thousands of layers: add_model/remove_model)."""
    return Machine(model=None, states=LAYER_STATES, transitions=LAYER_TRANSITIONS,
                   initial="discovered", auto_transitions=False)


def phase_machine(model: object, phase: str) -> Machine:
    return Machine(model=model, states=PHASES, transitions=PHASE_TRANSITIONS,
                   initial=phase, auto_transitions=False)
