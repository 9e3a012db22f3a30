"""Audit actions: one StrEnum, the strings the chain hashes and stores; webhook events too."""

import re

from sqlalchemy import select

from service.audit.actions import AuditAction
from service.audit.models import AuditEvent
from service.audit.ops import record_event, verify_chain
from service.db import make_engine, transaction
from service.schema import upgrade_schema
from service.sessions import make_state_sessions
from service.webhooks.schemas import EVENTS, WEBHOOK_ACTIONS


def test_each_action_is_one_domain_dot_verb_string():
    assert len(AuditAction.__members__) == len(AuditAction)  # no two names for one string
    for action in AuditAction:
        assert re.fullmatch(r"[a-z]+\.[a-z_]+", action.value), action
        assert action.name == action.value.upper().replace(".", "_"), action


def test_webhook_events_are_actions_as_plain_strings():
    assert set(WEBHOOK_ACTIONS) <= set(AuditAction)
    assert [type(e) for e in EVENTS] == [str] * len(WEBHOOK_ACTIONS)
    assert list(EVENTS) == [a.value for a in WEBHOOK_ACTIONS]


def test_a_member_is_recorded_as_its_string(tmp_path):
    url = f"sqlite:///{tmp_path / 'state.db'}"
    upgrade_schema(url)
    engine = make_engine(url)
    sessions = make_state_sessions(engine, ("audit-key",))
    with transaction(sessions) as s:
        record_event(s, AuditAction.SECRETS_ROTATED, actor="t", data={"n": 1})
        record_event(s, "secrets.rotated", actor="t", data={"n": 2})
    with transaction(sessions) as s:
        actions = s.scalars(select(AuditEvent.action).order_by(AuditEvent.seq)).all()
        assert actions == ["audit.rekeyed", "secrets.rotated", "secrets.rotated"]
        assert verify_chain(s)["ok"] is True
    engine.dispose()
