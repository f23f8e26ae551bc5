"""The two state machines, declared as data (pytransitions).

A layer moves ``discovered → linked → whiteouts-converted → lowers-written → committed``; the run moves through
its phases.  Only the moves declared here exist (``auto_transitions=False``).  Each transition's ``before``
callback does the filesystem work and makes it durable; its ``after`` callback records the new state.  If the
work raises, transitions leaves the state where it was and nothing is recorded; if the recording fails, the
database still holds the old state and the work is redone, idempotently, on the next start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict

if TYPE_CHECKING:
    from transitions import Machine

# Layer states, in the order a layer goes through them.
DISCOVERED = "discovered"
LINKED = "linked"
WHITEOUTS_CONVERTED = "whiteouts-converted"
LOWERS_WRITTEN = "lowers-written"
COMMITTED = "committed"
LAYER_STATES = [DISCOVERED, LINKED, WHITEOUTS_CONVERTED, LOWERS_WRITTEN, COMMITTED]

# Layer triggers.
LINK = "link"
CONVERT_WHITEOUTS = "convert_whiteouts"
WRITE_LOWERS = "write_lowers"
COMMIT = "commit"

LAYER_TRANSITIONS = [
    {"trigger": LINK, "source": DISCOVERED, "dest": LINKED,
     "before": "build_tree", "after": "record_state"},
    {"trigger": CONVERT_WHITEOUTS, "source": LINKED, "dest": WHITEOUTS_CONVERTED,
     "before": "convert_whiteouts_in_tree", "after": "record_state"},
    {"trigger": WRITE_LOWERS, "source": WHITEOUTS_CONVERTED, "dest": LOWERS_WRITTEN,
     "before": "write_lower_files", "after": "record_state"},
    {"trigger": COMMIT, "source": LOWERS_WRITTEN, "dest": COMMITTED,
     "before": "write_committed_marker", "after": "record_state"},
]

# The one trigger that leads out of each non-final layer state, in the order of the states.
LAYER_NEXT: Dict[str, str] = {t["source"]: t["trigger"] for t in LAYER_TRANSITIONS}
# Every method the transitions call on a layer's model: each strategy's task must have them all.
LAYER_CALLBACKS = tuple(dict.fromkeys(t[k] for t in LAYER_TRANSITIONS for k in ("before", "after")))

# Run phases.  ``staging`` is a run made by ``stage`` while the engine runs: its layers go to the staging
# area; the cutover (``run``) replaces it by a new run that starts ``converting`` with what it kept.
STAGING = "staging"
CONVERTING = "converting"
SWITCHING = "switching"
COMPLETED = "completed"
CLEANING = "cleaning"
CLEANED = "cleaned"
ROLLING_BACK = "rolling-back"
ROLLED_BACK = "rolled-back"
PHASES = [STAGING, CONVERTING, SWITCHING, COMPLETED, CLEANING, CLEANED, ROLLING_BACK, ROLLED_BACK]

PHASE_TRANSITIONS = [
    {"trigger": "start_switching", "source": CONVERTING, "dest": SWITCHING,
     "conditions": "all_layers_committed", "after": "record_phase"},
    {"trigger": "finish_switching", "source": SWITCHING, "dest": COMPLETED,
     "before": "switch_to_overlay2", "after": "record_phase"},
    {"trigger": "start_cleanup", "source": COMPLETED, "dest": CLEANING, "after": "record_phase"},
    {"trigger": "finish_cleanup", "source": CLEANING, "dest": CLEANED,
     "before": "remove_aufs_data", "after": "record_phase"},
    {"trigger": "start_rollback", "source": [STAGING, CONVERTING, SWITCHING, COMPLETED], "dest": ROLLING_BACK,
     "after": "record_phase"},
    {"trigger": "finish_rollback", "source": ROLLING_BACK, "dest": ROLLED_BACK,
     "before": "undo_migration", "after": "record_phase"},
]

# Phases from which rollback can start without --force / needs --force; phases past the conversion.
ROLLBACK_FREE = (STAGING, CONVERTING, SWITCHING)
ROLLBACK_FORCED = (COMPLETED,)
FINISHED = (COMPLETED, CLEANING, CLEANED)

# Container states: found on aufs and to switch, or left alone (dead, without a config); then switched, and
# on rollback restored, or gone (removed by the engine since).
PENDING = "pending"
SKIPPED = "skipped"
SWITCHED = "switched"
RESTORED = "restored"
GONE = "gone"


def layer_machine() -> "Machine":
    """One machine for a batch's waves (``strategies/runner.Wave``: the model is a wave of layers at one state,
    so thousands of layers cost a trigger per wave, not one per layer)."""
    from transitions import Machine  # here, so that the names above cost no import

    return Machine(model=None, states=LAYER_STATES, transitions=LAYER_TRANSITIONS,
                   initial=DISCOVERED, auto_transitions=False)


def phase_machine(model: object, phase: str) -> "Machine":
    from transitions import Machine

    return Machine(model=model, states=PHASES, transitions=PHASE_TRANSITIONS,
                   initial=phase, auto_transitions=False)
