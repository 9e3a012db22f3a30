"""Rollouts against the production layout (PostgreSQL state, two one-slot workers)."""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa

from service.rollouts.states import FINAL_STATES
from tests.helpers import Client, register_db, unique

NO_LINT = {"lint": {"enabled": False}}


def wait_rollout(c: Client, rollout_id: int, timeout: float = 90, until=None) -> dict[str, Any]:
    """Poll a rollout until it is final (or `until(doc)` holds); fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        doc = c.get(f"/v1/rollouts/{rollout_id}").body
        if (until(doc) if until else doc["state"] in FINAL_STATES) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert until(doc) if until else doc["state"] in FINAL_STATES, doc
    return doc


def fleet(c: Client, project: str, urls: list[str], tags: dict | None = None) -> list[str]:
    """Register the databases, named in the order given (names sort as the list does)."""
    base = unique("t")
    return [
        register_db(c, project, url, name=f"{base}-{i:03d}", tags=tags or {"tier": "tenant"})
        for i, url in enumerate(urls)
    ]


def jobs_of(c: Client, rollout_id: int) -> list[dict[str, Any]]:
    """Every current job of the rollout's databases, in the rollout's order."""
    out, cursor = [], None
    while True:
        page = c.get(
            f"/v1/rollouts/{rollout_id}/databases?limit=1000"
            + (f"&cursor={cursor}" if cursor else "")
        ).body
        out += [c.get(f"/v1/jobs/{d['job']}").body for d in page["databases"] if d["job"]]
        cursor = page["next_cursor"]
        if not cursor:
            return out


def _execute(url: str, sql: str) -> None:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(sql)
    finally:
        engine.dispose()


def make_table(url: str, name: str) -> None:
    _execute(url, f"CREATE TABLE {name} (id INTEGER)")


def drop_table(url: str, name: str) -> None:
    _execute(url, f"DROP TABLE {name}")
