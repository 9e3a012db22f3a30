"""Webhooks subscribe to the audit log: a delivery per event, in the event's transaction.

The audit log imports nothing of webhooks (an import contract); it tells its
subscribers (service.audit.hooks), and service.sessions subscribes webhooks for
every process. The end-to-end tests show deliveries for events the API records
(rollout.started, tests/rollouts/test_rollout_events.py) and the worker records
(job.started and the rest, tests/webhooks/test_webhooks.py).
"""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select

from service.audit.ops import record_event
from service.crypto import SecretBox
from service.db import make_engine, make_sessionmaker, transaction
from service.projects.ops import create_project
from service.projects.schemas import ProjectCreate
from service.schema import upgrade_schema
from service.sessions import make_state_sessions
from service.webhooks.enqueue import OUTBOX
from service.webhooks.models import WebhookDelivery
from service.webhooks.ops import create_webhook
from service.webhooks.schemas import WebhookCreate


@pytest.fixture
def state(tmp_path):
    url = f"sqlite:///{tmp_path / 'state.db'}"
    upgrade_schema(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


def _project_with_hook(sessions, events: list[str]) -> int:
    with transaction(sessions) as s:
        project = create_project(s, ProjectCreate(name="p"), "admin")
        body = WebhookCreate(url="https://example.com/h", events=events, secret="s" * 20)
        hook, _ = create_webhook(
            s, project, body, SecretBox((Fernet.generate_key().decode(),)), "a"
        )
        return hook.id


def test_an_event_writes_its_delivery_in_its_own_transaction(state):
    sessions = make_state_sessions(state, ("audit-key",))
    hook_id = _project_with_hook(sessions, ["rollout.halted"])
    with transaction(sessions) as s:
        record_event(s, "rollout.halted", actor="t", project="p", data={"rollout": 7})
        record_event(s, "rollout.paused", actor="t", project="p", data={"rollout": 7})
        record_event(s, "rollout.halted", actor="t", project="other", data={"rollout": 8})
        s.flush()
        # Written at the commit, with the events (the outbox's ids are sent after it).
        assert s.scalars(select(WebhookDelivery)).all() == []
    with transaction(sessions) as s:
        (delivery,) = s.scalars(select(WebhookDelivery)).all()
    assert delivery.webhook_id == hook_id and delivery.event == "rollout.halted"
    assert delivery.payload == {
        "id": delivery.uid,
        "event": "rollout.halted",
        "rollout": {"rollout": 7},
    }

    # A transaction that rolls back takes its events' deliveries with it.
    with pytest.raises(RuntimeError), transaction(sessions) as s:
        record_event(s, "rollout.halted", actor="t", project="p", data={"rollout": 9})
        s.flush()
        raise RuntimeError("the caller's work failed")
    with transaction(sessions) as s:
        assert len(s.scalars(select(WebhookDelivery)).all()) == 1
        assert OUTBOX not in s.info


def test_sessions_made_without_service_sessions_cannot_record_events(state):
    """So no process can record events and silently skip their webhooks."""
    plain = make_sessionmaker(state)
    with pytest.raises(RuntimeError, match="no audit key"), transaction(plain) as s:
        record_event(s, "rollout.halted", actor="t", project="p", data={})
