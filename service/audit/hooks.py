"""Subscribers to the audit log: told of a transaction's events as they are appended.

A subscriber runs inside the transaction that records the events, before it
commits, so whatever it writes commits or rolls back with them (webhooks'
outbox does). The audit log names no subscriber: each subscribes itself, and
service.sessions subscribes them all in every process that records events.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session

# subscriber(session, events): the events (dicts of an audit row's columns) in chain order.
Subscriber = Callable[[Session, list[dict[str, Any]]], None]

_subscribers: list[Subscriber] = []


def subscribe(subscriber: Subscriber) -> None:
    """Tell `subscriber` of every transaction's events from now on (once, however often called)."""
    if subscriber not in _subscribers:
        _subscribers.append(subscriber)


def notify(session: Session, events: list[dict[str, Any]]) -> None:
    """Hand the events just appended, in the session's transaction, to each subscriber in turn."""
    for subscriber in _subscribers:
        subscriber(session, events)
