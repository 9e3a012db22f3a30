"""State sessions that record audit events: the one way every process gets them.

The API, the Celery pool processes (and the job children they fork), the
sweeper and the CLI's commands each build their sessions here. What the audit
log tells its subscribers (service.audit.hooks) is subscribed here, before the
first event can be recorded, so no process can forget it: a session made by
service.db.make_sessionmaker alone carries no audit key, and recording an event
on it fails at commit instead of dropping a webhook delivery without a word.
"""

from __future__ import annotations

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from service.audit.ops import AUDIT_KEYS
from service.db import make_sessionmaker
from service.webhooks import enqueue


def make_state_sessions(engine: Engine, audit_keys: tuple[str, ...]) -> sessionmaker[Session]:
    """Sessions of `engine` that extend the audit chain with `audit_keys` (Config.audit_keys)."""
    enqueue.subscribe_to_audit()
    return make_sessionmaker(engine, {AUDIT_KEYS: tuple(audit_keys)})
