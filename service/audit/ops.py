"""Append to and verify the hash-chained audit log."""

from __future__ import annotations

import datetime as dt
import functools
import json
from typing import Any

from sqlalchemy import bindparam, insert, select
from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session

from service.audit import hooks
from service.audit.actions import AuditAction
from service.audit.chain import ChainCheck, Keyring, event_hash, hashed_fields
from service.audit.models import AuditCheckpoint, AuditEvent, AuditHead
from service.db import utcnow

_TICK = dt.timedelta(microseconds=1)


def _hashed_fields(event: AuditEvent | dict[str, Any]) -> dict[str, Any]:
    return hashed_fields(event.get if isinstance(event, dict) else lambda n: getattr(event, n))


@functools.lru_cache(maxsize=8)
def _keyring(keys: tuple[str, ...]) -> Keyring:
    return Keyring(keys)


# Session.info key: the audit chain's HMAC keys (service.sessions gives them).
AUDIT_KEYS = "retort.audit_keys"


def keyring_of(session: Session) -> Keyring:
    """The audit keys this process was given (service.sessions.make_state_sessions)."""
    return _keyring(tuple(session.info.get(AUDIT_KEYS, ())))


# session.info key: events recorded in this transaction, appended when it commits.
PENDING = "retort.audit_pending"


def record_event(
    session: Session,
    action: AuditAction | str,
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
            "action": str(action),  # the plain string: hashed, stored, delivered
            "project": project,
            "database": database,
            "job_id": job_id,
            "fencing_token": fencing_token,
            # When it happened, not when its transaction commits: a job's claim,
            # grant and start share a transaction, and each keeps its own time.
            "ts": utcnow(),
            # A JSON round trip now: what is hashed is what is stored and read back.
            "data": json.loads(json.dumps(data or {}, default=str)),
        }
    )


# The append's statements, built once: Core on the tables, not ORM-enabled
# statements, since they run in every writing transaction (see BENCHMARKS.md).
_events = AuditEvent.__table__
_head = AuditHead.__table__
_BUMP = _head.update().where(_head.c.id == 1).values(seq=_head.c.seq + bindparam("n"))
_BUMP_RETURNING = _BUMP.returning(_head.c.seq, _head.c.hash, _head.c.key_id)
_READ_HEAD = select(_head.c.seq, _head.c.hash, _head.c.key_id).where(_head.c.id == 1)
_SET_HASH = _head.update().where(_head.c.id == 1).values(hash=bindparam("new_hash"))
_SET_HASH_KEY = (
    _head.update()
    .where(_head.c.id == 1)
    .values(hash=bindparam("new_hash"), key_id=bindparam("new_key_id"))
)
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
    keyring = keyring_of(session)
    if not keyring:
        raise RuntimeError("cannot extend the audit chain: this process has no audit key")
    n = len(pending)
    conn = session.connection()
    if conn.dialect.update_returning:
        seq, prev_hash, head_key = conn.execute(_BUMP_RETURNING, {"n": n}).one()
    else:
        conn.execute(_BUMP, {"n": n})
        seq, prev_hash, head_key = conn.execute(_READ_HEAD).one()
    if head_key != keyring.current:
        # A new chain, the first append since the chain was keyed, or a new
        # first key (a rotation): say so in the chain, keyed with the new key.
        conn.execute(_BUMP, {"n": 1})
        seq += 1
        n += 1
        rekeyed = {
            "actor": "system",
            "action": AuditAction.AUDIT_REKEYED.value,
            "project": None,
            "database": None,
            "job_id": None,
            "fencing_token": None,
            "data": {"key_id": keyring.current, "previous_key_id": head_key},
            "ts": pending[0]["ts"],
        }
        pending = [rekeyed, *pending]
    rows = []
    ts = None
    for i, fields in enumerate(pending):
        # Each event its own time, in the chain's order (one microsecond apart at least).
        ts = fields["ts"] if ts is None else max(fields["ts"], ts + _TICK)
        row = {**fields, "seq": seq - n + 1 + i, "ts": ts, "prev_hash": prev_hash}
        row["hash"] = prev_hash = event_hash(_hashed_fields(row))
        row["mac"] = keyring.mac(row["hash"])
        rows.append(row)
    conn.execute(_INSERT_EVENTS, rows)
    if head_key != keyring.current:
        conn.execute(_SET_HASH_KEY, {"new_hash": prev_hash, "new_key_id": keyring.current})
    else:
        conn.execute(_SET_HASH, {"new_hash": prev_hash})
    # Subscribers (webhooks' deliveries) write in this transaction, after the events.
    hooks.notify(session, rows)


@sa_event.listens_for(Session, "after_transaction_end")
def _drop_pending(session: Session, transaction) -> None:
    # Committed events were taken by _append_pending; any left were rolled back.
    if transaction.parent is None:
        session.info.pop(PENDING, None)


def verify_chain(
    session: Session,
    batch: int = 5000,
    public_keys: list | None = None,
    outside_checkpoints: list[dict[str, Any]] = (),
) -> dict[str, Any]:
    """Recompute every hash and HMAC in order; report the first event that does not match.

    Checkpoints come from the state database and from `outside_checkpoints`
    (copies kept elsewhere: a truncated tail shows against them). With
    `public_keys`, each checkpoint's signature is checked too.
    """
    check = ChainCheck(keyring_of(session))
    last_seq = 0
    while True:
        rows = session.execute(
            select(_events).where(_events.c.seq > last_seq).order_by(_events.c.seq).limit(batch)
        ).all()
        if not rows:
            break
        for row in rows:
            if not check.feed(dict(row._mapping)):
                return check.result()
            last_seq = row.seq
    head = session.get(AuditHead, 1)
    checkpoints = [export_checkpoint(c) for c in session.scalars(select(AuditCheckpoint))]
    return check.result(
        [*checkpoints, *outside_checkpoints],
        public_keys,
        head=(head.seq, head.hash) if head is not None else None,
    )


def export_checkpoint(cp: AuditCheckpoint) -> dict[str, Any]:
    return {
        "type": "checkpoint",
        "seq": cp.seq,
        "hash": cp.hash,
        "ts": cp.ts,
        "public_key_id": cp.public_key_id,
        "signature": cp.signature,
    }


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
    out["mac"] = event.mac
    return out
