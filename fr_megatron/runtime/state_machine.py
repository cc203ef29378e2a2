"""The recovery state machine of one rank: RUNNING → ABORTING → REBUILDING → SYNCING → RUNNING.

Each transition is logged with rank, generation and step, and timed: the durations become the
``phases`` of the recovery report (abort, rebuild, restore, resume).
"""

from __future__ import annotations

import enum
import logging
import time

log = logging.getLogger("fr_megatron.runtime")


class State(str, enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    ABORTING = "aborting"        # in-flight communication failed or was aborted; waiting for the plan
    REBUILDING = "rebuilding"    # old world destroyed, new generation's groups being built
    SYNCING = "syncing"          # agreeing on the recovery point, restoring state from peers
    FINISHED = "finished"


ALLOWED = {
    State.STARTING: {State.RUNNING, State.SYNCING, State.ABORTING},
    State.RUNNING: {State.ABORTING, State.FINISHED},
    State.ABORTING: {State.REBUILDING},
    State.REBUILDING: {State.SYNCING, State.ABORTING},
    State.SYNCING: {State.RUNNING, State.ABORTING},
    State.FINISHED: set(),
}

# which report phase each state's time counts towards
PHASE_OF = {State.ABORTING: "abort", State.REBUILDING: "rebuild", State.SYNCING: "restore"}


class RecoveryStateMachine:
    def __init__(self, rank: int, on_change=None):
        self.rank = rank
        self.on_change = on_change  # e.g. send a heartbeat now
        self.state = State.STARTING
        self.since = time.monotonic()
        self.phases: dict[str, float] = {}

    def to(self, new: State, generation: int, step: int) -> None:
        if new not in ALLOWED[self.state]:
            raise RuntimeError(f"illegal recovery transition {self.state.value} -> {new.value}")
        now = time.monotonic()
        phase = PHASE_OF.get(self.state)
        if phase:
            self.phases[phase] = self.phases.get(phase, 0.0) + now - self.since
        log.info("rank=%d generation=%d step=%d phase=%s state %s -> %s", self.rank, generation,
                 step, phase or "-", self.state.value, new.value)
        self.state, self.since = new, now
        if self.on_change:
            self.on_change()

    def take_phases(self) -> dict[str, float]:
        p, self.phases = self.phases, {}
        return p
