"""Append to and verify the hash-chained audit log."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from typing import Any

from sqlalchemy import bindparam, insert, select
from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session

from service.audit.models import AuditEvent, AuditHead
from service.db import utcnow
from service.webhooks.ops import enqueue_deliveries

GENESIS = "0" * 64


def _event_hash(fields: dict[str, Any]) -> str:
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _hashed_fields(event: AuditEvent | dict[str, Any]) -> dict[str, Any]:
    get = event.get if isinstance(event, dict) else lambda name: getattr(event, name)
    ts = get("ts")
    ts = ts if ts.tzinfo else ts.replace(tzinfo=dt.UTC)
    return {
        "seq": get("seq"),
        "ts": ts.astimezone(dt.UTC).isoformat(timespec="microseconds"),
        "actor": get("actor"),
        "action": get("action"),
        "project": get("project"),
        "database": get("database"),
        "job_id": get("job_id"),
        "fencing_token": get("fencing_token"),
        "data": get("data"),
        "prev_hash": get("prev_hash"),
    }


# session.info key: events recorded in this transaction, appended when it commits.
PENDING = "retort.audit_pending"


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
) -> None:
    """Record one event, appended to the chain when the caller's transaction commits.

    Events commit or roll back with the transaction that reports them. A
    transaction's events are appended together (see _append_pending), so the
    chain's head row is locked once per transaction, for its last moments only,
    however many events it carries: a 30-revision job's steps cost one append.
    """
    session.info.setdefault(PENDING, []).append(
        {
            "actor": actor,
            "action": action,
            "project": project,
            "database": database,
            "job_id": job_id,
            "fencing_token": fencing_token,
            # A JSON round trip now: what is hashed is what is stored and read back.
            "data": json.loads(json.dumps(data or {}, default=str)),
        }
    )


# The append's statements, built once: Core on the tables, not ORM-enabled
# statements, since they run in every writing transaction (see BENCHMARKS.md).
_events = AuditEvent.__table__
_head = AuditHead.__table__
_BUMP = _head.update().where(_head.c.id == 1).values(seq=_head.c.seq + bindparam("n"))
_BUMP_RETURNING = _BUMP.returning(_head.c.seq, _head.c.hash)
_READ_HEAD = select(_head.c.seq, _head.c.hash).where(_head.c.id == 1)
_SET_HASH = _head.update().where(_head.c.id == 1).values(hash=bindparam("new_hash"))
_INSERT_EVENTS = insert(_events)


@sa_event.listens_for(Session, "before_commit")
def _append_pending(session: Session) -> None:
    """Append the transaction's events to the chain, in the order they were recorded.

    The UPDATE of the head row comes first: it takes the row lock (PostgreSQL)
    or the write lock (SQLite) so concurrent appenders get one total order.
    """
    pending = session.info.pop(PENDING, None)
    if not pending:
        return
    n = len(pending)
    conn = session.connection()
    if conn.dialect.update_returning:
        seq, prev_hash = conn.execute(_BUMP_RETURNING, {"n": n}).one()
    else:
        conn.execute(_BUMP, {"n": n})
        seq, prev_hash = conn.execute(_READ_HEAD).one()
    ts = utcnow()
    rows = []
    for i, fields in enumerate(pending):
        row = {**fields, "seq": seq - n + 1 + i, "ts": ts, "prev_hash": prev_hash}
        row["hash"] = prev_hash = _event_hash(_hashed_fields(row))
        rows.append(row)
    conn.execute(_INSERT_EVENTS, rows)
    conn.execute(_SET_HASH, {"new_hash": prev_hash})
    hooks: dict[str, list] = {}
    for row in rows:
        enqueue_deliveries(session, row["action"], row["project"], row["job_id"], hooks)


@sa_event.listens_for(Session, "after_transaction_end")
def _drop_pending(session: Session, transaction) -> None:
    # Committed events were taken by _append_pending; any left were rolled back.
    if transaction.parent is None:
        session.info.pop(PENDING, None)


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
