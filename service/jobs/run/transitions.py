"""Every write the worker makes to a job row, each with its state check and audit event."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from service.audit.actions import AuditAction
from service.databases.models import Database
from service.db import epoch_now, utcnow
from service.jobs.models import Job
from service.jobs.run.context import JobContext
from service.jobs.run.plan import check_checksums
from service.jobs.run.steps import applied_checksums
from service.jobs.states import STARTED_STATES, JobState
from service.locks import ops as leases
from service.projects.models import Project

# The statements of a job's hot path are Core statements on the tables, built
# once per shape: an ORM-enabled statement, built anew for each call, cost
# about 0.2 ms more CPU, and a job runs about twenty (see BENCHMARKS.md).
_jobs = Job.__table__


@functools.cache
def _set_job(columns: tuple[str, ...], states: tuple[str, ...] = ()) -> sa.Update:
    """UPDATE jobs SET <columns> WHERE id = :job_id [AND state IN <states>]."""
    stmt = _jobs.update().where(_jobs.c.id == bindparam("job_id"))
    if states:
        stmt = stmt.where(_jobs.c.state.in_(states))
    return stmt.values({c: bindparam(f"v_{c}", type_=_jobs.c[c].type) for c in columns})


def update_job(s: Session, job_id: int, states: tuple[str, ...] = (), **values: Any) -> int:
    """Set plain values on a job (in the given states only); return the rows changed."""
    stmt = _set_job(tuple(sorted(values)), states)
    params = {f"v_{k}": v for k, v in values.items()}
    return s.connection().execute(stmt, {"job_id": job_id, **params}).rowcount


@functools.cache
def claim_stmt(dialect: str) -> sa.Update:
    return (
        _jobs.update()
        .where(
            _jobs.c.id == bindparam("job_id"),
            # Queued, or parked (waiting with no worker: see admission).
            sa.or_(
                _jobs.c.state == JobState.QUEUED,
                sa.and_(_jobs.c.state == JobState.WAITING_FOR_LOCK, _jobs.c.worker.is_(None)),
            ),
        )
        .values(
            state=JobState.WAITING_FOR_LOCK,
            worker=bindparam("v_worker"),
            claim_expires_at=epoch_now(dialect) + bindparam("ttl", type_=sa.Float),
        )
    )


QUEUED_JOB = (
    select(
        _jobs.c.state,
        _jobs.c.database_id,
        _jobs.c.action,
        _jobs.c.target,
        _jobs.c.resolved_target,
        _jobs.c.attempt,
        _jobs.c.started_at,
        _jobs.c.from_heads,
        _jobs.c.bundle_pk,
        _jobs.c.kind,
        _jobs.c.options,
        _jobs.c.approval,
        _jobs.c.requested_by,
        _jobs.c.worker,
        _jobs.c.waiting_for,
        _jobs.c.waiting_on_job_id,
        _jobs.c.waiting_since,
        _jobs.c.rollout_id,
        Database.name.label("database"),
        Database.url_encrypted,
        Database.tags,
        Database.drifted,
        Project.id.label("project_id"),
        Project.name.label("project"),
        Project.settings,
        Project.secret_env,
    )
    .join(Database.__table__, Database.id == _jobs.c.database_id)
    .join(Project.__table__, Project.id == _jobs.c.project_id)
    .where(_jobs.c.id == bindparam("job_id"))
)
JOB_STATE = select(_jobs.c.state).where(_jobs.c.id == bindparam("job_id"))


@functools.cache
def _start_stmt(set_started: bool, set_from: bool) -> sa.Update:
    values: dict[str, Any] = {
        "state": JobState.RUNNING,
        "lock_waited_ms": _jobs.c.lock_waited_ms + bindparam("waited", type_=sa.Integer),
        "sandbox": bindparam("v_sandbox", type_=_jobs.c.sandbox.type),
        "runtime": bindparam("v_runtime", type_=_jobs.c.runtime.type),
    }
    if set_started:
        values["started_at"] = bindparam("v_started_at", type_=_jobs.c.started_at.type)
    if set_from:
        values["from_heads"] = bindparam("v_from_heads", type_=_jobs.c.from_heads.type)
    return (
        _jobs.update()
        .where(_jobs.c.id == bindparam("job_id"), _jobs.c.state == JobState.WAITING_FOR_LOCK)
        .values(values)
        # The state database (PostgreSQL, SQLite) answers with the row it changed.
        .returning(_jobs.c.created_at, _jobs.c.started_at, _jobs.c.lock_waited_ms)
    )


@dataclass
class Started:
    """What start_job found: the checksums the database has applied; whether the job ended."""

    applied: dict[str, str]
    ended: bool = False


def start_job(
    s: Session,
    ctx: JobContext,
    *,
    attempt: int,
    previously_started: bool,
    from_heads_known: bool,
    heads: list[str],
    waited_ms: int,
    noop: bool,
    shas: dict[str, str],
    sandbox: str,
    runtime: dict[str, Any] | None = None,
) -> Started | None:
    """Mark the job running (a no-op one: succeeded) in the caller's fenced transaction.

    None when the job left waiting_for_lock meanwhile (cancelled): nothing was touched.
    """
    resumed = attempt > 1
    stmt = _start_stmt(not previously_started, not from_heads_known)
    params = {
        "job_id": ctx.job_id,
        "waited": waited_ms,
        "v_started_at": utcnow(),
        "v_from_heads": heads,
        "v_sandbox": sandbox,
        "v_runtime": runtime,
    }
    start_row = s.connection().execute(stmt, params).first()
    if start_row is None:
        return None
    ctx.start_row = start_row  # what the metrics observe when the job ends
    data: dict[str, Any] = {
        "target_lock_waited_ms": waited_ms,
        "current_heads": heads,
        "sandbox": sandbox,
    }
    if runtime:
        data["runtime"] = runtime
    if resumed:
        data["attempt"] = attempt
    ctx.audit(s, AuditAction.JOB_RESUMED if resumed else AuditAction.JOB_STARTED, data)
    applied = applied_checksums(s, ctx.database_id)
    if noop:
        try:
            check_checksums(shas, applied, heads)
        except Exception:  # noqa: BLE001 - started only: the caller fails it, saying why
            return Started(applied)
        finish(
            s,
            ctx,
            {"state": JobState.SUCCEEDED, "to_heads": heads},
            AuditAction.JOB_SUCCEEDED,
            {"from_heads": heads, "to_heads": heads, "steps": 0},
        )
        return Started(applied, ended=True)
    return Started(applied)


def finish(
    s: Session,
    ctx: JobContext,
    values: dict[str, Any],
    event: str,
    data: dict,
    released: bool = False,
) -> None:
    """End the job and release its lease in one transaction (already fenced).

    `released`: the transaction began with leases.release_fenced.
    """
    states = STARTED_STATES
    if update_job(s, ctx.job_id, states, finished_at=utcnow(), **values):
        ctx.audit(s, event, data)
        ctx.ended = values["state"]
    if released or leases.release(s, ctx.database_id, ctx.token):
        ctx.audit(s, AuditAction.LEASE_RELEASED)


def resolve_target(s: Session, ctx: JobContext, target: str) -> None:
    """Where a relative request goes, so that a recovered attempt goes there too."""
    s.execute(update(Job).where(Job.id == ctx.job_id).values(resolved_target=target))


def refuse_unclaimed(s: Session, ctx: JobContext, worker: str, code: str, message: str) -> bool:
    """Fail a queued job this worker cannot run (its sandbox is required and missing)."""
    error = {"code": code, "message": message, "revision": None, "statement": None}
    done = update_job(
        s,
        ctx.job_id,
        (JobState.QUEUED,),
        state=JobState.FAILED,
        worker=worker,
        finished_at=utcnow(),
        error=error,
    )
    if done:
        ctx.audit(s, AuditAction.JOB_FAILED, {"code": code})
        ctx.ended = JobState.FAILED
    return bool(done)
