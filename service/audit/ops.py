"""Append to and verify the hash-chained audit log."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.audit.models import AuditEvent, AuditHead
from service.db import utcnow
from service.webhooks.ops import enqueue_deliveries

GENESIS = "0" * 64


def _event_hash(fields: dict[str, Any]) -> str:
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _hashed_fields(event: AuditEvent) -> dict[str, Any]:
    ts = event.ts if event.ts.tzinfo else event.ts.replace(tzinfo=dt.UTC)
    return {
        "seq": event.seq,
        "ts": ts.astimezone(dt.UTC).isoformat(timespec="microseconds"),
        "actor": event.actor,
        "action": event.action,
        "project": event.project,
        "database": event.database,
        "job_id": event.job_id,
        "fencing_token": event.fencing_token,
        "data": event.data,
        "prev_hash": event.prev_hash,
    }


def record_event(
    session: Session,
    action: str,
    *,
    actor: str,
    project: str | None = None,
    database: str | None = None,
    job_id: int | None = None,
    fencing_token: int | None = None,
    data: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append one event to the chain inside the caller's transaction.

    The UPDATE of the head row comes first: it takes the row lock (PostgreSQL)
    or the write lock (SQLite) so concurrent appenders get one total order.
    """
    session.execute(update(AuditHead).where(AuditHead.id == 1).values(seq=AuditHead.seq + 1))
    seq, prev_hash = session.execute(
        select(AuditHead.seq, AuditHead.hash).where(AuditHead.id == 1)
    ).one()
    event = AuditEvent(
        seq=seq,
        ts=utcnow(),
        actor=actor,
        action=action,
        project=project,
        database=database,
        job_id=job_id,
        fencing_token=fencing_token,
        data=json.loads(json.dumps(data or {}, default=str)),
        prev_hash=prev_hash,
    )
    event.hash = _event_hash(_hashed_fields(event))
    session.add(event)
    session.execute(update(AuditHead).where(AuditHead.id == 1).values(hash=event.hash))
    enqueue_deliveries(session, action, project, job_id)
    return event


def verify_chain(session: Session, batch: int = 5000) -> dict[str, Any]:
    """Recompute every hash in order; report the first event that does not match."""
    prev = GENESIS
    count = 0
    last_seq = 0
    expected_seq = 1
    while True:
        rows = (
            session.execute(
                select(AuditEvent)
                .where(AuditEvent.seq > last_seq)
                .order_by(AuditEvent.seq)
                .limit(batch)
            )
            .scalars()
            .all()
        )
        if not rows:
            break
        for event in rows:
            count += 1
            ok = (
                event.seq == expected_seq
                and event.prev_hash == prev
                and event.hash == _event_hash(_hashed_fields(event))
            )
            if not ok:
                return {"ok": False, "events": count, "first_bad": event.seq}
            prev = event.hash
            expected_seq += 1
            last_seq = event.seq
        session.expunge_all()
    head = session.get(AuditHead, 1)
    if head is not None and (head.seq != last_seq or head.hash != prev):
        # Events were removed from the end of the chain.
        return {"ok": False, "events": count, "first_bad": last_seq + 1}
    return {"ok": True, "events": count, "first_bad": None}


def list_events(
    session: Session,
    *,
    database: str | None,
    project: str | None,
    job: int | None,
    limit: int,
    before: int | None,
    projects: frozenset[str] | None = None,
) -> tuple[list[AuditEvent], int | None]:
    """Return one page of events, newest first, and the seq to continue before.

    `projects` limits the page to those projects' events (a scoped token's view).
    """
    query = select(AuditEvent)
    if projects is not None:
        query = query.where(AuditEvent.project.in_(projects))
    if database:
        query = query.where(AuditEvent.database == database)
    if project:
        query = query.where(AuditEvent.project == project)
    if job:
        query = query.where(AuditEvent.job_id == job)
    if before:
        query = query.where(AuditEvent.seq < before)
    events = list(session.scalars(query.order_by(AuditEvent.seq.desc()).limit(limit + 1)))
    more = len(events) > limit
    events = events[:limit]
    return events, events[-1].seq if more else None


def serialize_event(event: AuditEvent) -> dict[str, Any]:
    out = _hashed_fields(event)
    out["hash"] = event.hash
    return out
