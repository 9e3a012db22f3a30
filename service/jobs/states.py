"""The states of a job (jobs.state), and the groups of them the code asks about, written once.

A StrEnum: each state is the string stored in the row and sent in JSON, and
compares equal to it, so queries bind plain strings and documents are unchanged.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    QUEUED = "queued"
    # Claimed and waiting for its database's lease (or a project slot: Job.waiting_for).
    WAITING_FOR_LOCK = "waiting_for_lock"
    # Parked: blocking lint findings wait for an approval (no lease, no worker held).
    WAITING_FOR_APPROVAL = "waiting_for_approval"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


# Requested and not parked: a worker has it, or will.
ACTIVE_STATES = (JobState.QUEUED, JobState.WAITING_FOR_LOCK, JobState.RUNNING)
# A job never leaves these.
FINAL_STATES = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)
# Not final: active, or parked for an approval (its database is still in use).
BUSY_STATES = (*ACTIVE_STATES, JobState.WAITING_FOR_APPROVAL)
# Ended without succeeding.
FAILED_STATES = (JobState.FAILED, JobState.CANCELLED)
# Claimed by a worker, that heartbeats it (a lost worker's is recovered by the sweeper).
STARTED_STATES = (JobState.WAITING_FOR_LOCK, JobState.RUNNING)
# Every state, as the strings the API's schemas list.
JOB_STATES = tuple(state.value for state in JobState)
