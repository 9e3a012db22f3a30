"""Keep the job table honest when the broker or a worker lets a job down.

The job row is the record of truth. A job still `queued` some seconds after it
was requested may have no message (the broker was down, or lost it on restart):
send it again; the worker's conditional claim makes a duplicate harmless. A job
whose lease expired while it was waiting or running has lost its worker (the
heartbeat stopped): fail it with `worker_lost` and free the lease.
"""

from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from service.audit.ops import record_event
from service.databases.models import Database
from service.db import epoch_now, utcnow
from service.jobs.models import Job
from service.locks import ops as leases
from service.locks.models import Lease
from service.projects.models import Project

log = logging.getLogger("retort.sweeper")


def jobs_to_redispatch(session: Session, older_than_s: float, limit: int = 500) -> list[int]:
    """Return queued jobs never handed to the broker, or last handed over long ago.

    Marks them dispatched now, so the next sweep does not send them again at once.
    """
    cutoff = utcnow() - dt.timedelta(seconds=older_than_s)
    ids = list(
        session.scalars(
            select(Job.id)
            .where(
                Job.state == "queued",
                or_(Job.dispatched_at.is_(None), Job.dispatched_at < cutoff),
                Job.created_at < utcnow() - dt.timedelta(seconds=2),
            )
            .order_by(Job.id)
            .limit(limit)
        )
    )
    if ids:
        session.execute(update(Job).where(Job.id.in_(ids)).values(dispatched_at=utcnow()))
    return ids


def fail_jobs_with_expired_leases(session: Session) -> list[int]:
    """Fail the jobs whose lease expired under them, release those leases."""
    now = epoch_now(session.bind.dialect.name)
    rows = session.execute(
        select(Job, Lease)
        .join(
            Lease,
            and_(
                Lease.database_id == Job.database_id,
                Lease.holder_job_id == Job.id,
                Lease.token == Job.fencing_token,
            ),
        )
        .where(Job.state.in_(("waiting_for_lock", "running")), Lease.expires_at < now)
        .with_for_update(of=Lease)
    ).all()
    failed = []
    for job, lease in rows:
        done = session.execute(
            update(Job)
            .where(Job.id == job.id, Job.state.in_(("waiting_for_lock", "running")))
            .values(
                state="failed",
                finished_at=utcnow(),
                error={
                    "code": "worker_lost",
                    "message": "the worker running this job stopped renewing its lease "
                    "(it crashed or was killed); check the database's current heads "
                    "before retrying",
                    "revision": None,
                    "statement": None,
                },
            )
        ).rowcount
        if not done:
            continue
        leases.release(session, lease.database_id, lease.token)
        db = session.get(Database, job.database_id)
        project = session.get(Project, job.project_id)
        record_event(
            session,
            "job.failed",
            actor="sweeper",
            project=project.name,
            database=db.name,
            job_id=job.id,
            fencing_token=lease.token,
            data={"code": "worker_lost"},
        )
        failed.append(job.id)
    return failed
