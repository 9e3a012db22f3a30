"""Jobs: migration requests, their state and their steps."""

from __future__ import annotations

import base64
import datetime as dt
from typing import Any, NamedTuple

from sqlalchemy import Connection, Row, Select, and_, bindparam, select, update
from sqlalchemy.orm import Session

from service.audit.actions import AuditAction
from service.audit.ops import record_event
from service.bundles.models import Bundle
from service.bundles.ops import get_bundle
from service.databases.models import Database
from service.databases.ops import get_database
from service.db import iso, utcnow
from service.errors import InvalidError, NotAnApproverError, NotFoundError
from service.jobs import relative
from service.jobs.models import Job, JobStep
from service.jobs.schemas import JobCreate, JobList
from service.jobs.states import ACTIVE_STATES, JobState
from service.jobs.targets import check_target
from service.jobs.watch import progress_key
from service.locks.models import Lease
from service.principal import Principal
from service.projects.models import Project

# Ids are 64-bit signed in the state database; a larger one cannot exist.
MAX_ID = 2**63


class Created(NamedTuple):
    job: Job
    coalesced: bool
    # The new job's document as it commits (what read_job would return), None
    # when the request was coalesced into an existing job.
    document: dict[str, Any] | None


# The database, its project and the project's latest bundle (the one pushed or
# promoted last) in one statement, the database row locked: two requests for
# one database cannot both miss the pending job (SQLite's BEGIN IMMEDIATE
# already serializes), nor one slip in while its registration changes.
_REQUEST_LATEST = (
    select(Database, Project, Bundle)
    .join(Project, Project.id == Database.project_id)
    .outerjoin(Bundle, Bundle.pk == Project.latest_bundle_pk)
    .where(Database.name == bindparam("name"), Database.removed_at.is_(None))
    .with_for_update(of=Database)
)
_REQUEST = (
    select(Database, Project)
    .join(Project, Project.id == Database.project_id)
    .where(Database.name == bindparam("name"), Database.removed_at.is_(None))
    .with_for_update(of=Database)
)


def create_job(
    session: Session,
    body: JobCreate,
    actor: str,
    who: Principal | None = None,
    dispatch: bool = False,
) -> Created:
    """Queue a migration, or attach to an identical one still waiting to start.

    Twenty pipelines asking for the same `upgrade head` queue one migration: a
    pending job with the same database, action, absolute target and bundle
    takes the later requests, and all of them see its outcome. Relative targets
    (`+1`) never coalesce: two requests for one more step mean two steps.

    `dispatch`: the caller sends the job's message right after the commit, so
    the row is marked as handed to the broker now (the caller clears the mark
    if sending fails; see jobs.sweeper).
    """
    ref = body.bundle or "latest"
    row = session.execute(
        _REQUEST_LATEST if ref == "latest" else _REQUEST, {"name": body.database}
    ).first()
    if row is not None and who is not None and not who.sees(row.Project.name):
        row = None
    if row is None:
        raise NotFoundError(f"no database named {body.database!r}", {"database": body.database})
    db, project = row.Database, row.Project
    bundle = row.Bundle if ref == "latest" else None
    if bundle is None:
        bundle = get_bundle(session, project, ref)  # a digest, or the 404 of no bundle yet
    target = check_target(bundle, body.action, body.target)
    if body.allow and who is not None:
        # Allowing in advance is approving.
        check_approver(project, who, "allow blocking lint codes for")
    kind = "plan" if body.dry_run else "migrate"
    options = _options(body)
    if body.coalesce and not relative.from_current(target):
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
            and newest.state in (JobState.QUEUED, JobState.WAITING_FOR_LOCK)
            and (newest.kind, newest.action, newest.target, newest.bundle_pk, newest.options)
            == (kind, body.action, target, bundle.pk, options)
            else None
        )
        if pending is not None:
            record_event(
                session,
                AuditAction.JOB_COALESCED,
                actor=actor,
                project=project.name,
                database=db.name,
                job_id=pending.id,
                data={"action": body.action, "target": target, "bundle": bundle.digest},
            )
            return Created(pending, True, None)
    return insert_job(
        session, db, project, bundle, kind, body.action, target, options, actor, dispatch
    )


def check_approver(project: Project, who: Principal, what: str) -> None:
    """Refuse (403) a token that may not decide on the project's blocking lint findings:
    an admin token may, and the tokens named in its settings.lint.approvers."""
    lint = (project.settings or {}).get("lint") or {}
    if not (who.has_role("admin") or who.name in (lint.get("approvers") or ())):
        raise NotAnApproverError(
            f"{who.name} may not {what} jobs of project {project.name}: an admin token may, "
            "and the tokens named in the project's settings.lint.approvers",
            {"project": project.name, "token": who.name},
        )


def _options(body: JobCreate) -> dict[str, Any] | None:
    """What a request asks besides action and target (None: nothing)."""
    options: dict[str, Any] = {}
    if body.dry_run:
        options["plan_mode"] = body.plan_mode
    if body.allow:
        options["allow"] = body.allow
    return options or None


def insert_job(
    session: Session,
    db: Database,
    project: Project,
    bundle: Bundle,
    kind: str,
    action: str,
    target: str,
    options: dict[str, Any] | None,
    actor: str,
    dispatch: bool,
    rollout_id: int | None = None,
) -> Created:
    now = utcnow()
    job = Job(
        database_id=db.id,
        project_id=project.id,
        bundle_pk=bundle.pk,
        kind=kind,
        action=action,
        target=target,
        options=options,
        state=JobState.QUEUED,
        attempt=1,
        requested_by=actor,
        created_at=now,
        dispatched_at=now if dispatch else None,
        rollout_id=rollout_id,
    )
    session.add(job)
    session.flush()
    record_event(
        session,
        AuditAction.JOB_REQUESTED,
        actor=actor,
        project=project.name,
        database=db.name,
        job_id=job.id,
        data={
            "kind": kind,
            "action": job.action,
            "target": job.target,
            "bundle": bundle.digest,
            **(options or {}),
            **({"rollout": rollout_id} if rollout_id else {}),
        },
    )
    return Created(job, False, _new_document(job, db.name, project.name, bundle.digest))


def create_drift_check(
    session: Session, database: str, actor: str, who: Principal | None = None
) -> Created:
    """Queue a drift check of a database at its current revision, with its project's
    latest bundle (or attach to one still waiting to start)."""
    row = session.execute(_REQUEST_LATEST, {"name": database}).first()
    if row is not None and who is not None and not who.sees(row.Project.name):
        row = None
    if row is None:
        raise NotFoundError(f"no database named {database!r}", {"database": database})
    db, project, bundle = row.Database, row.Project, row.Bundle
    if bundle is None:
        bundle = get_bundle(session, project, "latest")  # the 404 of no bundle yet
    pending = session.scalar(
        select(Job)
        .where(
            Job.database_id == db.id,
            Job.kind == "drift",
            Job.state.in_((JobState.QUEUED, JobState.WAITING_FOR_LOCK)),
        )
        .order_by(Job.id.desc())
        .limit(1)
    )
    if pending is not None:
        return Created(pending, True, None)
    return insert_job(session, db, project, bundle, "drift", "drift", "current", None, actor, True)


def _new_document(job: Job, database: str, project: str, bundle: str) -> dict[str, Any]:
    """A just-inserted job's document, as read_job would read it back."""
    return {
        "id": job.id,
        "database": database,
        "project": project,
        "bundle": bundle,
        "kind": job.kind,
        "action": job.action,
        "target": job.target,
        "state": job.state,
        "attempt": job.attempt,
        "from_heads": None,
        "to_heads": None,
        "error": None,
        "lock": {"fencing_token": None, "waited_ms": None},
        "requested_by": job.requested_by,
        "worker": None,
        "sandbox": None,
        "runtime": None,
        "created_at": iso(job.created_at),
        "started_at": None,
        "finished_at": None,
        "findings": None,
        "approval": None,
        "options": job.options,
        "result": None,
        "rollout": job.rollout_id,
        "steps": [],
    }


def latest_drift(session: Session, database: str, who: Principal | None = None) -> dict[str, Any]:
    """The newest finished drift check of a database, and one pending, if any."""
    db = get_database(session, database, who)
    result = None
    if db.drift_job_id is not None:
        result = session.scalar(select(Job.result).where(Job.id == db.drift_job_id))
    pending = session.scalar(
        select(Job.id)
        .where(Job.database_id == db.id, Job.kind == "drift", Job.state.in_(ACTIVE_STATES))
        .order_by(Job.id.desc())
        .limit(1)
    )
    return {
        "database": db.name,
        "checked_at": iso(db.drift_checked_at),
        "drifted": db.drifted,
        "job": db.drift_job_id,
        "result": result,
        "pending_job": pending,
    }


def undispatched(db: Session | Connection, job_id: int) -> None:
    """Sending the job's message failed: let the sweeper send it soon."""
    db.execute(
        update(_jobs)
        .where(_jobs.c.id == job_id, _jobs.c.state == JobState.QUEUED)
        .values(dispatched_at=None)
    )


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
) -> tuple[list[dict[str, Any]], str | None]:
    """Return one page of job documents (without steps), newest first, and the next cursor."""
    query = _documents()
    if who is not None and not who.everywhere:
        query = query.where(_projects.c.name.in_(who.projects))
    if params.database:
        db = get_database(session, params.database, who)
        query = query.where(_jobs.c.database_id == db.id)
    if params.state:
        query = query.where(_jobs.c.state == params.state)
    if params.kind:
        query = query.where(_jobs.c.kind == params.kind)
    if params.cursor:
        query = query.where(_jobs.c.id < decode_cursor(params.cursor))
    rows = session.execute(query.order_by(_jobs.c.id.desc()).limit(params.limit + 1)).all()
    more = len(rows) > params.limit
    jobs = [_document(row) for row in rows[: params.limit]]
    return jobs, encode_cursor(jobs[-1]["id"]) if more else None


_jobs = Job.__table__
_steps = JobStep.__table__
_databases = Database.__table__
_projects = Project.__table__
_bundles = Bundle.__table__
_leases = Lease.__table__


def _documents(*columns) -> Select:
    """Select what a job document shows: the job with its database, project and bundle
    names, and the lease holder while it waits for the lease (one row per job)."""
    return (
        select(
            _jobs.c.id,
            _databases.c.name.label("database"),
            _projects.c.name.label("project"),
            _bundles.c.digest.label("bundle"),
            _jobs.c.kind,
            _jobs.c.action,
            _jobs.c.target,
            _jobs.c.state,
            _jobs.c.attempt,
            _jobs.c.from_heads,
            _jobs.c.to_heads,
            _jobs.c.error,
            _jobs.c.fencing_token,
            _jobs.c.lock_waited_ms,
            _jobs.c.requested_by,
            _jobs.c.worker,
            _jobs.c.sandbox,
            _jobs.c.runtime,
            _jobs.c.created_at,
            _jobs.c.started_at,
            _jobs.c.finished_at,
            _jobs.c.waiting_on_job_id,
            _jobs.c.waiting_for,
            _jobs.c.rollout_id,
            _jobs.c.findings,
            _jobs.c.approval,
            _jobs.c.options,
            _jobs.c.result,
            _leases.c.holder_job_id.label("lease_holder"),
            *columns,
        )
        .join(_databases, _databases.c.id == _jobs.c.database_id)
        .join(_projects, _projects.c.id == _jobs.c.project_id)
        .join(_bundles, _bundles.c.pk == _jobs.c.bundle_pk)
        .outerjoin(
            _leases,
            and_(
                _leases.c.database_id == _jobs.c.database_id,
                _jobs.c.state == JobState.WAITING_FOR_LOCK,
            ),
        )
    )


# One job and its steps in one statement, so one snapshot: one row per step
# (the job's columns repeated), or one row with NULL step columns.
_JOB_WITH_STEPS = (
    _documents(
        _steps.c.id.label("step_id"),
        _steps.c.revisions.label("step_revisions"),
        _steps.c.direction.label("step_direction"),
        _steps.c.state.label("step_state"),
        _steps.c.message.label("step_message"),
        _steps.c.started_at.label("step_started_at"),
        _steps.c.finished_at.label("step_finished_at"),
        _steps.c.duration_ms.label("step_duration_ms"),
        _steps.c.sql.label("step_sql"),
        _steps.c.sha256.label("step_sha256"),
        _steps.c.fencing_token.label("step_fencing_token"),
    )
    .outerjoin(_steps, _steps.c.job_id == _jobs.c.id)
    .where(_jobs.c.id == bindparam("job_id"))
    .order_by(_steps.c.id)
)
_JOB = _documents().where(_jobs.c.id == bindparam("job_id"))


def read_job(
    db: Session | Connection, job_id: int, who: Principal | None = None, with_steps: bool = True
) -> dict[str, Any]:
    """Return a job's document; 404 if it does not exist or `who` may not see its project."""
    query = _JOB_WITH_STEPS if with_steps else _JOB
    rows = db.execute(query, {"job_id": job_id}).all() if 0 < job_id < MAX_ID else []
    if not rows:
        raise NotFoundError(f"no job {job_id}", {"job": job_id})
    check_visible(job_id, rows[0].project, who)
    out = _document(rows[0])
    if with_steps:
        out["steps"] = [_step(row) for row in rows if row.step_id is not None]
    return out


def check_visible(job_id: int, project: str, who: Principal | None) -> None:
    """Answer 404, as for a job that does not exist, when `who` may not see its project."""
    if who is not None and not who.sees(project):
        raise NotFoundError(f"no job {job_id}", {"job": job_id})


def _document(row: Row) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": row.id,
        # A removed database's row is kept as "name~id" (names never hold "~"):
        # its jobs keep showing the name they ran under.
        "database": row.database.split("~", 1)[0],
        "project": row.project,
        "bundle": row.bundle,
        "kind": row.kind,
        "action": row.action,
        "target": row.target,
        "state": row.state,
        "attempt": row.attempt,
        "from_heads": row.from_heads,
        "to_heads": row.to_heads,
        "error": row.error,
        "lock": {
            "fencing_token": row.fencing_token,
            "waited_ms": row.lock_waited_ms,
        },
        "requested_by": row.requested_by,
        "worker": row.worker,
        "sandbox": row.sandbox,
        "runtime": row.runtime,
        "created_at": iso(row.created_at),
        "started_at": iso(row.started_at),
        "finished_at": iso(row.finished_at),
        "findings": row.findings,
        "approval": row.approval,
        "options": row.options,
        "result": row.result,
        "rollout": row.rollout_id,
    }
    if row.state == JobState.WAITING_FOR_LOCK:
        holder = row.waiting_on_job_id or row.lease_holder
        out["lock"]["held_by_job"] = holder if holder != row.id else None
        if row.waiting_for and row.worker is None:
            out["lock"]["waiting_for"] = row.waiting_for
    return out


def _step(row: Row) -> dict[str, Any]:
    return {
        "revisions": row.step_revisions,
        "direction": row.step_direction,
        "state": row.step_state,
        "message": row.step_message,
        "started_at": iso(row.step_started_at),
        "finished_at": iso(row.step_finished_at),
        "duration_ms": round(row.step_duration_ms, 3),
        "sql": row.step_sql,
        "sha256": row.step_sha256,
        "fencing_token": row.step_fencing_token,
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


def due_drift_checks(session: Session, limit: int = 200) -> list[int]:
    """Queue the drift checks that are due (project setting drift.check_interval_s).

    A database is due when no drift check of it was requested within its
    project's interval, whatever became of the last one (a check that fails,
    a revision that cannot build on an empty database, is tried once per
    interval, not at every sweep), and its project has a bundle. Returns the
    new jobs' ids, to send after the commit. A few statements per project.
    """
    now = utcnow()
    created: list[int] = []
    for project in session.scalars(select(Project).order_by(Project.id)):
        interval = ((project.settings or {}).get("drift") or {}).get("check_interval_s")
        if not interval or len(created) >= limit:
            continue
        has_bundle = select(Bundle.pk).where(Bundle.project_id == project.id).limit(1)
        if session.scalar(has_bundle) is None:
            continue
        recent = select(Job.id).where(
            Job.database_id == Database.id,
            Job.kind == "drift",
            (Job.created_at > now - dt.timedelta(seconds=float(interval)))
            | Job.state.in_(ACTIVE_STATES),
        )
        due = session.scalars(
            select(Database.name)
            .where(
                Database.project_id == project.id,
                Database.removed_at.is_(None),
                ~recent.exists(),
            )
            .order_by(Database.id)
            .limit(limit - len(created))
        ).all()
        for name in due:
            made = create_drift_check(session, name, "sweeper")
            if not made.coalesced:
                created.append(made.job.id)
    return created
