"""What every view shares: the app's services, who is asking, and the request's parsed body.

The application factory (service.app) and every blueprint import this; this
imports neither, so the blueprints and the app never import each other.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from typing import Any

from flask import current_app, g, request
from pydantic import BaseModel, ValidationError
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service.audit.actions import AuditAction
from service.audit.ops import record_event
from service.config import Config
from service.crypto import SecretBox
from service.db import transaction
from service.errors import (
    ForbiddenError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
    invalid_from,
)
from service.idempotency import ops as idempotency
from service.idempotency.ops import check_key
from service.jobs.cache import FinishedJobs
from service.jobs.wakeups import Wakeups
from service.jobs.watch import JobWatcher
from service.limits import RequestLimits, load_json, refusal_event
from service.principal import Principal
from service.queue import Dispatcher

log = logging.getLogger("retort.api")


@dataclasses.dataclass
class Services:
    config: Config
    engine: Engine
    sessions: sessionmaker[Session]
    box: SecretBox
    dispatcher: Dispatcher
    watcher: JobWatcher
    finished_jobs: FinishedJobs
    limits: RequestLimits
    wakeups: Wakeups


def services() -> Services:
    return current_app.extensions["retort"]


def principal() -> Principal:
    return g.principal


def actor() -> str:
    return g.principal.name


def require(role: str, *, everywhere: bool = False) -> None:
    """Refuse (403) a token whose role is below `role`, or that is not for every project."""
    who = principal()
    if not who.has_role(role):
        raise ForbiddenError(
            f"a {who.role} token cannot do this: it needs the {role} role",
            {"role": who.role, "needs": role},
        )
    if everywhere and not who.everywhere:
        raise ForbiddenError(
            'this needs a token for every project (projects: "*")',
            {"role": who.role, "needs": f"{role} on *"},
        )


def audit_refusal(status: int, code: str, message: str) -> None:
    """Record a refused write in the audit log: who, what, why (reads are not recorded).

    Without a valid token, refusals are counted per source address and recorded
    as one event per source per window carrying the count (service.limits).
    """
    if not 400 <= status < 500 or not request.path.startswith("/v1/"):
        return
    write = request.method not in ("GET", "HEAD", "OPTIONS")
    event = refusal_event(request.method, request.path, status, code, message)
    who = getattr(g, "principal", None)
    if who is None:
        source = request.remote_addr or "unknown"
        services().limits.refusals.note(source, event if write else None)
    elif write:
        record_refusal(services().sessions, who.name, event)


def record_refusal(sessions: sessionmaker[Session], who: str, data: dict[str, Any]) -> None:
    try:
        with transaction(sessions) as s:
            record_event(s, AuditAction.REQUEST_REFUSED, actor=who, data=data)
    except Exception:  # noqa: BLE001 - the refusal is answered even if it cannot be recorded
        log.exception("could not record a refused %s %s", data.get("method"), data.get("path"))


def idempotent(
    scope: str, payload: Any, create: Callable[[Session], tuple[str, int]]
) -> tuple[str, int, bool]:
    """Run `create` in a transaction once per Idempotency-Key; return (resource, status, replayed).

    Without the header this is just a transaction. With it, a repeat of the
    same request from the same token gets the first answer's resource and
    status; the same key with another request is a 422. `create` returns the
    resource it made (a job id, a bundle digest) and the status to answer with.
    """
    key = check_key(request.headers.get("Idempotency-Key"))
    digest = idempotency.request_digest(scope, payload)
    ttl = services().config.idempotency_ttl_s

    def attempt() -> tuple[str, int, bool]:
        with transaction(services().sessions) as s:
            if key is not None:
                prior = idempotency.find_replay(s, g.token_digest, key, digest, ttl)
                if prior is not None:
                    return prior.resource, prior.status_code, True
            resource, status = create(s)
            if key is not None:
                idempotency.remember(s, g.token_digest, key, scope, digest, status, resource)
            return resource, status, False

    try:
        return attempt()
    except IntegrityError:
        if key is None:
            raise
        # A concurrent request with the same key committed first: replay its answer.
        return attempt()


def parse_json(model: type[BaseModel]) -> Any:
    """Parse and validate a JSON body, or raise a 4xx that names the bad field."""
    config = services().config
    if request.content_length and request.content_length > config.max_body_bytes:
        raise PayloadTooLargeError(
            "the request body is too large", {"limit_bytes": config.max_body_bytes}
        )
    if not request.is_json:
        raise UnsupportedMediaTypeError("send the body as JSON (Content-Type: application/json)")
    # However it arrives (chunked too): at most the limit is read, nesting is bounded.
    data = load_json(request.stream, config.max_body_bytes, config.max_json_depth)
    # Strict JSON types, as the OpenAPI document says: `false` is not a number
    # and "5" is not an integer. (Query strings stay lax: everything there is text.)
    return validate(model, json.dumps(data), strict_json=True)


def parse_query(model: type[BaseModel]) -> Any:
    return validate(model, request.args.to_dict())


def validate(model: type[BaseModel], data: Any, strict_json: bool = False) -> Any:
    try:
        if strict_json:
            return model.model_validate_json(data, strict=True)
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_from(exc) from None
