"""Jobs: migration requests, their state and their steps."""

from __future__ import annotations

import base64
import re
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.audit.ops import record_event
from service.bundles.models import Bundle
from service.bundles.ops import get_bundle
from service.databases.models import Database
from service.databases.ops import get_database
from service.db import iso, utcnow
from service.errors import ConflictError, InvalidError, NotFoundError
from service.jobs.models import ACTIVE_STATES, Job, JobStep
from service.jobs.schemas import JobCreate, JobList
from service.jobs.targets import check_target
from service.jobs.watch import progress_key
from service.locks.models import Lease
from service.principal import Principal
from service.projects.models import Project

_RELATIVE = re.compile(r"[+-]\d+$")
# Ids are 64-bit signed in the state database; a larger one cannot exist.
MAX_ID = 2**63


def create_job(
    session: Session, body: JobCreate, actor: str, who: Principal | None = None
) -> tuple[Job, bool]:
    """Queue a migration, or attach to an identical one still waiting to start.

    Returns the job and whether the request was coalesced into an existing one.
    Twenty pipelines asking for the same `upgrade head` queue one migration: a
    pending job with the same database, action, absolute target and bundle
    takes the later requests, and all of them see its outcome. Relative targets
    (`+1`) never coalesce: two requests for one more step mean two steps.
    """
    db = get_database(session, body.database, who)
    project = session.get(Project, db.project_id)
    bundle = get_bundle(session, project, body.bundle or "latest")
    target = check_target(bundle, body.action, body.target)
    if body.coalesce and not _RELATIVE.search(target):
        # Serialize requests for one database so two of them cannot both miss
        # the pending job (SQLite's BEGIN IMMEDIATE already serializes).
        session.execute(select(Database.id).where(Database.id == db.id).with_for_update())
        # Only the newest active job of the database: attaching to an older one
        # would report its outcome while a later job may undo it.
        newest = session.scalar(
            select(Job)
            .where(Job.database_id == db.id, Job.state.in_(ACTIVE_STATES))
            .order_by(Job.id.desc())
            .limit(1)
        )
        pending = (
            newest
            if newest is not None
            and newest.state in ("queued", "waiting_for_lock")
            and (newest.action, newest.target, newest.bundle_pk) == (body.action, target, bundle.pk)
            else None
        )
        if pending is not None:
            record_event(
                session,
                "job.coalesced",
                actor=actor,
                project=project.name,
                database=db.name,
                job_id=pending.id,
                data={"action": body.action, "target": target, "bundle": bundle.digest},
            )
            return pending, True
    job = Job(
        database_id=db.id,
        project_id=project.id,
        bundle_pk=bundle.pk,
        action=body.action,
        target=target,
        state="queued",
        requested_by=actor,
    )
    session.add(job)
    session.flush()
    record_event(
        session,
        "job.requested",
        actor=actor,
        project=project.name,
        database=db.name,
        job_id=job.id,
        data={"action": job.action, "target": job.target, "bundle": bundle.digest},
    )
    return job, False


def mark_dispatched(session: Session, job_id: int) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(dispatched_at=utcnow()))


def get_job(session: Session, job_id: int, who: Principal | None = None) -> Job:
    job = session.get(Job, job_id) if 0 < job_id < MAX_ID else None
    if job is not None and who is not None and not who.everywhere:
        if not who.sees(session.get(Project, job.project_id).name):
            job = None
    if job is None:
        raise NotFoundError(f"no job {job_id}", {"job": job_id})
    return job


def encode_cursor(value: int) -> str:
    return base64.urlsafe_b64encode(str(value).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        value = int(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode())
    except (ValueError, UnicodeDecodeError):
        value = -1
    if not 0 < value < MAX_ID:
        raise InvalidError("cursor is not one this server gave out", {"field": "cursor"})
    return value


def list_jobs(
    session: Session, params: JobList, who: Principal | None = None
) -> tuple[list[Job], str | None]:
    """Return one page of jobs, newest first, and the cursor of the next page."""
    query = select(Job)
    if who is not None and not who.everywhere:
        query = query.join(Project, Project.id == Job.project_id).where(
            Project.name.in_(who.projects)
        )
    if params.database:
        db = get_database(session, params.database, who)
        query = query.where(Job.database_id == db.id)
    if params.state:
        query = query.where(Job.state == params.state)
    if params.cursor:
        query = query.where(Job.id < decode_cursor(params.cursor))
    jobs = list(session.scalars(query.order_by(Job.id.desc()).limit(params.limit + 1)))
    more = len(jobs) > params.limit
    jobs = jobs[: params.limit]
    return jobs, encode_cursor(jobs[-1].id) if more else None


def cancel_job(session: Session, job_id: int, actor: str, who: Principal | None = None) -> Job:
    job = get_job(session, job_id, who)
    done = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state.in_(("queued", "waiting_for_lock")))
        .values(state="cancelled", finished_at=utcnow())
    ).rowcount
    if not done:
        raise ConflictError(
            f"job {job_id} is {job.state}: only a queued or waiting job can be cancelled",
            {"job": job_id, "state": job.state},
            code="not_cancellable",
        )
    session.refresh(job)
    db = session.get(Database, job.database_id)
    project = session.get(Project, job.project_id)
    record_event(
        session,
        "job.cancelled",
        actor=actor,
        project=project.name,
        database=db.name,
        job_id=job.id,
    )
    return job


def serialize_job(session: Session, job: Job, with_steps: bool = True) -> dict[str, Any]:
    db = session.get(Database, job.database_id)
    project = session.get(Project, job.project_id)
    bundle = session.get(Bundle, job.bundle_pk)
    out: dict[str, Any] = {
        "id": job.id,
        "database": db.name,
        "project": project.name,
        "bundle": bundle.digest,
        "action": job.action,
        "target": job.target,
        "state": job.state,
        "attempt": job.attempt,
        "from_heads": job.from_heads,
        "to_heads": job.to_heads,
        "error": job.error,
        "lock": {
            "fencing_token": job.fencing_token,
            "waited_ms": job.lock_waited_ms,
        },
        "requested_by": job.requested_by,
        "worker": job.worker,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
    }
    if job.state == "waiting_for_lock":
        lease = session.get(Lease, job.database_id)
        holder = job.waiting_on_job_id or (lease.holder_job_id if lease else None)
        out["lock"]["held_by_job"] = holder if holder != job.id else None
    if with_steps:
        steps = session.scalars(
            select(JobStep).where(JobStep.job_id == job.id).order_by(JobStep.id)
        )
        out["steps"] = [serialize_step(s) for s in steps]
    return out


def serialize_step(step: JobStep) -> dict[str, Any]:
    return {
        "revisions": step.revisions,
        "direction": step.direction,
        "state": step.state,
        "message": step.message,
        "started_at": iso(step.started_at),
        "finished_at": iso(step.finished_at),
        "duration_ms": round(step.duration_ms, 3),
        "sql": step.sql,
        "sha256": step.sha256,
        "fencing_token": step.fencing_token,
    }


def list_history(
    session: Session, database: str, limit: int, cursor: str | None, who: Principal | None = None
) -> tuple[list[dict[str, Any]], str | None]:
    """Return what was applied to a database, newest first: each step, its job and requester."""
    db = get_database(session, database, who)
    query = (
        select(JobStep, Job)
        .join(Job, Job.id == JobStep.job_id)
        .where(Job.database_id == db.id)
        .order_by(JobStep.id.desc())
        .limit(limit + 1)
    )
    if cursor:
        query = query.where(JobStep.id < decode_cursor(cursor))
    rows = session.execute(query).all()
    more = len(rows) > limit
    rows = rows[:limit]
    history = [
        {
            "job": job.id,
            "action": job.action,
            "direction": step.direction,
            "revisions": step.revisions,
            "message": step.message,
            "state": step.state,
            "applied_at": iso(step.finished_at),
            "duration_ms": round(step.duration_ms, 3),
            "requested_by": job.requested_by,
            "fencing_token": step.fencing_token,
            "sha256": step.sha256,
        }
        for step, job in rows
    ]
    return history, encode_cursor(rows[-1][0].id) if more else None


def job_etag(job: dict[str, Any]) -> str:
    """Name a job's visible progress: its state and how many steps it has recorded."""
    return progress_key(job["id"], job["state"], len(job.get("steps") or []))
