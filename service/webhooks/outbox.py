"""Send the deliveries a transaction wrote once it commits.

Audit events are recorded in many processes: the API, Celery pool processes
and the per-job children they fork. Each of those sessions may write webhook
deliveries (webhooks.enqueue.enqueue_deliveries). After the commit, the ids go to
the broker; if sending fails, or the process dies first, the sweeper finds the
deliveries still pending and sends them.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

from service.config import Config
from service.queue import Dispatcher
from service.webhooks.enqueue import OUTBOX

log = logging.getLogger("retort.webhooks")


_senders: list[threading.Thread] = []


def attach(
    sessions: sessionmaker[Session],
    config: Config,
    dispatcher: Dispatcher | None = None,
    background: bool = False,
):
    """Send committed deliveries from sessions of this factory (once per factory).

    `background`: send from a thread, so a slow broker never stalls the caller
    (a migration holding its target's lock); call flush() before exiting.
    """
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
        if background:
            sender = threading.Thread(target=send, args=(ids,), name="outbox", daemon=True)
            _senders.append(sender)
            sender.start()
        else:
            send(ids)

    def send(ids: list[int]) -> None:
        try:
            dispatcher = current()
            for delivery_id in ids:
                dispatcher.send_delivery(delivery_id)
        except Exception:  # noqa: BLE001 - the sweeper resends pending deliveries
            log.exception("could not send webhook deliveries %s; the sweeper will", ids)

    @event.listens_for(sessions, "after_rollback")
    def _drop(session: Session) -> None:
        session.info.pop(OUTBOX, None)


def flush(timeout: float) -> None:
    """Give background sends up to `timeout` seconds in all to finish (the sweeper has the rest)."""
    deadline = time.monotonic() + timeout
    for sender in _senders:
        sender.join(max(0.0, deadline - time.monotonic()))
    _senders.clear()
