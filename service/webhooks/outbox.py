"""Send the deliveries a transaction wrote once it commits.

Audit events are recorded in many processes: the API, Celery pool processes
and the per-job children they fork. Each of those sessions may write webhook
deliveries (webhooks.ops.enqueue_deliveries). After the commit, the ids go to
the broker; if sending fails, or the process dies first, the sweeper finds the
deliveries still pending and sends them.
"""

from __future__ import annotations

import logging
import os

from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

from service.config import Config
from service.queue import Dispatcher
from service.webhooks.ops import OUTBOX

log = logging.getLogger("retort.webhooks")


def attach(sessions: sessionmaker[Session], config: Config, dispatcher: Dispatcher | None = None):
    """Send committed deliveries from sessions of this factory (once per factory)."""
    owner = {"pid": os.getpid(), "dispatcher": dispatcher}

    def current() -> Dispatcher:
        # A forked child must not share its parent's broker connection.
        if owner["dispatcher"] is None or owner["pid"] != os.getpid():
            owner["pid"], owner["dispatcher"] = os.getpid(), Dispatcher(config)
        return owner["dispatcher"]

    @event.listens_for(sessions, "after_commit")
    def _send(session: Session) -> None:
        ids = session.info.pop(OUTBOX, None)
        if not ids:
            return
        try:
            dispatcher = current()
            for delivery_id in ids:
                dispatcher.send_delivery(delivery_id)
        except Exception:  # noqa: BLE001 - the sweeper resends pending deliveries
            log.exception("could not send webhook deliveries %s; the sweeper will", ids)

    @event.listens_for(sessions, "after_rollback")
    def _drop(session: Session) -> None:
        session.info.pop(OUTBOX, None)
