"""The sweeper: jobs whose message was lost still run; jobs whose worker died end."""

import time

from service.db import make_engine, make_sessionmaker, transaction
from service.jobs.models import Job
from service.jobs.ops import create_job
from service.jobs.schemas import JobCreate
from service.locks.models import Lease
from tests.helpers import chain_bundle, register_db, setup_project


def _sessions(server):
    return make_sessionmaker(make_engine(server.state_url, pooled=False))


def test_queued_job_whose_message_was_lost_still_runs(retort, new_db):
    c = retort.client
    project, _ = setup_project(c, chain_bundle(2))
    db = register_db(c, project, new_db("sqlite"))
    # The row is committed but no message ever reaches the broker (as when the
    # broker is down during the request).
    with transaction(_sessions(retort)) as s:
        job_id = create_job(s, JobCreate(database=db, target="head"), "admin")[0].id
    job = c.wait_job(job_id, timeout=60)
    assert job["state"] == "succeeded", job
    assert job["to_heads"] == ["t002"]


def test_job_whose_lease_expired_is_failed_and_the_lease_freed(prod, new_db):
    c = prod.client
    project, _ = setup_project(c, chain_bundle(1))
    db = register_db(c, project, new_db("sqlite"))
    sessions = _sessions(prod)
    with transaction(sessions) as s:
        job = create_job(s, JobCreate(database=db, target="head"), "admin")[0]
        lease = s.get(Lease, job.database_id)
        # A worker claimed it, took the lease, then died: its heartbeat stopped.
        lease.token += 1
        lease.holder_job_id = job.id
        lease.holder = "dead-worker:1"
        lease.expires_at = time.time() - 60
        job.state = "running"
        job.fencing_token = lease.token
    failed = c.wait_job(job.id, timeout=30)
    assert failed["state"] == "failed"
    assert failed["error"]["code"] == "worker_lost"
    assert c.get(f"/v1/databases/{db}").body["lock"]["held_by_job"] is None
    with transaction(sessions) as s:
        assert s.get(Job, job.id).state == "failed"
    # The database is usable again at once.
    r = c.post("/v1/jobs", {"database": db, "target": "head"})
    assert c.wait_job(r.body["id"])["state"] == "succeeded"
