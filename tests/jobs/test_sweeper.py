"""The sweeper: jobs whose message was lost still run; jobs whose worker died end."""

import time

from service.db import make_engine, transaction
from service.jobs.models import Job
from service.jobs.ops import create_job, read_job
from service.jobs.schemas import JobCreate
from service.locks.models import Lease
from service.sessions import make_state_sessions
from tests.helpers import chain_bundle, register_db, setup_project


def _sessions(server):
    keys = tuple(server.env["RETORT_AUDIT_KEY"].split(","))
    return make_state_sessions(make_engine(server.state_url, pooled=False), keys)


def test_queued_job_whose_message_was_lost_still_runs(retort, new_db):
    c = retort.client
    project, _ = setup_project(c, chain_bundle(2))
    db = register_db(c, project, new_db("sqlite"))
    # The row is committed but no message ever reaches the broker (as when the
    # broker is down during the request).
    sessions = _sessions(retort)
    with transaction(sessions) as s:
        created = create_job(s, JobCreate(database=db, target="head"), "admin")
    job_id = created.job.id
    # What POST answers is built without reading the row back: it is that row.
    with transaction(sessions) as s:
        assert read_job(s, job_id) == created.document
    job = c.wait_job(job_id, timeout=60)
    assert job["state"] == "succeeded", job
    assert job["to_heads"] == ["t002"]


def _fake_dead_holder(sessions, db: str, attempt: int) -> tuple[int, int]:
    """A job a worker claimed and leased, then died with: its heartbeat stopped."""
    with transaction(sessions) as s:
        job = create_job(s, JobCreate(database=db, target="head"), "admin")[0]
        lease = s.get(Lease, job.database_id)
        lease.token += 1
        lease.holder_job_id = job.id
        lease.holder = "dead-worker:1"
        lease.expires_at = time.time() - 60
        job.state = "running"
        job.attempt = attempt
        job.worker = "dead-worker:1"
        job.fencing_token = lease.token
        return job.id, lease.token


def test_job_whose_lease_expired_is_recovered_with_a_higher_token(prod, new_db):
    c = prod.client
    project, _ = setup_project(c, chain_bundle(2))
    db = register_db(c, project, new_db("sqlite"))
    job_id, dead_token = _fake_dead_holder(_sessions(prod), db, attempt=1)
    job = c.wait_job(job_id, timeout=30)
    assert job["state"] == "succeeded", job
    assert job["attempt"] == 2
    assert job["to_heads"] == ["t002"]
    assert job["lock"]["fencing_token"] > dead_token
    events = c.get(f"/v1/audit?job={job_id}&limit=100").body["events"]
    recovering = [e for e in events if e["action"] == "job.recovering"]
    assert len(recovering) == 1, events
    assert recovering[0]["data"]["worker"] == "dead-worker:1"
    assert recovering[0]["data"]["next_attempt"] == 2


def test_job_out_of_attempts_is_failed_and_the_lease_freed(prod, new_db):
    c = prod.client
    project, _ = setup_project(c, chain_bundle(1))
    db = register_db(c, project, new_db("sqlite"))
    sessions = _sessions(prod)
    job_id, _ = _fake_dead_holder(sessions, db, attempt=3)
    failed = c.wait_job(job_id, timeout=30)
    assert failed["state"] == "failed"
    assert failed["error"]["code"] == "worker_lost"
    assert "3 attempt" in failed["error"]["message"]
    assert c.get(f"/v1/databases/{db}").body["lock"]["held_by_job"] is None
    with transaction(sessions) as s:
        assert s.get(Job, job_id).state == "failed"
    # The database is usable again at once.
    r = c.post("/v1/jobs", {"database": db, "target": "head"})
    assert c.wait_job(r.body["id"])["state"] == "succeeded"
