"""Which of a rollout's databases are settled without a run, and handing them out in batches.

Retort's state gives the hint (the database's newest migrate job ended at the
target); the task in service.rollouts.settle reads the truth from each
database. This module is what the rollout's creation and its coordinator
need: no target is read here.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service.bundles.models import Bundle
from service.jobs.models import Job
from service.jobs.states import JobState
from service.rollouts.models import RolloutDatabase

CANDIDATE, CHECKING = "candidate", "checking"
BATCH = 100  # databases a task reads and settles at once
IN_FLIGHT = 2 * BATCH  # at most this many `checking` at once per rollout (two tasks)
SETTLE_STALE_S = 120.0  # a batch still `checking` after this goes the ordinary way
_rd = RolloutDatabase.__table__


def target_heads(bundle: Bundle, action: str, target: str) -> frozenset[str] | None:
    """The heads a database ends at when nothing is left to do, or None if not known
    from the target alone (relative targets, branch@head, base, stamp)."""
    if action not in ("upgrade", "downgrade"):
        return None
    if target in ("head", "heads"):
        return frozenset(bundle.heads) if target == "heads" or len(bundle.heads) == 1 else None
    if any(r["id"] == target for r in bundle.revisions):
        return frozenset((target,))
    return None


def candidates(
    s: Session, project_id: int, database_ids: Iterable[int], heads: frozenset[str] | None
) -> set[int]:
    """The databases whose newest migrate job succeeded at `heads` (Retort's hint)."""
    if heads is None:
        return set()
    newest = (
        select(func.max(Job.id).label("id"))
        .where(Job.project_id == project_id, Job.kind == "migrate")
        .group_by(Job.database_id)
        .subquery()
    )
    rows = s.execute(
        select(Job.database_id, Job.state, Job.to_heads).join(newest, Job.id == newest.c.id)
    ).all()
    wanted = set(database_ids)
    return {
        database_id
        for database_id, state, to_heads in rows
        if database_id in wanted
        and state == JobState.SUCCEEDED
        and frozenset(to_heads or ()) == heads
    }


def take_batch(s: Session, rollout_id: int, wave: int, now: dt.datetime) -> list[int]:
    """In the coordinator's transaction: mark the next candidates `checking`; return them."""
    stale = now - dt.timedelta(seconds=SETTLE_STALE_S)
    s.execute(
        update(_rd)
        .where(
            _rd.c.rollout_id == rollout_id,
            _rd.c.settle == CHECKING,
            _rd.c.settle_started_at < stale,
        )
        .values(settle=None, settle_started_at=None)
    )
    checking = s.scalar(
        select(func.count())
        .select_from(_rd)
        .where(_rd.c.rollout_id == rollout_id, _rd.c.settle == CHECKING)
    )
    room = min(BATCH, IN_FLIGHT - (checking or 0))
    if room <= 0:
        return []
    ids = list(
        s.scalars(
            select(_rd.c.database_id)
            .where(
                _rd.c.rollout_id == rollout_id,
                _rd.c.wave == wave,
                _rd.c.settle == CANDIDATE,
                _rd.c.job_id.is_(None),
                _rd.c.skipped.is_(None),
            )
            .order_by(_rd.c.position)
            .limit(room)
        )
    )
    if ids:
        s.execute(
            update(_rd)
            .where(_rd.c.rollout_id == rollout_id, _rd.c.database_id.in_(ids))
            .values(settle=CHECKING, settle_started_at=now)
        )
    return ids
