"""Leases on target databases, fenced by a token that only ever grows."""

from __future__ import annotations

import functools

from sqlalchemy import Float, bindparam, or_, select
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


# Built once per dialect (the clock expression differs): Core statements on the
# table, since every job runs several and an ORM-enabled one costs ~0.2 ms more.
_leases = Lease.__table__
_HELD = (
    _leases.c.database_id == bindparam("p_database_id"),
    _leases.c.token == bindparam("p_token"),
    _leases.c.holder_job_id.is_not(None),
)
_READ = select(_leases.c.token, _leases.c.holder_job_id).where(
    _leases.c.database_id == bindparam("p_database_id")
)
_READ_LOCKED = _READ.with_for_update()
_RELEASE = _leases.update().where(*_HELD).values(holder_job_id=None, holder=None, expires_at=None)


@functools.cache
def _grant(dialect: str, returning: bool):
    now = epoch_now(dialect)
    stmt = (
        _leases.update()
        .where(
            _leases.c.database_id == bindparam("p_database_id"),
            or_(_leases.c.holder_job_id.is_(None), _leases.c.expires_at < now),
        )
        .values(
            token=_leases.c.token + 1,
            holder_job_id=bindparam("job_id"),
            holder=bindparam("holder_name"),
            acquired_at=now,
            expires_at=now + bindparam("ttl", type_=Float),
        )
    )
    return stmt.returning(_leases.c.token) if returning else stmt


@functools.cache
def _renew(dialect: str):
    now = epoch_now(dialect)
    return _leases.update().where(*_HELD).values(expires_at=now + bindparam("ttl", type_=Float))


def try_acquire(session: Session, database_id: int, job_id: int, holder: str, ttl: float):
    """Grant the lease if it is free or expired; return (token, None) or (None, holder job)."""
    conn = session.connection()
    dialect = conn.dialect
    returning = dialect.update_returning  # PostgreSQL, SQLite: one round trip for a free lease
    params = {"p_database_id": database_id, "job_id": job_id, "holder_name": holder, "ttl": ttl}
    result = conn.execute(_grant(dialect.name, returning), params)
    if returning:
        token = result.scalar()
        if token is not None:
            return token, None
        granted = False
    else:
        granted = bool(result.rowcount)
    lease = conn.execute(_READ, {"p_database_id": database_id}).one()
    if granted:
        return lease.token, None
    return None, lease.holder_job_id


_READ_EXPIRY_LOCKED = (
    select(_leases.c.holder_job_id, _leases.c.expires_at)
    .where(_leases.c.database_id == bindparam("p_database_id"))
    .with_for_update()
)


def holder_locked(session: Session, database_id: int) -> tuple[int | None, float | None]:
    """The lease's holder job and expiry (epoch s), the row locked till the caller's commit.

    A waiter that parks reads this before it does: a holder releasing the lease
    meanwhile either commits first (the waiter sees it free) or waits for the
    waiter's commit (and then finds it parked when it wakes the waiters).
    """
    row = session.connection().execute(_READ_EXPIRY_LOCKED, {"p_database_id": database_id}).one()
    return row.holder_job_id, row.expires_at


def renew(session: Session, database_id: int, token: int, ttl: float) -> bool:
    conn = session.connection()
    params = {"p_database_id": database_id, "p_token": token, "ttl": ttl}
    return bool(conn.execute(_renew(conn.dialect.name), params).rowcount)


def release(session: Session, database_id: int, token: int) -> bool:
    params = {"p_database_id": database_id, "p_token": token}
    return bool(session.connection().execute(_RELEASE, params).rowcount)


def release_fenced(session: Session, database_id: int, token: int) -> None:
    """Release the lease as the first write of a holder's last transaction.

    The UPDATE locks the lease row as check_fence does, so it fences the rest
    of the transaction too (one statement instead of two); a holder whose
    token is stale gets FencedOutError and releases nothing.
    """
    if not release(session, database_id, token):
        raise _stale(token, _current(session, database_id, lock=False))


def check_fence(session: Session, database_id: int, token: int, *, lock: bool = True) -> None:
    """Lock the lease row and raise unless `token` still holds it.

    Called first in every transaction that writes on behalf of a lease holder,
    so a takeover either happens before (and the write is refused) or waits
    until the write committed. `lock=False` only reads: a check before a
    target commit whose records are written later, in a locked transaction.
    """
    current = _current(session, database_id, lock)
    if current.token != token or current.holder_job_id is None:
        raise _stale(token, current)


def _current(session: Session, database_id: int, lock: bool):
    """The lease row's token and holder (locked: FOR UPDATE)."""
    params = {"p_database_id": database_id}
    return session.connection().execute(_READ_LOCKED if lock else _READ, params).one()


def _stale(token: int, current) -> FencedOutError:
    return FencedOutError(
        f"fencing token {token} is stale: the lease is now at token {current.token}",
        token,
        current.token,
        current.holder_job_id,
    )
