"""Webhooks: subscriptions, the outbox of deliveries, and signing."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from service.audit import ops as audit
from service.crypto import SecretBox
from service.db import iso
from service.errors import InvalidError, NotFoundError
from service.projects.models import Project
from service.webhooks.models import Webhook, WebhookDelivery
from service.webhooks.schemas import EVENTS, WebhookCreate

# session.info key: deliveries written in this transaction, sent after it commits.
OUTBOX = "retort.webhook_deliveries"


def create_webhook(
    session: Session, project: Project, body: WebhookCreate, box: SecretBox, actor: str
) -> tuple[Webhook, str]:
    """Subscribe a URL to a project's job events; return the webhook and its secret."""
    try:
        parts = urlsplit(body.url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError:
        parts = None
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or any(ch.isspace() or ord(ch) < 32 for ch in body.url)
    ):
        raise InvalidError(
            "url must be an absolute http:// or https:// URL",
            {"field": "url"},
        )
    if parts.username or parts.password:
        raise InvalidError(
            "url must not carry credentials; verify deliveries with the signing secret",
            {"field": "url"},
        )
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
        "webhook.created",
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
        session, "webhook.deleted", actor=actor, project=project.name, data={"webhook": webhook_id}
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


# Looked up in every transaction that reports a job's start or end: a Core
# statement built once, the (id, events) rows only.
_hooks = Webhook.__table__
_ACTIVE_HOOKS = (
    select(_hooks.c.id, _hooks.c.events)
    .join(Project.__table__, Project.id == _hooks.c.project_id)
    .where(Project.name == bindparam("p_project"), _hooks.c.active.is_(True))
)


def enqueue_deliveries(
    session: Session,
    event: str,
    project: str | None,
    job_id: int | None,
    known: dict[str, list] | None = None,
):
    """Write one delivery per subscribed webhook, in the caller's transaction (an outbox).

    Called for every audit event: the delivery commits or rolls back with the
    event it reports, and is sent after the commit (see webhooks.outbox).
    `known` keeps each project's active webhooks across the events of one commit.
    """
    if event not in EVENTS or project is None or job_id is None:
        return
    known = {} if known is None else known
    if project not in known:
        known[project] = list(session.connection().execute(_ACTIVE_HOOKS, {"p_project": project}))
    hooks = [h for h in known[project] if event in h.events]
    if not hooks:
        return
    from service.jobs.ops import read_job  # jobs.ops imports audit, which calls us

    job_doc = read_job(session, job_id, with_steps=False)
    for hook in hooks:
        uid = str(uuid.uuid4())
        delivery = WebhookDelivery(
            webhook_id=hook.id,
            uid=uid,
            event=event,
            job_id=job_id,
            payload={"id": uid, "event": event, "job": job_doc},
        )
        session.add(delivery)
        session.flush()
        session.info.setdefault(OUTBOX, []).append(delivery.id)


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
