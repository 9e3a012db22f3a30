"""API tokens: made by an admin, stored hashed, checked in constant time, revocable."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.audit.actions import AuditAction
from service.audit.ops import record_event
from service.db import iso, utcnow
from service.errors import ConflictError, InvalidError, NotFoundError
from service.principal import Principal
from service.projects.models import Project
from service.tokens.models import ApiToken
from service.tokens.schemas import TokenCreate

# rtk_<id>_<secret>: the id finds the row, the secret is compared by its hash.
_TOKEN = re.compile(r"^rtk_(\d{1,18})_([A-Za-z0-9_\-]{20,100})$")


# Actors Retort records itself: a token with one of these names could pass for them.
RESERVED_NAMES = frozenset({"admin", "worker", "sweeper", "anonymous", "system"})


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    if value is None or value.tzinfo:
        return value
    return value.replace(tzinfo=dt.UTC)


def create_token(session: Session, body: TokenCreate, actor: str) -> tuple[ApiToken, str]:
    """Make a token; return it and its clear text, which is never available again."""
    if body.name in RESERVED_NAMES:
        raise InvalidError(
            f"{body.name!r} is the name Retort itself records as actor; choose another",
            {"field": "name"},
        )
    if session.scalar(select(ApiToken.id).where(ApiToken.name == body.name)) is not None:
        raise ConflictError(f"a token named {body.name!r} already exists", {"name": body.name})
    projects = ["*"] if body.projects == "*" else sorted(set(body.projects))
    if projects != ["*"]:
        known = set(session.scalars(select(Project.name).where(Project.name.in_(projects))))
        missing = [p for p in projects if p not in known]
        if missing:
            raise InvalidError(
                f"no project named {missing[0]!r}",
                {"field": "projects", "unknown": missing},
                code="unknown_project",
            )
    expires_at = _aware(body.expires_at)
    if expires_at is not None and expires_at <= utcnow():
        raise InvalidError("expires_at is in the past", {"field": "expires_at"})
    secret = secrets.token_urlsafe(32)
    token = ApiToken(
        name=body.name,
        role=body.role,
        projects=projects,
        secret_sha256=_digest(secret),
        created_by=actor,
        expires_at=expires_at,
    )
    session.add(token)
    session.flush()
    record_event(
        session,
        AuditAction.TOKEN_CREATED,
        actor=actor,
        data={"token": token.name, "id": token.id, "role": token.role, "projects": projects},
    )
    return token, f"rtk_{token.id}_{secret}"


def authenticate(session: Session, presented: str) -> Principal | None:
    """Return who a presented token belongs to, or None if it is unknown, revoked or expired."""
    match = _TOKEN.match(presented)
    if not match:
        return None
    token = session.get(ApiToken, int(match.group(1)))
    # Hash and compare even for an unknown id, so timing does not tell ids apart.
    expected = token.secret_sha256 if token is not None else "0" * 64
    if not hmac.compare_digest(_digest(match.group(2)), expected) or token is None:
        return None
    if token.revoked_at is not None:
        return None
    expires_at = _aware(token.expires_at)
    if expires_at is not None and expires_at <= utcnow():
        return None
    projects = None if token.projects == ["*"] else frozenset(token.projects)
    return Principal(token.name, token.role, projects, token.id)


def list_tokens(session: Session) -> list[ApiToken]:
    return list(session.scalars(select(ApiToken).order_by(ApiToken.id)))


def revoke_token(session: Session, token_id: int, actor: str) -> ApiToken:
    token = session.get(ApiToken, token_id)
    if token is None:
        raise NotFoundError(f"no token {token_id}", {"token": token_id})
    if token.revoked_at is None:
        token.revoked_at = utcnow()
        record_event(
            session,
            AuditAction.TOKEN_REVOKED,
            actor=actor,
            data={"token": token.name, "id": token.id},
        )
    return token


def serialize_token(token: ApiToken, clear: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": token.id,
        "name": token.name,
        "role": token.role,
        "projects": "*" if token.projects == ["*"] else token.projects,
        "created_by": token.created_by,
        "created_at": iso(token.created_at),
        "expires_at": iso(token.expires_at),
        "revoked_at": iso(token.revoked_at),
    }
    if clear is not None:
        out["token"] = clear
    return out
