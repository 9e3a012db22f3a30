"""Rollouts: start one, read it, and the requests that change what it does next."""

from __future__ import annotations

import base64
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from service import targets
from service.audit.actions import AuditAction
from service.bundles.models import Bundle
from service.bundles.ops import get_bundle
from service.crypto import SecretBox
from service.databases.models import Database
from service.db import iso, utcnow
from service.errors import ConflictError, ForbiddenError, InvalidError, NotFoundError
from service.jobs.models import Job
from service.jobs.ops import check_approver
from service.jobs.states import FAILED_STATES, JobState
from service.jobs.targets import check_target
from service.principal import Principal
from service.projects.models import Project
from service.rollouts.candidates import CANDIDATE, candidates, target_heads
from service.rollouts.coordinator import Advanced, advance, audit, wave_name
from service.rollouts.models import Rollout, RolloutDatabase
from service.rollouts.schemas import DATABASE_STATES, RolloutCreate
from service.rollouts.states import FINAL_STATES, RolloutState

_rd = RolloutDatabase.__table__
_jobs = Job.__table__
_dbs = Database.__table__
_MAX_ID = 2**63

# A database's state in a rollout, from its job's (None: no job yet).
_BY_JOB_STATE = {
    None: "pending",
    JobState.QUEUED: "queued",
    JobState.WAITING_FOR_LOCK: "waiting",
    JobState.WAITING_FOR_APPROVAL: "waiting",
    JobState.RUNNING: "running",
    JobState.SUCCEEDED: "succeeded",
    JobState.FAILED: "failed",
    JobState.CANCELLED: "cancelled",
}


def server_of(box: SecretBox, db: Database) -> str:
    """host:port of a database's server (what max_parallel_per_server counts)."""
    try:
        url = targets.normalize_url(box.decrypt(db.url_encrypted))
    except Exception:  # noqa: BLE001 - its job will say what is wrong with it
        return f"unknown:{db.id}"
    dialect = targets.dialect_of(url)
    if dialect == "sqlite":
        return f"sqlite:{url.database}"
    port = url.port or {"postgresql": 5432, "mysql": 3306}.get(dialect, 0)
    return f"{url.host or 'localhost'}:{port}"


def _project(s: Session, name: str, who: Principal | None) -> Project:
    project = s.scalar(select(Project).where(Project.name == name))
    if project is None or (who is not None and not who.sees(project.name)):
        raise NotFoundError(f"no project named {name!r}", {"project": name})
    return project


def _waves(count: int, body: RolloutCreate) -> list[int]:
    """The sizes of the waves after the canary."""
    if count == 0:
        return []
    if body.waves:
        sizes: list[int] = []
        left = count
        for size in body.waves:
            if left <= 0:
                break
            sizes.append(min(size, left))
            left -= sizes[-1]
        while left > 0:
            sizes.append(min(body.waves[-1], left))
            left -= sizes[-1]
        return sizes
    size = body.wave_size or count
    return [min(size, count - i) for i in range(0, count, size)]


def create_rollout(
    s: Session, body: RolloutCreate, actor: str, who: Principal | None, box: SecretBox
) -> tuple[Rollout, Advanced]:
    """Select the databases, cut them in waves, and start the first jobs."""
    project = _project(s, body.project, who)
    bundle = get_bundle(s, project, body.bundle or "latest")
    target = check_target(bundle, body.action, body.target)
    chosen = [
        db
        for db in s.scalars(
            select(Database)
            .where(Database.project_id == project.id, Database.removed_at.is_(None))
            .order_by(Database.name)
        )
        if all((db.tags or {}).get(k) == v for k, v in body.selector.tags.items())
    ]
    if body.selector.names is not None:
        wanted = set(body.selector.names)
        unknown = sorted(wanted - {db.name for db in chosen})
        if unknown:
            raise InvalidError(
                f"{len(unknown)} named database(s) are not the project's, or lack the "
                f"selector's tags: {', '.join(unknown[:20])}",
                {"field": "selector.names", "unknown": unknown[:100]},
                code="unknown_databases",
            )
        chosen = [db for db in chosen if db.name in wanted]
    if not chosen:
        raise InvalidError(
            f"no database of project {project.name!r} matches the selector",
            {"field": "selector", "selector": body.selector.model_dump()},
            code="no_databases",
        )
    if isinstance(body.canary, list):
        names = {db.name for db in chosen}
        missing = sorted(set(body.canary) - names)
        if missing:
            raise InvalidError(
                f"canary database(s) not in the selection: {', '.join(missing[:20])}",
                {"field": "canary", "unknown": missing[:100]},
                code="unknown_databases",
            )
        canary = [db for db in chosen if db.name in set(body.canary)]
    else:
        if body.canary > len(chosen):
            raise InvalidError(
                f"a canary of {body.canary} databases, but the selection has {len(chosen)}",
                {"field": "canary", "selected": len(chosen)},
            )
        canary = chosen[: body.canary]
    in_canary = {db.id for db in canary}
    rest = [db for db in chosen if db.id not in in_canary]
    sizes = ([len(canary)] if canary else []) + _waves(len(rest), body)
    options = {
        "canary_size": len(canary),
        "wave_sizes": sizes,
        "max_parallel": body.max_parallel,
        "max_parallel_per_server": body.max_parallel_per_server,
        "halt_on_failure_ratio": body.halt_on_failure_ratio,
        "halt_after_failures": body.halt_after_failures,
        "pause_between_waves_s": body.pause_between_waves_s,
        "approve_between_waves": body.approve_between_waves,
    }
    rollout = Rollout(
        project_id=project.id,
        bundle_pk=bundle.pk,
        action=body.action,
        target=target,
        selector=body.selector.model_dump(exclude_none=True),
        options=options,
        state=RolloutState.RUNNING,
        wave=0,
        waves=len(sizes),
        accepted=[],
        requested_by=actor,
        created_at=utcnow(),
    )
    s.add(rollout)
    s.flush()
    rows, position, wave = [], 0, 0
    ordered = canary + rest
    # At the target already, says Retort's state: read in batches, settled without a run.
    hinted = candidates(
        s, project.id, (db.id for db in ordered), target_heads(bundle, body.action, target)
    )
    left_in_wave = sizes[0]
    for db in ordered:
        if left_in_wave == 0:
            wave += 1
            left_in_wave = sizes[wave]
        rows.append(
            {
                "rollout_id": rollout.id,
                "database_id": db.id,
                "wave": wave,
                "position": position,
                "server": server_of(box, db),
                "job_id": None,
                "skipped": None,
                "settle": CANDIDATE if db.id in hinted else None,
                "settle_started_at": None,
            }
        )
        position += 1
        left_in_wave -= 1
    s.execute(insert(_rd), rows)
    if hinted:  # the coordinator looks for batches to settle only then
        rollout.options = {**options, "settle_candidates": len(hinted)}
    audit(
        s,
        rollout,
        project.name,
        AuditAction.ROLLOUT_STARTED,
        {
            "databases": len(ordered),
            "waves": sizes,
            "bundle": bundle.digest,
            "action": body.action,
            "target": target,
        },
    )
    return rollout, advance(s, rollout.id)


def get_rollout(s: Session, rollout_id: int, who: Principal | None, lock=False) -> Rollout:
    query = select(Rollout).where(Rollout.id == rollout_id)
    r = s.scalar(query.with_for_update() if lock else query) if 0 < rollout_id < _MAX_ID else None
    if r is not None and who is not None:
        name = s.scalar(select(Project.name).where(Project.id == r.project_id))
        if not who.sees(name):
            r = None
    if r is None:
        raise NotFoundError(f"no rollout {rollout_id}", {"rollout": rollout_id})
    return r


def _state_of(job_state: str | None, skipped: str | None, final: bool) -> str:
    if skipped is not None or (job_state is None and final):
        return "skipped"
    return _BY_JOB_STATE.get(job_state, job_state or "pending")


def read_rollout(s: Session, rollout_id: int, who: Principal | None = None) -> dict[str, Any]:
    r = get_rollout(s, rollout_id, who)
    project = s.scalar(select(Project.name).where(Project.id == r.project_id))
    digest = s.scalar(select(Bundle.digest).where(Bundle.pk == r.bundle_pk))
    final = r.state in FINAL_STATES
    rows = s.execute(
        select(_rd.c.wave, _rd.c.skipped, _jobs.c.state, func.count())
        .select_from(_rd.outerjoin(_jobs, _jobs.c.id == _rd.c.job_id))
        .where(_rd.c.rollout_id == r.id)
        .group_by(_rd.c.wave, _rd.c.skipped, _jobs.c.state)
    ).all()
    sizes = r.options["wave_sizes"]
    counts = dict.fromkeys(DATABASE_STATES, 0)
    per_wave = [dict.fromkeys(DATABASE_STATES, 0) for _ in sizes]
    for wave, skipped, job_state, n in rows:
        state = _state_of(job_state, skipped, final)
        counts[state] += n
        per_wave[wave][state] += n
    waves = []
    for i, size in enumerate(sizes):
        c = per_wave[i]
        done = c["succeeded"] + c["failed"] + c["cancelled"] + c["skipped"]
        going = c["queued"] + c["waiting"] + c["running"]
        state = "finished" if done == size else "running" if going or done else "pending"
        waves.append(
            {"wave": i, "name": wave_name(r, i), "size": size, "state": state, "counts": c}
        )
    total = sum(sizes)
    return {
        "id": r.id,
        "project": project,
        "bundle": digest,
        "action": r.action,
        "target": r.target,
        "state": r.state,
        "halted": r.halted,
        "selector": r.selector,
        "options": r.options,
        "requested_by": r.requested_by,
        "created_at": iso(r.created_at),
        "finished_at": iso(r.finished_at),
        "resume_at": iso(r.resume_at),
        "wave": r.wave,
        "total": total,
        "counts": counts,
        "at_target": counts["succeeded"],
        "not_at_target": total - counts["succeeded"],
        "waves": waves,
    }


def _cursor(value: int) -> str:
    return base64.urlsafe_b64encode(str(value).encode()).decode().rstrip("=")


def _decode(cursor: str) -> int:
    try:
        return int(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode())
    except (ValueError, UnicodeDecodeError):
        raise InvalidError("cursor is not one this API gave out", {"field": "cursor"}) from None


def list_rollouts(
    s: Session, project: str | None, limit: int, cursor: str | None, who: Principal | None
) -> dict[str, Any]:
    query = select(Rollout.id).order_by(Rollout.id.desc())
    if project is not None:
        query = query.where(Rollout.project_id == _project(s, project, who).id)
    elif who is not None and not who.everywhere:
        query = query.join(Project, Project.id == Rollout.project_id).where(
            Project.name.in_(who.projects)
        )
    if cursor:
        query = query.where(Rollout.id < _decode(cursor))
    ids = list(s.scalars(query.limit(limit + 1)))
    more = len(ids) > limit
    ids = ids[:limit]
    return {
        "rollouts": [read_rollout(s, i) for i in ids],
        "next_cursor": _cursor(ids[-1]) if more and ids else None,
    }


def rollout_databases(
    s: Session,
    rollout_id: int,
    who: Principal | None,
    state: str | None,
    wave: int | None,
    limit: int,
    cursor: str | None,
) -> dict[str, Any]:
    r = get_rollout(s, rollout_id, who)
    final = r.state in FINAL_STATES
    query = (
        select(
            _rd.c.position,
            _dbs.c.name,
            _rd.c.wave,
            _rd.c.server,
            _rd.c.job_id,
            _rd.c.skipped,
            _jobs.c.state,
            _jobs.c.to_heads,
            _jobs.c.error,
        )
        .select_from(
            _rd.join(_dbs, _dbs.c.id == _rd.c.database_id).outerjoin(
                _jobs, _jobs.c.id == _rd.c.job_id
            )
        )
        .where(_rd.c.rollout_id == r.id)
        .order_by(_rd.c.position)
    )
    if wave is not None:
        query = query.where(_rd.c.wave == wave)
    if cursor:
        query = query.where(_rd.c.position > _decode(cursor))
    no_job = _rd.c.job_id.is_(None)
    if state == "not_at_target":
        query = query.where(no_job | (_jobs.c.state != JobState.SUCCEEDED))
    elif state == "skipped":
        query = query.where(_rd.c.skipped.is_not(None) | (no_job if final else False))
    elif state == "pending":
        query = query.where(no_job, _rd.c.skipped.is_(None), not final)
    elif state == "waiting":
        query = query.where(
            _jobs.c.state.in_((JobState.WAITING_FOR_LOCK, JobState.WAITING_FOR_APPROVAL))
        )
    elif state is not None:
        query = query.where(_jobs.c.state == state)
    rows = s.execute(query.limit(limit + 1)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    return {
        "databases": [
            {
                "database": row.name.split("~", 1)[0],
                "wave": row.wave,
                "server": row.server,
                "job": row.job_id,
                "state": _state_of(row.state, row.skipped, final),
                "heads": row.to_heads,
                "error": (row.error or {}).get("code") if row.error else None,
            }
            for row in rows
        ],
        "next_cursor": _cursor(rows[-1].position) if more and rows else None,
    }


def _refuse(r: Rollout, doing: str, allowed: tuple[str, ...]) -> None:
    if r.state not in allowed:
        raise ConflictError(
            f"rollout {r.id} is {r.state}: it can be {doing} only when {' or '.join(allowed)}",
            {"rollout": r.id, "state": r.state},
            code="rollout_state",
        )


def _project_of(s: Session, r: Rollout) -> Project:
    return s.get(Project, r.project_id)


def pause_rollout(s: Session, rollout_id: int, actor: str, who: Principal | None) -> Advanced:
    r = get_rollout(s, rollout_id, who, lock=True)
    _refuse(r, "paused", (RolloutState.RUNNING,))
    r.state = RolloutState.PAUSED
    audit(s, r, _project_of(s, r).name, AuditAction.ROLLOUT_PAUSED, {"by": actor})
    return Advanced()


def resume_rollout(s: Session, rollout_id: int, actor: str, who: Principal | None) -> Advanced:
    r = get_rollout(s, rollout_id, who, lock=True)
    _refuse(
        r, "resumed", (RolloutState.PAUSED, RolloutState.HALTED, RolloutState.WAITING_FOR_APPROVAL)
    )
    project = _project_of(s, r)
    if r.state == RolloutState.WAITING_FOR_APPROVAL:
        if who is not None:
            check_approver(project, who, "approve the next wave of the rollouts of")
    elif who is not None and not who.has_role("deployer"):
        raise ForbiddenError(
            f"a {who.role} token cannot resume a {r.state} rollout: it needs the deployer role",
            {"role": who.role, "needs": "deployer"},
        )
    data: dict[str, Any] = {"by": actor, "from": r.state}
    if r.state == RolloutState.HALTED:
        # Going on past a halt accepts the failures that caused it.
        failed = s.scalars(
            select(_jobs.c.id)
            .select_from(_jobs.join(_rd, _rd.c.job_id == _jobs.c.id))
            .where(_rd.c.rollout_id == r.id, _jobs.c.state.in_(FAILED_STATES))
        ).all()
        r.accepted = sorted(set(r.accepted or ()) | set(failed))
        data["accepted_failures"] = len(failed)
        r.halted = None
    r.state = RolloutState.RUNNING
    audit(s, r, project.name, AuditAction.ROLLOUT_RESUMED, data)
    s.flush()
    return advance(s, r.id)


def abort_rollout(s: Session, rollout_id: int, actor: str, who: Principal | None) -> Advanced:
    """Final: cancel the jobs not yet running, start none; running ones finish."""
    r = get_rollout(s, rollout_id, who, lock=True)
    _refuse(
        r,
        "aborted",
        (
            RolloutState.RUNNING,
            RolloutState.PAUSED,
            RolloutState.HALTED,
            RolloutState.WAITING_FOR_APPROVAL,
        ),
    )
    project = _project_of(s, r)
    waiting = (_jobs.c.state.in_((JobState.QUEUED, JobState.WAITING_FOR_APPROVAL))) | (
        (_jobs.c.state == JobState.WAITING_FOR_LOCK) & _jobs.c.worker.is_(None)
    )
    cancel = s.execute(
        select(_jobs.c.id, _dbs.c.name)
        .select_from(_jobs.join(_dbs, _dbs.c.id == _jobs.c.database_id))
        .where(_jobs.c.rollout_id == r.id, waiting)
    ).all()
    from service.audit.ops import record_event

    for job_id, database in cancel:
        done = s.execute(
            update(Job)
            .where(Job.id == job_id, waiting)
            .values(state=JobState.CANCELLED, finished_at=utcnow(), waiting_for=None)
        ).rowcount
        if done:
            record_event(
                s,
                AuditAction.JOB_CANCELLED,
                actor=actor,
                project=project.name,
                database=database,
                job_id=job_id,
                data={"rollout": r.id, "reason": "rollout_aborted"},
            )
    s.execute(
        update(RolloutDatabase)
        .where(
            RolloutDatabase.rollout_id == r.id,
            RolloutDatabase.job_id.is_(None),
            RolloutDatabase.skipped.is_(None),
        )
        .values(skipped="aborted")
    )
    r.state = RolloutState.ABORTED
    r.finished_at = utcnow()
    audit(
        s,
        r,
        project.name,
        AuditAction.ROLLOUT_ABORTED,
        {"by": actor, "cancelled_jobs": len(cancel)},
    )
    return Advanced(events=[AuditAction.ROLLOUT_ABORTED])


def retry_failed(s: Session, rollout_id: int, actor: str, who: Principal | None) -> Advanced:
    """Give every failed database a new job, and go on."""
    r = get_rollout(s, rollout_id, who, lock=True)
    _refuse(
        r,
        "retried",
        (RolloutState.HALTED, RolloutState.FAILED, RolloutState.RUNNING, RolloutState.PAUSED),
    )
    rows = s.execute(
        select(_rd.c.database_id, _rd.c.wave)
        .select_from(_rd.join(_jobs, _jobs.c.id == _rd.c.job_id))
        .where(_rd.c.rollout_id == r.id, _jobs.c.state.in_(FAILED_STATES))
    ).all()
    if not rows:
        raise ConflictError(
            f"rollout {r.id} has no failed database to retry",
            {"rollout": r.id, "state": r.state},
            code="nothing_to_retry",
        )
    s.execute(
        update(RolloutDatabase)
        .where(
            RolloutDatabase.rollout_id == r.id,
            RolloutDatabase.database_id.in_([d for d, _ in rows]),
        )
        .values(job_id=None)
    )
    r.wave = min(r.wave, min(w for _, w in rows))
    was = r.state
    r.state = RolloutState.PAUSED if was == RolloutState.PAUSED else RolloutState.RUNNING
    r.halted, r.finished_at = None, None
    audit(
        s,
        r,
        _project_of(s, r).name,
        AuditAction.ROLLOUT_RETRIED,
        {"by": actor, "databases": len(rows)},
    )
    s.flush()
    return advance(s, r.id)


def running_rollouts(s: Session, limit: int = 100) -> list[int]:
    """The rollouts the sweeper moves on at each round (a lost wake-up costs one round)."""
    return list(
        s.scalars(
            select(Rollout.id)
            .where(Rollout.state == RolloutState.RUNNING)
            .order_by(Rollout.id)
            .limit(limit)
        )
    )
