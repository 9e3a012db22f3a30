"""The target's own session lock: a job waits while another session holds it.

A worker opens the target and tries its session lock before it claims the
job (so one transaction can claim, lease and start it). When that lock is
held elsewhere, the job must take the ordinary way: lease first, then wait
for the lock, touching nothing on the target until it has it.
"""

import time

import pytest
import sqlalchemy as sa

from service import targets
from service.jobs.run.target_files import SqliteLock
from tests.helpers import chain_bundle, register_db, setup_project, tables


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql", "mysql"])
def test_a_job_waits_for_the_targets_session_lock_held_elsewhere(prod, new_db, dialect):
    c = prod.client
    url = new_db(dialect)
    project, _ = setup_project(c, chain_bundle(2))
    db = register_db(c, project, url)

    # Another migrator (say, a pipeline still running `alembic upgrade` by hand
    # under the same lock) holds the target's session lock.
    target = targets.normalize_url(url)
    engine = sa.create_engine(target, poolclass=sa.pool.NullPool)
    holder = engine.connect()
    # SQLite has no session lock: the lock is the worker's file in the data directory.
    file_lock = SqliteLock(prod.log_dir, target.database) if dialect == "sqlite" else None
    try:
        if file_lock is not None:
            assert file_lock.try_take()
        else:
            assert targets.try_session_lock(holder, target, {})
        r = c.post("/v1/jobs", {"database": db, "action": "upgrade", "target": "head"})
        assert r.status == 202, r
        job_id = r.body["id"]
        c.wait_state(job_id, "waiting_for_lock")
        # The job holds Retort's lease and waits on the target: nothing applied.
        lock = c.get(f"/v1/databases/{db}").body["lock"]
        assert lock["held_by_job"] == job_id
        time.sleep(1.0)
        assert c.get(f"/v1/jobs/{job_id}").body["state"] == "waiting_for_lock"
        assert "items" not in tables(url)
        held_for = time.monotonic()
        if file_lock is not None:
            file_lock.release()
        else:
            targets.release_session_lock(holder, target, {})
    finally:
        holder.close()
        engine.dispose()
    job = c.wait_job(job_id)
    assert job["state"] == "succeeded", job
    assert job["to_heads"] == ["t002"]
    assert job["lock"]["waited_ms"] >= 900
    started = [
        e for e in c.get(f"/v1/audit?job={job_id}").body["events"] if e["action"] == "job.started"
    ]
    assert len(started) == 1 and started[0]["data"]["target_lock_waited_ms"] >= 900
    assert time.monotonic() - held_for < 30
    assert "items" in tables(url)


def test_an_ordinary_job_is_claimed_leased_and_started_in_one_transaction(prod, new_db):
    # The target is opened and locked before the claim: one state transaction
    # (its events' rows share PostgreSQL's xmin, the id of the transaction that
    # wrote them) instead of two.
    c = prod.client
    project, _ = setup_project(c, chain_bundle(2))
    db = register_db(c, project, new_db("sqlite"))
    r = c.post("/v1/jobs", {"database": db, "action": "upgrade", "target": "head"})
    job = c.wait_job(r.body["id"])
    assert job["state"] == "succeeded", job
    events = c.get(f"/v1/audit?job={job['id']}").body["events"]
    first = {e["action"]: e for e in events}
    claim = [first[a] for a in ("job.claimed", "lease.granted", "job.started")]
    assert [e["seq"] for e in claim] == list(range(claim[0]["seq"], claim[0]["seq"] + 3))
    engine = sa.create_engine(prod.state_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            writers = conn.execute(
                sa.text("SELECT DISTINCT xmin::text FROM audit_events WHERE seq = ANY(:seqs)"),
                {"seqs": [e["seq"] for e in claim]},
            ).all()
    finally:
        engine.dispose()
    assert len(writers) == 1, writers
