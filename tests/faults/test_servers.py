"""The servers around Retort go away: its broker, its own state database, a target."""

from __future__ import annotations

import time

import sqlalchemy as sa

from tests.faults.conftest import (
    NO_LINT,
    Hold,
    _wait,
    applied_log,
    held_database,
    logged_chain,
    start_job,
)
from tests.helpers import TcpProxy, chain_bundle, register_db, setup_project

FINAL = ("succeeded", "failed", "cancelled")


def test_jobs_queued_when_redis_restarts_all_complete(stack, new_db, tmp_path):
    s = stack()
    c = s.client
    # Both workers busy with a held migration each...
    hold = Hold(tmp_path)
    hold.close()
    held_project, _ = setup_project(c, logged_chain(hold), settings=NO_LINT)
    held = []
    for _ in range(2):
        db = register_db(c, held_project, new_db("sqlite"))
        held.append(c.post("/v1/jobs", {"database": db, "target": "head"}).body["id"])
    hold.wait_entered(2)
    # ...so these wait in Redis, which keeps nothing on disk.
    project, _ = setup_project(c, chain_bundle(2))
    queued = []
    for _ in range(6):
        db = register_db(c, project, new_db("sqlite"))
        queued.append(c.post("/v1/jobs", {"database": db, "target": "head"}).body["id"])
    assert {c.get(f"/v1/jobs/{j}").body["state"] for j in queued} == {"queued"}
    s.redis.kill()
    s.redis.start()  # same address, empty: every queued message is gone
    hold.open()
    # The sweeper sees the broker lost its data and sends every queued job again
    # (the stack's fallback resend is an hour away: only that check can save them).
    for job_id in held + queued:
        job = c.wait_job(job_id, timeout=90)
        assert job["state"] == "succeeded", job
    assert "the broker lost its messages" in s.logs()


def _dispatched_at(s, job_id: int):
    engine = sa.create_engine(s.env["RETORT_DATABASE_URL"], poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return conn.execute(
                sa.text("SELECT dispatched_at FROM jobs WHERE id = :id"), {"id": job_id}
            ).scalar_one()
    finally:
        engine.dispose()


def test_a_job_posted_while_redis_is_down_is_sent_once_it_is_back(stack, new_db):
    s = stack()
    c = s.client
    project, _ = setup_project(c, chain_bundle(2))
    db = register_db(c, project, new_db("sqlite"))
    # Sent: the commit that created the job also marked it handed over.
    sent = c.post("/v1/jobs", {"database": db, "target": "+1"})
    assert sent.status == 202
    assert c.wait_job(sent.body["id"])["state"] == "succeeded"
    assert _dispatched_at(s, sent.body["id"]) is not None
    s.redis.kill()
    r = c.post("/v1/jobs", {"database": db, "target": "head"})
    assert r.status == 202, r.body
    assert r.body["state"] == "queued"
    # Sending failed: the mark is cleared, so the sweeper sends it within
    # seconds (the stack's fallback resend is an hour away).
    assert _dispatched_at(s, r.body["id"]) is None
    s.redis.start()
    job = c.wait_job(r.body["id"], timeout=60)
    assert job["state"] == "succeeded", job
    assert job["to_heads"] == ["t002"]


def test_state_postgres_restarted_while_a_job_runs(stack, new_db, tmp_path):
    s = stack(private_state=True)
    c = s.client
    url = new_db("postgresql")
    hold, db = held_database(c, tmp_path, url)
    job_id = start_job(c, db)
    hold.wait_entered()
    s.cluster.restart()  # every connection to Retort's state is cut
    hold.open()  # r2 now records its step into a database that just came back
    job = c.wait_job(job_id, timeout=90)
    assert job["state"] == "succeeded", job
    assert applied_log(url) == ["r1", "r2", "r3"]
    assert c.get("/v1/audit/verify").body["ok"] is True


def test_state_postgres_down_longer_than_the_lease(stack, new_db, tmp_path):
    s = stack(private_state=True)
    c = s.client
    url = new_db("postgresql")
    hold, db = held_database(c, tmp_path, url)
    job_id = start_job(c, db)
    hold.wait_entered()
    s.cluster.stop()
    hold.open()
    time.sleep(8)  # twice the lease TTL: the worker cannot renew, nor record r2
    s.cluster.start()
    job = c.wait_job(job_id, timeout=90)
    # A true state, never `running` forever: here, finished by a later attempt.
    assert job["state"] in FINAL, job
    if job["state"] == "failed":
        assert job["error"]["code"], job
    else:
        assert applied_log(url) == ["r1", "r2", "r3"]
    assert c.get(f"/v1/databases/{db}").body["lock"]["held_by_job"] is None
    assert c.get("/v1/audit/verify").body["ok"] is True


def _proxied_pg(new_db) -> tuple[str, str, TcpProxy]:
    """A fresh PostgreSQL database, and a URL reaching it through a proxy we can cut."""
    direct = new_db("postgresql")
    url = sa.make_url(direct)
    proxy = TcpProxy(url.port or 5432)
    return direct, url.set(port=proxy.port).render_as_string(hide_password=False), proxy


def test_target_unreachable_before_a_job(stack, new_db, tmp_path):
    s = stack(connect_attempts=3, connect_backoff_s=0.2)
    c = s.client
    direct, proxied, proxy = _proxied_pg(new_db)
    project, _ = setup_project(c, chain_bundle(2))
    db = register_db(c, project, proxied)  # the proxy is not listening: refused
    job = c.wait_job(c.post("/v1/jobs", {"database": db, "target": "head"}).body["id"])
    assert job["state"] == "failed", job
    assert job["error"]["code"] == "target_unreachable"
    assert "after 3 attempts" in job["error"]["message"]
    events = c.get(f"/v1/audit?job={job['id']}").body["events"]
    retries = sorted(e["data"]["attempt"] for e in events if e["action"] == "target.connect_retry")
    assert retries == [1, 2]
    assert c.get(f"/v1/databases/{db}").body["lock"]["held_by_job"] is None
    proxy.start()
    try:
        later = c.wait_job(c.post("/v1/jobs", {"database": db, "target": "head"}).body["id"])
    finally:
        proxy.stop()
    assert later["state"] == "succeeded" and later["to_heads"] == ["t002"], later


def test_target_lost_during_a_job_and_gone_for_good(stack, new_db, tmp_path):
    s = stack(connect_attempts=3, connect_backoff_s=0.2)
    c = s.client
    direct, proxied, proxy = _proxied_pg(new_db)
    hold, db = held_database(c, tmp_path, proxied)
    proxy.start()
    try:
        job_id = start_job(c, db)
        hold.wait_entered()
        proxy.stop()  # mid-r2, and it does not come back
        hold.open()
        job = c.wait_job(job_id, timeout=60)
        assert job["state"] == "failed", job
        assert job["error"]["code"] == "target_unreachable"
        assert job["error"]["revision"] == "r2"
        assert "lost during revision r2" in job["error"]["message"]
        assert "rolled back" in job["error"]["message"]
        assert c.get(f"/v1/databases/{db}").body["lock"]["held_by_job"] is None
        assert applied_log(direct) == ["r1"]
        proxy.start()  # back: a later job finishes the work
        later = c.wait_job(c.post("/v1/jobs", {"database": db, "target": "head"}).body["id"])
    finally:
        proxy.stop()
    assert later["state"] == "succeeded" and later["to_heads"] == ["r3"], later
    assert applied_log(direct) == ["r1", "r2", "r3"]


def test_target_lost_during_a_job_and_back_soon_resumes(stack, new_db, tmp_path):
    s = stack(connect_attempts=5, connect_backoff_s=0.5)
    c = s.client
    direct, proxied, proxy = _proxied_pg(new_db)
    hold, db = held_database(c, tmp_path, proxied)
    proxy.start()
    try:
        job_id = start_job(c, db)
        hold.wait_entered()
        proxy.stop()
        hold.open()
        _wait(
            lambda: any(
                e["action"] == "target.connection_lost"
                for e in c.get(f"/v1/audit?job={job_id}").body["events"]
            ),
            30,
            "the lost connection noticed",
        )
        proxy.start()
        job = c.wait_job(job_id, timeout=60)
    finally:
        proxy.stop()
    assert job["state"] == "succeeded", job
    assert job["attempt"] == 1 and job["to_heads"] == ["r3"]
    assert applied_log(direct) == ["r1", "r2", "r3"]
    actions = [e["action"] for e in c.get(f"/v1/audit?job={job_id}").body["events"]]
    assert "target.reconnected" in actions
