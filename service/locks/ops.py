"""Leases on target databases, fenced by a token that only ever grows."""

from __future__ import annotations

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from service.db import epoch_now
from service.locks.models import Lease


class FencedOutError(Exception):
    """This holder's token is no longer the lease's: a newer holder took over."""

    def __init__(self, message: str, token: int, current: int, holder_job_id: int | None):
        super().__init__(message)
        self.token = token
        self.current = current
        self.holder_job_id = holder_job_id


def try_acquire(session: Session, database_id: int, job_id: int, holder: str, ttl: float):
    """Grant the lease if it is free or expired; return (token, None) or (None, holder job)."""
    dialect = session.bind.dialect
    now = epoch_now(dialect.name)
    grant = (
        update(Lease)
        .where(
            Lease.database_id == database_id,
            or_(Lease.holder_job_id.is_(None), Lease.expires_at < now),
        )
        .values(
            token=Lease.token + 1,
            holder_job_id=job_id,
            holder=holder,
            acquired_at=now,
            expires_at=now + ttl,
        )
        .execution_options(synchronize_session=False)
    )
    if dialect.update_returning:  # PostgreSQL, SQLite: one round trip for a free lease
        token = session.execute(grant.returning(Lease.token)).scalar()
        granted = token is not None
    else:
        granted = bool(session.execute(grant).rowcount)
        token = None
    if granted and token is not None:
        return token, None
    lease = session.execute(
        select(Lease.token, Lease.holder_job_id).where(Lease.database_id == database_id)
    ).one()
    if granted:
        return lease.token, None
    return None, lease.holder_job_id


def _held(database_id: int, token: int):
    """The lease row of `database_id` while `token` still holds it."""
    return (
        Lease.database_id == database_id,
        Lease.token == token,
        Lease.holder_job_id.is_not(None),
    )


def renew(session: Session, database_id: int, token: int, ttl: float) -> bool:
    now = epoch_now(session.bind.dialect.name)
    stmt = update(Lease).where(*_held(database_id, token)).values(expires_at=now + ttl)
    return bool(session.execute(stmt).rowcount)


def release(session: Session, database_id: int, token: int) -> bool:
    stmt = (
        update(Lease)
        .where(*_held(database_id, token))
        .values(holder_job_id=None, holder=None, expires_at=None)
    )
    return bool(session.execute(stmt).rowcount)


def check_fence(session: Session, database_id: int, token: int, *, lock: bool = True) -> None:
    """Lock the lease row and raise unless `token` still holds it.

    Called first in every transaction that writes on behalf of a lease holder,
    so a takeover either happens before (and the write is refused) or waits
    until the write committed. `lock=False` only reads: a check before a
    target commit whose records are written later, in a locked transaction.
    """
    query = select(Lease.token, Lease.holder_job_id).where(Lease.database_id == database_id)
    current = session.execute(query.with_for_update() if lock else query).one()
    if current.token != token or current.holder_job_id is None:
        raise FencedOutError(
            f"fencing token {token} is stale: the lease is now at token {current.token}",
            token,
            current.token,
            current.holder_job_id,
        )
