"""Webhooks: subscriptions, the outbox of deliveries, and signing."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.audit import ops as audit
from service.audit.actions import AuditAction
from service.config import Config
from service.crypto import SecretBox
from service.db import iso
from service.errors import InvalidError, NotFoundError
from service.projects.models import Project
from service.webhooks import network
from service.webhooks.enqueue import OUTBOX  # noqa: F401 - where it used to live
from service.webhooks.models import Webhook, WebhookDelivery
from service.webhooks.schemas import WebhookCreate

# session.info key: deliveries written in this transaction, sent after it commits.


def _split_url(url: str):
    """The URL's parts, once it is an absolute http(s) URL without credentials."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError:
        parts = None
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or any(ch.isspace() or ord(ch) < 32 for ch in url)
    ):
        raise InvalidError(
            "url must be an absolute http:// or https:// URL",
            {"field": "url"},
        )
    if parts.username is not None or parts.password is not None:
        raise InvalidError(
            "url must not carry credentials; verify deliveries with the signing secret",
            {"field": "url"},
        )
    return parts


def check_webhook_url(url: str, config: Config) -> None:
    """Refuse a URL whose host resolves to an address webhooks may not reach (422).

    Every address the resolver answers is judged (webhooks.network); a host
    that does not resolve (yet) passes: each delivery resolves and checks again.
    Call it outside a state transaction, the lookup may take the webhook timeout.
    """
    _split_url(url)
    allow = network.parse_networks(config.webhook_allow_networks)
    try:
        network.checked_within(url, allow, config.webhook_timeout_s)
    except network.Refused as exc:
        why = f"resolves to {exc.address}, which is {exc.reason}" if exc.address else exc.message
        raise InvalidError(
            f"url {why}: webhooks reach public addresses only, unless {network.SETTING} "
            "opens the network",
            {"field": "url", "address": exc.address, "reason": exc.reason},
            code="webhook_url_not_allowed",
        ) from None


def create_webhook(
    session: Session, project: Project, body: WebhookCreate, box: SecretBox, actor: str
) -> tuple[Webhook, str]:
    """Subscribe a URL to a project's job events; return the webhook and its secret.

    The API checks the URL's addresses first (check_webhook_url), outside this
    transaction; every delivery checks them again.
    """
    parts = _split_url(body.url)
    secret = body.secret or "whsec_" + secrets.token_urlsafe(32)
    hook = Webhook(
        project_id=project.id,
        url=body.url,
        events=sorted(set(body.events)),
        secret_encrypted=box.encrypt(secret),
        created_by=actor,
    )
    session.add(hook)
    session.flush()
    audit.record_event(
        session,
        AuditAction.WEBHOOK_CREATED,
        actor=actor,
        project=project.name,
        # Only the host: receivers' URLs often carry a secret in their path.
        data={"webhook": hook.id, "host": parts.hostname, "events": hook.events},
    )
    return hook, secret


def get_webhook(session: Session, project: Project, webhook_id: int) -> Webhook:
    hook = session.get(Webhook, webhook_id)
    if hook is None or hook.project_id != project.id or not hook.active:
        raise NotFoundError(
            f"no webhook {webhook_id} in project {project.name}",
            {"project": project.name, "webhook": webhook_id},
        )
    return hook


def list_webhooks(session: Session, project: Project) -> list[Webhook]:
    return list(
        session.scalars(
            select(Webhook)
            .where(Webhook.project_id == project.id, Webhook.active.is_(True))
            .order_by(Webhook.id)
        )
    )


def delete_webhook(session: Session, project: Project, webhook_id: int, actor: str) -> None:
    """Stop sending to a webhook; its deliveries stay on record."""
    get_webhook(session, project, webhook_id).active = False
    audit.record_event(
        session,
        AuditAction.WEBHOOK_DELETED,
        actor=actor,
        project=project.name,
        data={"webhook": webhook_id},
    )


def list_deliveries(
    session: Session, hook: Webhook, limit: int, before: int | None
) -> tuple[list[WebhookDelivery], int | None]:
    query = select(WebhookDelivery).where(WebhookDelivery.webhook_id == hook.id)
    if before:
        query = query.where(WebhookDelivery.id < before)
    rows = list(session.scalars(query.order_by(WebhookDelivery.id.desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, rows[-1].id if more else None


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """Return the Retort-Signature value: v1=HMAC-SHA256(secret, "<timestamp>." + body)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def serialize_webhook(hook: Webhook, project: Project, secret: str | None = None) -> dict:
    out: dict[str, Any] = {
        "id": hook.id,
        "project": project.name,
        "url": hook.url,
        "events": hook.events,
        "created_by": hook.created_by,
        "created_at": iso(hook.created_at),
    }
    if secret is not None:
        out["secret"] = secret
    return out


def serialize_delivery(d: WebhookDelivery) -> dict[str, Any]:
    return {
        "id": d.id,
        "uid": d.uid,
        "event": d.event,
        "job": d.job_id,
        "state": d.state,
        "attempts": d.attempts,
        "status_code": d.last_status_code,
        "error": d.last_error,
        "next_attempt_at": iso(d.next_attempt_at) if d.state == "pending" else None,
        "created_at": iso(d.created_at),
        "delivered_at": iso(d.delivered_at),
        "attempt_log": d.attempt_log,
    }
