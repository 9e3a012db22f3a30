"""Ending a job by hand: cancel one not yet running, or end one no worker runs."""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.audit.actions import AuditAction
from service.audit.ops import record_event
from service.databases.models import Database
from service.db import epoch_now, utcnow
from service.errors import ConflictError
from service.jobs.models import Job
from service.jobs.ops import get_job
from service.jobs.states import JobState
from service.locks import ops as leases
from service.locks.models import Lease
from service.principal import Principal
from service.projects.models import Project


def cancel_job(session: Session, job_id: int, actor: str, who: Principal | None = None) -> Job:
    """Cancel a queued or waiting job, or end a started job that no worker runs.

    A `running` job whose worker still renews its lease is refused (a live
    migration is never cut off). One whose lease expired, or passed to another
    job, has no worker that can write for it any more (the fence refuses it):
    it is failed with `abandoned`, so an admin can always end it, even with no
    sweeper running.
    """
    job = get_job(session, job_id, who)
    done = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.state.in_(
                (JobState.QUEUED, JobState.WAITING_FOR_LOCK, JobState.WAITING_FOR_APPROVAL)
            ),
        )
        .values(state=JobState.CANCELLED, finished_at=utcnow())
    ).rowcount
    db = session.get(Database, job.database_id)
    project = session.get(Project, job.project_id)
    if not done:
        if job.state != JobState.RUNNING:
            raise ConflictError(
                f"job {job_id} is {job.state}: only a queued, waiting or abandoned running "
                "job can be cancelled",
                {"job": job_id, "state": job.state},
                code="not_cancellable",
            )
        _end_abandoned(session, job, db, project, actor)
        session.refresh(job)
        return job
    session.refresh(job)
    record_event(
        session,
        AuditAction.JOB_CANCELLED,
        actor=actor,
        project=project.name,
        database=db.name,
        job_id=job.id,
    )
    return job


def _end_abandoned(session: Session, job: Job, db: Database, project: Project, actor: str):
    """Fail a running job whose worker holds no live lease; 409 while it does."""
    lease = session.execute(
        select(Lease).where(Lease.database_id == db.id).with_for_update()
    ).scalar_one_or_none()
    now = float(session.scalar(select(epoch_now(session.bind.dialect.name))))
    holds = lease is not None and lease.holder_job_id == job.id and lease.token == job.fencing_token
    if holds and lease.expires_at is not None and lease.expires_at >= now:
        raise ConflictError(
            f"job {job.id} is running on {job.worker}, which renewed its lease "
            f"{lease.expires_at - now:.0f} s before it expires: a live migration is not cut "
            "off. Wait for it, or stop its worker (SIGTERM hands the job over after the "
            "shutdown grace)",
            {
                "job": job.id,
                "state": job.state,
                "worker": job.worker,
                "expires_in_s": round(lease.expires_at - now, 1),
            },
            code="not_cancellable",
        )
    if holds:
        why = f"its lease expired {now - lease.expires_at:.0f} s ago (its worker is gone)"
        leases.release(session, db.id, lease.token)
    elif lease is not None and lease.holder_job_id is not None:
        why = f"job {lease.holder_job_id} holds the database's lease now"
    else:
        why = "no job holds the database's lease"
    error = {
        "code": "abandoned",
        "message": f"{actor} ended this job: no worker runs it ({why}). Its steps show "
        "what it recorded; a step its worker committed in its last moment may be missing "
        "there, so check the database's current heads before retrying",
        "revision": None,
        "statement": None,
    }
    ended = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.state == JobState.RUNNING)
        .values(state=JobState.FAILED, finished_at=utcnow(), claim_expires_at=None, error=error)
    ).rowcount
    if not ended:  # it ended on its own meanwhile
        return

    def audit(event: str, data: dict) -> None:
        record_event(
            session,
            event,
            actor=actor,
            project=project.name,
            database=db.name,
            job_id=job.id,
            fencing_token=job.fencing_token if event == AuditAction.LEASE_UNLOCKED else None,
            data=data,
        )

    if holds:
        audit(AuditAction.LEASE_UNLOCKED, {"job": job.id, "fencing_token": job.fencing_token})
    audit(AuditAction.JOB_FAILED, {"code": "abandoned"})
