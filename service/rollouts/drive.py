"""After a rollout's transaction commits: send the jobs it created, schedule its wake-up.

Every process that advances a rollout (API, worker, sweeper) ends with
`settle`; `drive` is one advance in its own transaction, then `settle`.
"""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session, sessionmaker

from service.db import autocommit, transaction
from service.jobs.ops import undispatched
from service.jobs.wakeups import Wakeups
from service.queue import Dispatcher
from service.rollouts.coordinator import Advanced, advance

log = logging.getLogger("retort.rollouts")


def member(rollout_id: int) -> str:
    return f"rollout:{rollout_id}"


def settle(
    sessions: sessionmaker[Session],
    dispatcher: Dispatcher,
    wakeups: Wakeups,
    rollout_id: int,
    advanced: Advanced,
) -> None:
    for job_id in advanced.send:
        try:
            dispatcher.send_job(job_id)
        except Exception:  # noqa: BLE001 - the sweeper sends a job left unsent
            log.exception("could not send job %s of rollout %s", job_id, rollout_id)
            try:
                with autocommit(sessions.kw["bind"]) as conn:
                    undispatched(conn, job_id)
            except Exception:  # noqa: BLE001
                log.exception("could not mark job %s as not sent", job_id)
    for batch in advanced.settle:
        try:
            dispatcher.send_settle(rollout_id, batch)
        except Exception:  # noqa: BLE001 - the batch goes the ordinary way once stale
            log.exception("could not send a settle batch of rollout %s", rollout_id)
    if advanced.wake_at is not None:
        wakeups.at(member(rollout_id), advanced.wake_at.timestamp())


def drive(
    sessions: sessionmaker[Session], dispatcher: Dispatcher, wakeups: Wakeups, rollout_id: int
) -> Advanced:
    with transaction(sessions) as s:
        advanced = advance(s, rollout_id)
    settle(sessions, dispatcher, wakeups, rollout_id, advanced)
    return advanced
