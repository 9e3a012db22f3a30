"""Move a rollout on: judge its wave, halt or finish it, and create the jobs that may start.

`advance` is the one place a rollout changes by itself. It runs with the
rollout's row locked, so two callers (the worker whose job just ended, the
sweeper's round, the API after a resume) never both start a database's job
or both count one slot. The jobs are the record of truth: a database's state
is its job's; nothing here trusts a count it did not read in this transaction.

Each query reads what one decision needs (the rollout's active jobs, the
current wave's failures, the next pending databases) through an index, so a
thousand-database rollout's thousand advances stay cheap.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from dataclasses import dataclass, field

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from service.audit.actions import AuditAction
from service.audit.ops import record_event
from service.bundles.models import Bundle
from service.databases.models import Database
from service.db import utcnow
from service.jobs.models import Job
from service.jobs.ops import insert_job
from service.jobs.states import BUSY_STATES, FAILED_STATES, JobState
from service.projects.models import Project
from service.rollouts.candidates import take_batch
from service.rollouts.models import Rollout, RolloutDatabase
from service.rollouts.states import RolloutState

log = logging.getLogger("retort.rollouts")

_rd = RolloutDatabase.__table__
_jobs = Job.__table__

# The rollout's current jobs (a retried database's newest) in some states, with their wave.
_CURRENT = and_(
    _rd.c.rollout_id == _jobs.c.rollout_id,
    _rd.c.database_id == _jobs.c.database_id,
    _rd.c.job_id == _jobs.c.id,
)


@dataclass
class Advanced:
    """What the caller does after the commit: send these jobs, wake the rollout then."""

    send: list[int] = field(default_factory=list)
    # Batches of databases to settle without a run (service.rollouts.settle).
    settle: list[list[int]] = field(default_factory=list)
    wake_at: dt.datetime | None = None
    events: list[str] = field(default_factory=list)


def wave_name(rollout: Rollout, wave: int) -> str:
    if wave == 0 and rollout.options.get("canary_size"):
        return "canary"
    return f"wave {wave if rollout.options.get('canary_size') else wave + 1}"


def audit(s: Session, rollout: Rollout, project: str, event: str, data: dict) -> None:
    record_event(
        s,
        event,
        actor=f"rollout:{rollout.id}",
        project=project,
        data={"rollout": rollout.id, "state": rollout.state, **data},
    )


def advance(s: Session, rollout_id: int, now: dt.datetime | None = None) -> Advanced:
    """Judge the rollout and start what may start, in the caller's transaction."""
    out = Advanced()
    r = s.scalar(select(Rollout).where(Rollout.id == rollout_id).with_for_update())
    if r is None or r.state != RolloutState.RUNNING:
        return out
    now = now or utcnow()
    project = s.get(Project, r.project_id)
    opts = r.options
    sizes: list[int] = opts["wave_sizes"]
    accepted = set(r.accepted or ())
    while True:
        active = s.execute(
            select(_rd.c.wave, _rd.c.server)
            .select_from(_jobs.join(_rd, _CURRENT))
            .where(_jobs.c.rollout_id == r.id, _jobs.c.state.in_(BUSY_STATES))
        ).all()
        failed = [
            (job_id, wave)
            for job_id, wave in s.execute(
                select(_jobs.c.id, _rd.c.wave)
                .select_from(_jobs.join(_rd, _CURRENT))
                .where(_jobs.c.rollout_id == r.id, _jobs.c.state.in_(FAILED_STATES))
            ).all()
            if job_id not in accepted
        ]
        w = r.wave
        pending_w = s.scalar(
            select(func.count())
            .select_from(_rd)
            .where(
                _rd.c.rollout_id == r.id,
                _rd.c.wave == w,
                _rd.c.job_id.is_(None),
                _rd.c.skipped.is_(None),
            )
        )
        active_w = sum(1 for wave, _ in active if wave <= w)
        fails_w = sum(1 for _, wave in failed if wave == w)
        wave_done = not pending_w and not active_w
        finished_w = sizes[w] - pending_w - active_w
        reason = _halt_reason(r, w, fails_w, len(failed), finished_w, wave_done)
        if reason is not None:
            code, message = reason
            r.state = RolloutState.HALTED
            r.halted = {"reason": code, "message": message, "wave": w}
            audit(s, r, project.name, AuditAction.ROLLOUT_HALTED, {"wave": w, **r.halted})
            out.events.append(AuditAction.ROLLOUT_HALTED)
            return out
        if not wave_done:
            break
        if w + 1 >= len(sizes):
            _finish(s, r, project.name, now, out)
            return out
        audit(
            s,
            r,
            project.name,
            AuditAction.ROLLOUT_WAVE_FINISHED,
            {"wave": w, "name": wave_name(r, w)},
        )
        out.events.append(AuditAction.ROLLOUT_WAVE_FINISHED)
        r.wave = w + 1
        if opts.get("approve_between_waves"):
            r.state = RolloutState.WAITING_FOR_APPROVAL
            audit(s, r, project.name, AuditAction.ROLLOUT_WAITING_FOR_APPROVAL, {"wave": r.wave})
            return out
        pause = opts.get("pause_between_waves_s") or 0
        if pause:
            r.resume_at = now + dt.timedelta(seconds=pause)
    if r.resume_at is not None:
        resume_at = r.resume_at if r.resume_at.tzinfo else r.resume_at.replace(tzinfo=dt.UTC)
        if now < resume_at:
            out.wake_at = resume_at
            return out
        r.resume_at = None
    batch = take_batch(s, r.id, r.wave, now) if opts.get("settle_candidates") else None
    if batch:
        out.settle.append(batch)
    _start_jobs(s, r, project, active, out)
    return out


def _halt_reason(
    r: Rollout, wave: int, fails_w: int, fails: int, finished_w: int, wave_done: bool
) -> tuple[str, str] | None:
    opts = r.options
    if fails_w and wave == 0 and opts.get("canary_size"):
        return "canary_failed", f"{fails_w} of the canary's {opts['canary_size']} databases failed"
    limit = opts.get("halt_after_failures")
    if limit and fails >= limit:
        return "failures", f"{fails} databases failed (halt_after_failures: {limit})"
    ratio = opts.get("halt_on_failure_ratio")
    if ratio is None or not fails_w or finished_w <= 0:
        return None
    judged_from = 1 if ratio == 0 else math.ceil(1 / ratio)
    if (finished_w >= judged_from or wave_done) and fails_w / finished_w > ratio:
        return (
            "failure_ratio",
            f"{fails_w} of {finished_w} finished jobs of {wave_name(r, wave)} failed "
            f"({fails_w / finished_w:.0%} > halt_on_failure_ratio {ratio:g})",
        )
    return None


def _finish(s: Session, r: Rollout, project: str, now: dt.datetime, out: Advanced) -> None:
    """Every wave is done: succeeded if every database's job succeeded, else failed."""
    not_ok = s.scalar(
        select(func.count())
        .select_from(_rd.outerjoin(_jobs, _jobs.c.id == _rd.c.job_id))
        .where(
            _rd.c.rollout_id == r.id,
            (_jobs.c.state.is_(None)) | (_jobs.c.state != JobState.SUCCEEDED),
        )
    )
    r.state = RolloutState.SUCCEEDED if not not_ok else RolloutState.FAILED
    r.finished_at = now
    event = AuditAction(f"rollout.{r.state}")
    audit(s, r, project, event, {"not_succeeded": not_ok})
    out.events.append(event)


def _start_jobs(s: Session, r: Rollout, project: Project, active: list, out: Advanced) -> None:
    """Create the jobs of the current wave that the limits let start now."""
    opts = r.options
    slots = opts["max_parallel"] - len(active)
    if slots <= 0:
        return
    per_server = opts.get("max_parallel_per_server")
    busy: dict[str, int] = {}
    for _, server in active:
        busy[server] = busy.get(server, 0) + 1
    # Enough candidates to fill the slots past servers already at their limit.
    fetch = slots if not per_server else max(slots * 8, 200)
    candidates = s.execute(
        select(_rd.c.database_id, _rd.c.server)
        .where(
            _rd.c.rollout_id == r.id,
            _rd.c.wave == r.wave,
            _rd.c.job_id.is_(None),
            _rd.c.skipped.is_(None),
            _rd.c.settle.is_(None),  # the others are settled in batches, or read first
        )
        .order_by(_rd.c.position)
        .limit(fetch)
    ).all()
    chosen: list[int] = []
    for database_id, server in candidates:
        if len(chosen) >= slots:
            break
        if per_server and busy.get(server, 0) >= per_server:
            continue
        busy[server] = busy.get(server, 0) + 1
        chosen.append(database_id)
    if not chosen:
        return
    bundle = s.get(Bundle, r.bundle_pk)
    dbs = {d.id: d for d in s.scalars(select(Database).where(Database.id.in_(chosen)))}
    for database_id in chosen:
        db = dbs.get(database_id)
        row = s.get(RolloutDatabase, (r.id, database_id))
        if db is None or db.removed_at is not None:
            row.skipped = "removed"
            continue
        created = insert_job(
            s,
            db,
            project,
            bundle,
            "migrate",
            r.action,
            r.target,
            None,
            r.requested_by,
            dispatch=True,
            rollout_id=r.id,
        )
        row.job_id = created.job.id
        out.send.append(created.job.id)
