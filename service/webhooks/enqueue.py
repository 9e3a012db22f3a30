"""Webhook deliveries written in the transaction of the audit event they report (an outbox).

Webhooks subscribe to the audit log (service.audit.hooks), which knows
nothing of them; service.sessions subscribes them in every process.
"""

from __future__ import annotations

import uuid

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from service.audit import hooks
from service.jobs.ops import read_job
from service.projects.models import Project
from service.webhooks.models import Webhook, WebhookDelivery
from service.webhooks.schemas import EVENTS

# session.info key: the delivery ids a transaction wrote, sent after it commits.
OUTBOX = "retort.webhook_deliveries"

_hooks = Webhook.__table__

# Looked up in every transaction that reports a job's start or end: a Core
# statement built once, the (id, events) rows only.
_ACTIVE_HOOKS = (
    select(_hooks.c.id, _hooks.c.events)
    .join(Project.__table__, Project.id == _hooks.c.project_id)
    .where(Project.name == bindparam("p_project"), _hooks.c.active.is_(True))
)


def subscribe_to_audit() -> None:
    """Write the deliveries of every audit event this process records from now on."""
    hooks.subscribe(enqueue_for_events)


def enqueue_for_events(session: Session, events: list[dict]) -> None:
    """Write the deliveries of one transaction's audit events, in order (an audit subscriber)."""
    known: dict[str, list] = {}
    for e in events:
        enqueue_deliveries(session, e["action"], e["project"], e["job_id"], known, e["data"])


def enqueue_deliveries(
    session: Session,
    event: str,
    project: str | None,
    job_id: int | None,
    known: dict[str, list] | None = None,
    data: dict | None = None,
):
    """Write one delivery per subscribed webhook, in the caller's transaction (an outbox).

    Called for every audit event (enqueue_for_events): the delivery commits or rolls back with the
    event it reports, and is sent after the commit (see webhooks.outbox).
    `known` keeps each project's active webhooks across the events of one commit.
    """
    rollout = event.startswith("rollout.")
    if event not in EVENTS or project is None or (job_id is None and not rollout):
        return
    known = {} if known is None else known
    if project not in known:
        known[project] = list(session.connection().execute(_ACTIVE_HOOKS, {"p_project": project}))
    hooks = [h for h in known[project] if event in h.events]
    if not hooks:
        return
    if rollout:
        # The rollout as the event saw it (its id, state, wave and counts).
        body: dict = {"rollout": data or {}}
    else:
        body = {"job": read_job(session, job_id, with_steps=False)}
    for hook in hooks:
        uid = str(uuid.uuid4())
        delivery = WebhookDelivery(
            webhook_id=hook.id,
            uid=uid,
            event=event,
            job_id=job_id,
            payload={"id": uid, "event": event, **body},
        )
        session.add(delivery)
        session.flush()
        session.info.setdefault(OUTBOX, []).append(delivery.id)
