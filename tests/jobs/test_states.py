"""Job states: one StrEnum, the strings stored and sent; the groups the code asks about."""

import json

from service.jobs.states import (
    ACTIVE_STATES,
    BUSY_STATES,
    FAILED_STATES,
    FINAL_STATES,
    JOB_STATES,
    STARTED_STATES,
    JobState,
)


def test_states_are_the_strings_of_the_wire_and_the_rows():
    assert JOB_STATES == (
        "queued",
        "waiting_for_lock",
        "waiting_for_approval",
        "running",
        "succeeded",
        "failed",
        "cancelled",
    )
    assert JobState.RUNNING == "running" and f"{JobState.RUNNING}" == "running"
    assert json.dumps({"state": JobState.WAITING_FOR_LOCK}) == '{"state": "waiting_for_lock"}'


def test_the_groups():
    assert set(BUSY_STATES) | set(FINAL_STATES) == set(JobState)
    assert not set(BUSY_STATES) & set(FINAL_STATES)
    assert set(ACTIVE_STATES) == set(BUSY_STATES) - {JobState.WAITING_FOR_APPROVAL}
    assert set(FAILED_STATES) == set(FINAL_STATES) - {JobState.SUCCEEDED}
    assert set(STARTED_STATES) < set(ACTIVE_STATES)
