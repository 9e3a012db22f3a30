"""Remember the first answer to a request sent with an Idempotency-Key.

A deploy step that retries a POST after a timeout must not queue a second
migration. The key, a digest of the request and the resource it produced are
written in the same transaction as the resource, so a retry either finds them
or the first request never happened. Two requests racing with one key meet on
the unique (owner, key) index: the loser's transaction rolls back and it
replays the winner's answer.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from service.db import utcnow
from service.errors import InvalidError
from service.idempotency.models import IdempotencyKey

_KEY = re.compile(r"^[\x21-\x7e]{1,200}$")


def check_key(value: str | None) -> str | None:
    """Return the header's key, or raise a 422 if it is not 1-200 visible ASCII characters."""
    if value is None:
        return None
    if not _KEY.match(value):
        raise InvalidError(
            "Idempotency-Key must be 1 to 200 visible ASCII characters (a UUID is a good choice)",
            {"header": "Idempotency-Key"},
            code="invalid_idempotency_key",
        )
    return value


def request_digest(scope: str, payload: Any) -> str:
    """Digest what identifies a request: its endpoint and its canonical body."""
    if isinstance(payload, bytes):
        body = payload
    else:
        body = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(scope.encode() + b"\n" + body).hexdigest()


def find_replay(
    session: Session, owner: str, key: str, digest: str, ttl_s: float
) -> IdempotencyKey | None:
    """Return the remembered answer for this key, or None if it is new (or expired)."""
    row = session.scalar(
        select(IdempotencyKey).where(IdempotencyKey.owner == owner, IdempotencyKey.key == key)
    )
    if row is None:
        return None
    created = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=dt.UTC)
    if created < utcnow() - dt.timedelta(seconds=ttl_s):
        session.delete(row)
        session.flush()
        return None
    if row.request_hash != digest:
        raise InvalidError(
            f"Idempotency-Key {key!r} was already used for a different request; "
            "use a new key for a new request",
            {"header": "Idempotency-Key", "first_used_for": row.scope},
            code="idempotency_key_reused",
        )
    return row


def remember(
    session: Session, owner: str, key: str, scope: str, digest: str, status: int, resource: str
) -> None:
    session.add(
        IdempotencyKey(
            owner=owner,
            key=key,
            scope=scope,
            request_hash=digest,
            status_code=status,
            resource=resource,
        )
    )
    session.flush()


def purge_expired(session: Session, ttl_s: float) -> int:
    cutoff = utcnow() - dt.timedelta(seconds=ttl_s)
    return session.execute(
        delete(IdempotencyKey).where(IdempotencyKey.created_at < cutoff)
    ).rowcount
