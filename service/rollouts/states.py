"""The states of a rollout (rollouts.state), written once, as the strings stored and sent.

What a rollout does next: `running` starts jobs; the others start none.
"""

from __future__ import annotations

from enum import StrEnum


class RolloutState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    WAITING_FOR_APPROVAL = "waiting_for_approval"
    HALTED = "halted"
    ABORTED = "aborted"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


# A rollout never leaves these.
FINAL_STATES = (RolloutState.ABORTED, RolloutState.SUCCEEDED, RolloutState.FAILED)
