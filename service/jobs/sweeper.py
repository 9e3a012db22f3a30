"""Keep the job table honest when the broker or a worker lets a job down.

The job row is the record of truth, not the broker's message:

- A job still `queued` with no live message is sent again: at once after the
  broker lost its data (a restart of a Redis that keeps nothing on disk, a
  flush), within seconds when sending it failed (the API then clears its
  `dispatched_at`, set in the commit that created the job), otherwise once it
  has been queued for `redispatch_after_s` (an API process killed between its
  commit and its send). The worker's conditional claim makes a duplicate
  message harmless.
- A job whose worker stopped (its lease expired, or its claim expired while it
  waited for the lease) is handed over: queued again as its next attempt, which
  re-reads the target's current heads and goes on from there, or failed with
  `worker_lost` once `max_attempts` are spent.
"""

from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from service.audit.actions import AuditAction
from service.audit.ops import record_event
from service.databases.models import Database
from service.db import epoch_now, utcnow
from service.jobs.models import Job
from service.jobs.states import STARTED_STATES, JobState
from service.locks import ops as leases
from service.locks.models import Lease
from service.projects.models import Project

log = logging.getLogger("retort.sweeper")


def jobs_to_redispatch(
    session: Session,
    older_than_s: float,
    *,
    lost_before: dt.datetime | None = None,
    limit: int = 500,
) -> list[int]:
    """Return queued jobs whose message may be gone; mark them dispatched now.

    Normally: never handed to the broker, or last handed over `older_than_s` ago.
    When the broker lost its data at `lost_before` (or earlier): every queued job
    last handed over before then (call until it returns []).
    """
    now = utcnow()
    cutoff = lost_before or now - dt.timedelta(seconds=older_than_s)
    query = select(Job.id).where(
        Job.state == JobState.QUEUED, or_(Job.dispatched_at.is_(None), Job.dispatched_at < cutoff)
    )
    if lost_before is None:
        query = query.where(Job.created_at < now - dt.timedelta(seconds=2))
    ids = list(session.scalars(query.order_by(Job.id).limit(limit)))
    if ids:
        session.execute(update(Job).where(Job.id.in_(ids)).values(dispatched_at=now))
    return ids


def parked_to_wake(
    session: Session, lease_ttl_s: float, lock_wait_timeout_s: float, limit: int = 500
) -> list[int]:
    """Parked jobs (waiting with no worker) whose wake-up may have been lost; mark them sent.

    Waiting for the lease: the lease is free or expired, or the wait timed out.
    Waiting for a project slot: not sent again for a lease TTL.
    """
    now = utcnow()
    epoch = epoch_now(session.bind.dialect.name)
    quiet = or_(Job.dispatched_at.is_(None), Job.dispatched_at < now - dt.timedelta(seconds=2))
    parked = and_(Job.state == JobState.WAITING_FOR_LOCK, Job.worker.is_(None))
    on_lease = (
        select(Job.id)
        .outerjoin(Lease, Lease.database_id == Job.database_id)
        .where(
            parked,
            quiet,
            Job.waiting_for == "lease",
            or_(
                Lease.holder_job_id.is_(None),
                Lease.expires_at < epoch,
                Job.waiting_since < now - dt.timedelta(seconds=lock_wait_timeout_s),
            ),
        )
    )
    on_slot = select(Job.id).where(
        parked,
        Job.waiting_for == "project_slot",
        or_(
            Job.dispatched_at.is_(None),
            Job.dispatched_at < now - dt.timedelta(seconds=lease_ttl_s),
        ),
        Job.waiting_since < now - dt.timedelta(seconds=lease_ttl_s),
    )
    ids = sorted(
        set(session.scalars(on_lease.limit(limit))) | set(session.scalars(on_slot.limit(limit)))
    )
    if ids:
        session.execute(update(Job).where(Job.id.in_(ids)).values(dispatched_at=now))
    return ids


def recover_lost_jobs(session: Session, max_attempts: int) -> dict[str, list[int]]:
    """Hand over the jobs whose worker stopped: their lease or their claim expired."""
    now = epoch_now(session.bind.dialect.name)
    out: dict[str, list[int]] = {"recovering": [], "failed": []}
    holders = session.execute(
        select(Job.id, Lease.token)
        .join(
            Lease,
            and_(
                Lease.database_id == Job.database_id,
                Lease.holder_job_id == Job.id,
                Lease.token == Job.fencing_token,
            ),
        )
        .where(Job.state.in_(STARTED_STATES), Lease.expires_at < now)
        .with_for_update(of=Lease)
    ).all()
    for job_id, token in holders:
        outcome = hand_over(
            session,
            job_id,
            reason="worker_lost",
            message="the worker running this job stopped renewing its lease "
            "(it crashed, was killed or lost its connections)",
            max_attempts=max_attempts,
            token=token,
        )
        if outcome:
            out[outcome].append(job_id)
    # A started job whose lease another job took over (an expired lease is any
    # waiter's): its worker is gone or fenced out for good, and nothing else
    # would ever end it. Its token is this attempt's while it runs, or waits
    # for the target's lock after the grant (the grant clears claim_expires_at).
    superseded = session.scalars(
        select(Job.id)
        .join(Lease, Lease.database_id == Job.database_id)
        .where(
            Job.fencing_token.is_not(None),
            or_(
                Job.state == JobState.RUNNING,
                and_(Job.state == JobState.WAITING_FOR_LOCK, Job.claim_expires_at.is_(None)),
            ),
            or_(
                Lease.token != Job.fencing_token,
                Lease.holder_job_id.is_(None),
                Lease.holder_job_id != Job.id,
            ),
        )
    ).all()
    for job_id in superseded:
        outcome = hand_over(
            session,
            job_id,
            reason="lease_taken_over",
            message="the lease of the worker running this job expired and another job "
            "took it (the worker crashed, was killed or froze)",
            max_attempts=max_attempts,
        )
        if outcome:
            out[outcome].append(job_id)
    waiting = session.scalars(
        select(Job.id).where(Job.state == JobState.WAITING_FOR_LOCK, Job.claim_expires_at < now)
    ).all()
    for job_id in waiting:
        outcome = hand_over(
            session,
            job_id,
            reason="worker_lost",
            message="the worker that claimed this job stopped while it waited for the lease",
            max_attempts=max_attempts,
            require_claim_expired_before=now,
        )
        if outcome:
            out[outcome].append(job_id)
    return out


def hand_over(
    session: Session,
    job_id: int,
    *,
    reason: str,
    message: str,
    max_attempts: int,
    token: int | None = None,
    actor: str = "sweeper",
    count_attempt: bool = True,
    require_claim_expired_before: float | None = None,
) -> str | None:
    """Queue a started job again as its next attempt, or fail it once attempts are spent.

    `token`: the lease this job holds, released in the same transaction.
    `count_attempt=False`: a hand-over that says nothing about the job (a worker
    shutting down) never uses up its attempts. Returns "recovering", "failed",
    or None when the job had already moved on.
    """
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or job.state not in STARTED_STATES:
        return None
    cond = [Job.id == job_id, Job.state.in_(STARTED_STATES)]
    if require_claim_expired_before is not None:
        cond.append(Job.claim_expires_at < require_claim_expired_before)
    attempt, worker = job.attempt, job.worker
    if count_attempt and attempt >= max_attempts:
        outcome, event = "failed", AuditAction.JOB_FAILED
        values = {
            "state": JobState.FAILED,
            "finished_at": utcnow(),
            "claim_expires_at": None,
            "error": {
                "code": "worker_lost",
                "message": f"{message}; gave up after {attempt} attempt(s). Check the "
                "database's current heads before retrying",
                "revision": None,
                "statement": None,
            },
        }
    else:
        outcome, event = "recovering", AuditAction.JOB_RECOVERING
        values = {
            "state": JobState.QUEUED,
            "attempt": attempt + 1,
            "worker": None,
            "dispatched_at": None,
            "claim_expires_at": None,
            "waiting_on_job_id": None,
        }
    if not session.execute(update(Job).where(*cond).values(**values)).rowcount:
        return None
    db = session.get(Database, job.database_id)
    project = session.get(Project, job.project_id)

    def audit(name: str, data: dict | None = None) -> None:
        record_event(
            session,
            name,
            actor=actor,
            project=project.name,
            database=db.name,
            job_id=job_id,
            fencing_token=token,
            data=data,
        )

    if token is not None and leases.release(session, job.database_id, token):
        audit(AuditAction.LEASE_RELEASED, {"reason": reason})
    data = {"code": reason, "attempt": attempt, "worker": worker, "message": message}
    if outcome == "recovering":
        data["next_attempt"] = attempt + 1
    audit(event, data)
    log.warning("job %s (attempt %s, %s): %s -> %s", job_id, attempt, worker, reason, outcome)
    return outcome
