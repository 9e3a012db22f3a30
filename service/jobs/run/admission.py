"""A job that cannot run now gives its worker slot back: it is parked, and sent again when it can.

Two things make a claimed job wait: another job holds its database's lease,
or its project already runs `settings.max_running_jobs` jobs. Either way the
job is parked (`waiting_for_lock` with no worker, `waiting_for` saying why)
in the transaction that found it must wait, and its worker takes the next
message. The job that ends wakes its waiters after its last commit
(`wake_waiters`); a wake-up in Redis covers what no ending announces (the
holder's lease expiring, the wait's timeout); the sweeper's rounds cover a
lost one. A woken job is claimed again as if new: a duplicate message finds
it claimed or running and does nothing.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from service.audit.actions import AuditAction
from service.db import autocommit, transaction, utcnow
from service.jobs.models import Job
from service.jobs.run.context import JobContext
from service.jobs.run.transitions import update_job
from service.jobs.states import JobState
from service.projects.models import Project

LEASE = "lease"
PROJECT_SLOT = "project_slot"
# A wake-up this long after the holder's lease expiry: it has surely expired then.
EXPIRY_MARGIN_S = 0.1

_jobs = Job.__table__
PARKED = and_(_jobs.c.state == JobState.WAITING_FOR_LOCK, _jobs.c.worker.is_(None))
# The project's jobs that hold a worker: running, or claimed (a worker has them).
_HOLDING = or_(
    _jobs.c.state == JobState.RUNNING,
    and_(_jobs.c.state == JobState.WAITING_FOR_LOCK, _jobs.c.worker.is_not(None)),
)


def running_limit(settings: dict[str, Any]) -> int | None:
    limit = settings.get("max_running_jobs")
    return limit if isinstance(limit, int) and limit > 0 else None


def _holding(s: Session, project_id: int, but: int | None = None) -> int:
    query = select(func.count()).where(_jobs.c.project_id == project_id, _HOLDING)
    if but is not None:
        query = query.where(_jobs.c.id != but)
    return s.scalar(query) or 0


def project_full(s: Session, ctx: JobContext) -> bool:
    """Whether the project already runs its limit of jobs (the project row locked)."""
    limit = running_limit(ctx.settings)
    if limit is None:
        return False
    s.execute(select(Project.id).where(Project.id == ctx.project_id).with_for_update())
    return _holding(s, ctx.project_id, but=ctx.job_id) >= limit


def _since(value: dt.datetime | None) -> dt.datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value


def park(
    s: Session,
    ctx: JobContext,
    waiting_for: str,
    holder: int | None,
    before: tuple[str | None, int | None],
    since: dt.datetime | None,
) -> float:
    """Park the claimed job in the caller's transaction; return when to wake it (epoch s)."""
    now = utcnow()
    since = _since(since) or now
    update_job(
        s,
        ctx.job_id,
        (JobState.WAITING_FOR_LOCK,),
        worker=None,
        claim_expires_at=None,
        fencing_token=None,
        dispatched_at=None,
        waiting_for=waiting_for,
        waiting_on_job_id=holder,
        waiting_since=since,
    )
    if (waiting_for, holder) != before:
        ctx.audit(s, AuditAction.JOB_PARKED, {"waiting_for": waiting_for, "holder": holder})
    timeout_at = since.timestamp() + ctx.config.lock_wait_timeout_s
    if waiting_for == PROJECT_SLOT:
        # Woken by the project's next ending job; this only covers a lost wake-up.
        return time.time() + ctx.config.lease_ttl_s
    return timeout_at


def lease_wake_at(expires_at: float | None, timeout_at: float) -> float:
    if expires_at is None:
        return time.time()
    return min(expires_at + EXPIRY_MARGIN_S, timeout_at)


def timed_out(since: dt.datetime | None, timeout_s: float) -> bool:
    since = _since(since)
    return since is not None and (utcnow() - since).total_seconds() > timeout_s


def waited_ms(since: dt.datetime | None) -> int | None:
    since = _since(since)
    if since is None:
        return None
    return max(0, int((utcnow() - since).total_seconds() * 1000))


def wake_waiters(ctx: JobContext) -> list[int]:
    """The parked jobs that may run now that this job ended: its database's oldest,
    and (with a running limit) the project's oldest, as many as slots are free."""
    engine = ctx.sessions.kw["bind"]
    with autocommit(engine) as conn:
        ids = list(
            conn.execute(
                select(_jobs.c.id)
                .where(_jobs.c.database_id == ctx.database_id, PARKED)
                .order_by(_jobs.c.id)
                .limit(1)
            ).scalars()
        )
    limit = running_limit(ctx.settings)
    if limit is not None:
        with transaction(ctx.sessions) as s:
            # Locked as project_full locks it: a job parking meanwhile is seen.
            s.execute(select(Project.id).where(Project.id == ctx.project_id).with_for_update())
            free = limit - _holding(s, ctx.project_id)
            if free > 0:
                ids += [
                    i
                    for i in s.scalars(
                        select(_jobs.c.id)
                        .where(
                            _jobs.c.project_id == ctx.project_id,
                            PARKED,
                            _jobs.c.waiting_for == PROJECT_SLOT,
                        )
                        .order_by(_jobs.c.id)
                        .limit(free)
                    )
                    if i not in ids
                ]
    return ids
