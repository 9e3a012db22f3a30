"""Settle a rollout's databases that are at the target already, in batches: no Alembic run.

A rollout over a thousand tenants that are all at head would otherwise run a
thousand jobs that each find nothing to do: a claim, a lease, a runner, a
start and an end each (about 40 ms of a worker slot apiece). Here a worker
takes a batch of them at once:

1. When the rollout is created, a database whose newest migrate job ended at
   the target's heads is marked a `candidate` (Retort's state is only a hint).
2. The coordinator hands up to BATCH candidates of the current wave to one
   task (`checking`), beside the ordinary jobs it starts for the others.
3. The task reads each one's heads from the database itself (read-only, as
   `GET /v1/databases/{name}` does, with the connect and read timeouts), with
   no state transaction open.
4. In one transaction, each database that is at the target, whose applied
   revisions' files are the bundle's, that is not refused for drift, and that
   no job may have changed meanwhile (none active when the batch was read or
   now, none newer) gets
   a job born `succeeded` (`settled: true`, from_heads = to_heads, no steps),
   audited (`job.requested`, `job.succeeded`) and linked to the rollout.
   Every other one goes back to the ordinary way: the coordinator starts a
   real job for it, which will apply what is missing or fail saying why.

A task that dies leaves its batch `checking`: after SETTLE_STALE_S the
coordinator gives those to the ordinary way. Nothing here runs tenant code;
a settled job's `sandbox` is null because nothing ran.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session

from service import metrics
from service.audit.actions import AuditAction
from service.audit.ops import record_event
from service.bundles.models import Bundle
from service.databases.models import Database
from service.databases.ops import read_live_heads
from service.db import transaction, utcnow
from service.jobs.models import Job
from service.jobs.ops import insert_job
from service.jobs.run.plan import changed_revisions
from service.jobs.run.steps import applied_checksums
from service.jobs.states import BUSY_STATES, JobState
from service.projects.models import Project
from service.rollouts.candidates import CANDIDATE, CHECKING, target_heads
from service.rollouts.drive import drive
from service.rollouts.models import Rollout, RolloutDatabase
from service.rollouts.states import RolloutState

log = logging.getLogger("retort.rollouts")

READERS = 8  # heads read at once (network targets wait on their servers)
# How long a batch's reads may go on: well within SETTLE_STALE_S (candidates.py), so a
# batch is never handed out again while its first task still reads.
READ_WINDOW_S = 30.0
_rd = RolloutDatabase.__table__
_ACTIVE = case((Job.state.in_(BUSY_STATES), 1), else_=0)


def settle_batch(process: Any, rollout_id: int, database_ids: list[int]) -> dict[str, int]:
    """The task: read the batch's heads, settle those at the target, move the rollout on.

    `process` is the worker's (service.jobs.run.context.WorkerProcess): its
    sessions, secret box, dispatcher and wake-ups.
    """
    config = process.config
    with transaction(process.sessions) as s:
        found = _batch(s, rollout_id, database_ids)
    if found is None:
        return {"settled": 0, "ordinary": 0}
    rollout, reads = found

    # Each read is bounded (connect, then the statement); past READ_WINDOW_S the
    # batch's remaining databases are not read: they take the ordinary way.
    window_ends = time.monotonic() + READ_WINDOW_S

    def read(item: dict[str, Any]) -> tuple[int, list[str] | None]:
        if time.monotonic() > window_ends:
            return item["database_id"], None
        try:
            heads, _why = read_live_heads(
                item["url_encrypted"], item["settings"], process.box, config.connect_timeout_s
            )
        except Exception:  # noqa: BLE001 - a URL that cannot be opened: the ordinary way says why
            log.warning("rollout %s: could not read database %s", rollout_id, item["name"])
            heads = None
        return item["database_id"], heads

    with ThreadPoolExecutor(max_workers=min(READERS, max(1, len(reads)))) as pool:
        live = dict(pool.map(read, reads))
    with transaction(process.sessions) as s:
        settled = _record(s, process.name, rollout, reads, live)
    metrics.jobs_settled(rollout["project"], settled)
    sender = process.scheduler.dispatcher
    drive(process.sessions, sender, process.wakeups, rollout_id)
    log.info(
        "rollout %s: %d of %d databases settled at the target without a run",
        rollout_id,
        settled,
        len(database_ids),
    )
    return {"settled": settled, "ordinary": len(database_ids) - settled}


def _batch(s: Session, rollout_id: int, database_ids: list[int]):
    """What the reads need, for the batch's rows still `checking`; None if none."""
    r = s.get(Rollout, rollout_id)
    if r is None:
        return None
    rows = s.execute(
        select(_rd.c.database_id).where(
            _rd.c.rollout_id == rollout_id,
            _rd.c.database_id.in_(database_ids),
            _rd.c.settle == CHECKING,
            _rd.c.job_id.is_(None),
        )
    ).all()
    ids = [row.database_id for row in rows]
    if not ids:
        return None
    project = s.get(Project, r.project_id)
    bundle = s.get(Bundle, r.bundle_pk)
    jobs = _jobs_of(s, ids)  # one with a job active now is not read: it could be half-way
    rollout = {
        "id": r.id,
        "project": project.name,
        "project_id": project.id,
        "bundle_pk": bundle.pk,
        "shas": {rev["id"]: rev["sha256"] for rev in bundle.revisions},
        "heads": target_heads(bundle, r.action, r.target),
        "action": r.action,
        "target": r.target,
        "requested_by": r.requested_by,
        "refuse_drifted": bool(
            ((project.settings or {}).get("drift") or {}).get("refuse_when_drifted")
        ),
    }
    reads = [
        {
            "database_id": db.id,
            "name": db.name,
            "url_encrypted": db.url_encrypted,
            "settings": project.settings or {},
            "newest_job": jobs.get(db.id, (None, False))[0],
            "busy": jobs.get(db.id, (None, False))[1],
            "drifted": bool(db.drifted),
            "removed": db.removed_at is not None,
        }
        for db in s.scalars(select(Database).where(Database.id.in_(ids)))
    ]
    return rollout, reads


def _record(s: Session, worker: str, rollout: dict[str, Any], reads: list[dict], live: dict) -> int:
    """Settle what may be settled; give the rest to the ordinary way. Returns how many."""
    r = s.scalar(select(Rollout).where(Rollout.id == rollout["id"]).with_for_update())
    ids = [item["database_id"] for item in reads]
    # This batch's rows only: still `checking`, no job, not skipped (a row handed out
    # again after going stale may have a job by now).
    back = update(_rd).where(
        _rd.c.rollout_id == rollout["id"],
        _rd.c.database_id.in_(ids),
        _rd.c.settle == CHECKING,
        _rd.c.job_id.is_(None),
        _rd.c.skipped.is_(None),
    )
    if r is None or rollout["heads"] is None:
        s.execute(back.values(settle=None, settle_started_at=None))  # the ordinary way
        return 0
    if r.state != RolloutState.RUNNING:
        # Paused, halted or aborted meanwhile: read again once it runs (if it does).
        s.execute(back.values(settle=CANDIDATE, settle_started_at=None))
        return 0
    still = {
        row.database_id
        for row in s.execute(
            select(_rd.c.database_id).where(
                _rd.c.rollout_id == r.id,
                _rd.c.database_id.in_(ids),
                _rd.c.settle == CHECKING,
                _rd.c.job_id.is_(None),
                _rd.c.skipped.is_(None),
            )
        )
    }
    busy = _touched(s, reads)
    s.scalars(select(Database).where(Database.id.in_(ids))).all()  # for _settled_job's s.get
    now = utcnow()
    settled = 0
    for item in reads:
        database_id = item["database_id"]
        if database_id not in still:
            continue
        heads = live.get(database_id)
        if (
            heads is None
            or frozenset(heads) != rollout["heads"]
            or database_id in busy
            or item["busy"]
            or item["removed"]
            or (item["drifted"] and rollout["refuse_drifted"])
            or changed_revisions(rollout["shas"], applied_checksums(s, database_id))
        ):
            continue
        job = _settled_job(s, worker, rollout, item, sorted(heads), now)
        s.execute(
            update(_rd)
            .where(_rd.c.rollout_id == r.id, _rd.c.database_id == database_id)
            .values(job_id=job.id, settle=None, settle_started_at=None)
        )
        settled += 1
    # The rest: the ordinary way (a real job, which applies what is missing or says why not).
    s.execute(back.values(settle=None, settle_started_at=None))
    return settled


def _jobs_of(s: Session, ids: list[int]) -> dict[int, tuple[int, bool]]:
    """Each database's newest job id, and whether one of its jobs is active."""
    rows = s.execute(
        select(Job.database_id, func.max(Job.id), func.sum(_ACTIVE))
        .where(Job.database_id.in_(ids))
        .group_by(Job.database_id)
    )
    return {database_id: (last, bool(active)) for database_id, last, active in rows}


def _touched(s: Session, reads: list[dict]) -> set[int]:
    """Databases a job may have changed since the batch was read: one with a job
    active now, or with a job newer than the newest seen then. (A lease is held
    only by an active job: its end releases it in the same transaction.)"""
    newest = {item["database_id"]: item["newest_job"] for item in reads}
    jobs = _jobs_of(s, list(newest))
    return {d for d, (last, busy) in jobs.items() if busy or last != newest.get(d)}


def _settled_job(
    s: Session,
    worker: str,
    rollout: dict[str, Any],
    item: dict[str, Any],
    heads: list[str],
    now: dt.datetime,
) -> Job:
    """A job requested as any rollout's job is (insert_job), ended at once: nothing to do."""
    project = s.get(Project, rollout["project_id"])
    bundle = s.get(Bundle, rollout["bundle_pk"])
    db = s.get(Database, item["database_id"])
    action, target, actor = rollout["action"], rollout["target"], rollout["requested_by"]
    job = insert_job(
        s, db, project, bundle, "migrate", action, target, None, actor, False, rollout["id"]
    ).job
    job.state = JobState.SUCCEEDED
    job.started_at = job.finished_at = now
    job.from_heads = job.to_heads = heads
    job.worker = worker
    job.lock_waited_ms = 0
    job.result = {"settled": True, "nothing_to_do": True}
    record_event(
        s,
        AuditAction.JOB_SUCCEEDED,
        actor="worker",
        project=project.name,
        database=db.name,
        job_id=job.id,
        data={"from_heads": heads, "to_heads": heads, "steps": 0, "settled": True},
    )
    return job
