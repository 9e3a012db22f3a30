"""Send one webhook delivery: claim it, POST it signed, record the outcome.

Delivery is at least once: a worker that dies between the POST and the record
sends again later, with the same Retort-Delivery id for the receiver to drop.
Nothing here touches a job: a receiver that is down costs retries, never a
migration.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import random
import ssl
import threading
import time
import urllib.request
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from service import metrics
from service.config import Config
from service.crypto import SecretBox
from service.db import transaction, utcnow
from service.webhooks import network
from service.webhooks.models import Webhook, WebhookDelivery
from service.webhooks.ops import sign

log = logging.getLogger("retort.webhooks")
USER_AGENT = "Retort-Webhooks/1"


def _post(
    request: urllib.request.Request,
    timeout: float,
    allow: tuple[network.IPNetwork, ...],
    resolver: network.Resolver | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int | None, str | None]:
    """POST with one deadline for the whole exchange; return (status, error).

    The URL's host is resolved and checked here, at every attempt, and the
    request goes to the checked addresses only (webhooks.network). urllib's
    timeout bounds each socket operation, not the request: a receiver that
    trickles a byte at a time, or a slow DNS lookup, could hold on for minutes.
    The exchange runs in a daemon thread that is abandoned at the deadline.
    `error` names the class of failure, never bytes the receiver sent.
    """
    outcome: dict[str, Any] = {"status": None, "error": None}

    def run() -> None:
        try:
            outcome["status"] = network.send(request, allow, timeout, resolver, context)
        except Exception as exc:  # noqa: BLE001 - any network failure is a failed attempt
            outcome["error"] = network.describe(exc)

    sender = threading.Thread(target=run, name="webhook-post", daemon=True)
    sender.start()
    sender.join(timeout)
    if sender.is_alive():
        return None, f"timeout: no answer within {timeout:g} s"
    return outcome["status"], outcome["error"]


def _signed_request(
    url: str, secret: str, event: str, body: bytes, uid: str | None = None
) -> urllib.request.Request:
    """A POST of `body` signed with `secret` (Retort-Signature over the timestamp and body)."""
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "Retort-Event": event,
        "Retort-Timestamp": str(timestamp),
        "Retort-Signature": sign(secret, timestamp, body),
    }
    if uid is not None:
        headers["Retort-Delivery"] = uid
    return urllib.request.Request(url, data=body, method="POST", headers=headers)


def post_signed(config: Config, url: str, secret: str, event: str, payload: Any) -> str | None:
    """POST one signed event outside the delivery table (no retries); None or the error."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    request = _signed_request(url, secret, event, body)
    allow = network.parse_networks(config.webhook_allow_networks)
    status, error = _post(request, config.webhook_timeout_s, allow)
    if status is not None and not 200 <= status < 300:
        return f"http_status {status}"
    return error


def backoff_s(config: Config, attempts: int) -> float:
    """Delay before attempt n+1: doubling from webhook_backoff_s, capped, with 10% jitter."""
    base = min(config.webhook_backoff_max_s, config.webhook_backoff_s * 2 ** (attempts - 1))
    return base * random.uniform(0.9, 1.1)


def attempt_delivery(
    config: Config, sessions: sessionmaker[Session], box: SecretBox, delivery_id: int
) -> float | None:
    """Make one attempt; return the seconds until the next one, or None when done."""
    allow = network.parse_networks(config.webhook_allow_networks)  # a bad CIDR claims nothing
    claimed = _claim(config, sessions, box, delivery_id)
    if claimed is None:
        return None
    attempt, url, secret, body, event, uid = claimed
    request = _signed_request(url, secret, event, body, uid)
    started = time.monotonic()
    status, error = _post(request, config.webhook_timeout_s, allow)
    ok = status is not None and 200 <= status < 300
    if status is not None and not ok:
        error = f"http_status {status}"
    delay = _record(
        config,
        sessions,
        delivery_id,
        attempt,
        ok,
        status,
        error,
        round((time.monotonic() - started) * 1000, 1),
    )
    metrics.webhook_delivery(ok, delay)
    return delay


def _claim(config, sessions, box, delivery_id) -> tuple[int, str, str, bytes, str, str] | None:
    """Take the next attempt of a pending, due delivery; None if it is not ours to send."""
    with transaction(sessions) as s:
        d = s.get(WebhookDelivery, delivery_id)
        if d is None or d.state != "pending":
            return None
        due = (
            d.next_attempt_at
            if d.next_attempt_at.tzinfo
            else d.next_attempt_at.replace(tzinfo=dt.UTC)
        )
        if due > utcnow() + dt.timedelta(seconds=1):
            return None  # an early duplicate: the scheduled message will come
        # Move the due time past this attempt's timeout, so the sweeper does not
        # resend it while it is in flight; the conditional update makes the claim ours.
        attempt = d.attempts + 1
        claimed = s.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == d.id, WebhookDelivery.attempts == attempt - 1)
            .values(
                attempts=attempt,
                next_attempt_at=utcnow() + dt.timedelta(seconds=config.webhook_timeout_s + 60),
            )
        ).rowcount
        if not claimed:
            return None
        hook = s.get(Webhook, d.webhook_id)
        if hook is None or not hook.active:
            s.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id == d.id)
                .values(state="failed", last_error="the webhook was deleted")
            )
            return None
        body = json.dumps(d.payload, separators=(",", ":"), sort_keys=True).encode()
        return attempt, hook.url, box.decrypt(hook.secret_encrypted), body, d.event, d.uid


def _record(config, sessions, delivery_id, attempt, ok, status, error, ms) -> float | None:
    with transaction(sessions) as s:
        d = s.scalar(
            select(WebhookDelivery).where(WebhookDelivery.id == delivery_id).with_for_update()
        )
        if d is None or d.state != "pending" or d.attempts != attempt:
            return None  # another attempt took over this delivery (a resend raced us)
        entry: dict[str, Any] = {
            "attempt": attempt,
            "at": utcnow().isoformat().replace("+00:00", "Z"),
            "status_code": status,
            "error": error,
            "duration_ms": ms,
        }
        d.attempt_log = [*d.attempt_log, entry]
        d.last_status_code = status
        d.last_error = error
        if ok:
            d.state = "delivered"
            d.delivered_at = utcnow()
            return None
        if attempt >= config.webhook_max_attempts:
            d.state = "failed"
            log.warning("webhook delivery %s failed for good after %s attempts", d.uid, attempt)
            return None
        delay = backoff_s(config, attempt)
        d.next_attempt_at = utcnow() + dt.timedelta(seconds=delay)
        return delay


def deliveries_to_resend(session: Session, limit: int = 500) -> list[int]:
    """Return pending deliveries long past due: their message was lost (crash, broker restart)."""
    cutoff = utcnow() - dt.timedelta(seconds=30)
    ids = list(
        session.scalars(
            select(WebhookDelivery.id)
            .where(WebhookDelivery.state == "pending", WebhookDelivery.next_attempt_at < cutoff)
            .order_by(WebhookDelivery.id)
            .limit(limit)
        )
    )
    if not ids:
        return []
    # Only rows still pending and overdue: a worker may have claimed one meanwhile.
    session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id.in_(ids),
            WebhookDelivery.state == "pending",
            WebhookDelivery.next_attempt_at < cutoff,
        )
        .values(next_attempt_at=utcnow())
    )
    return ids
