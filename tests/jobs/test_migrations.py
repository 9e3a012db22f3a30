"""End to end: HTTP → broker → worker process → real target database → audit."""

import pytest

from tests.helpers import (
    chain_bundle,
    make_tar,
    register_db,
    revision,
    run_job,
    setup_project,
    tables,
)

DIALECTS = ["sqlite", "postgresql", "mysql"]


@pytest.mark.parametrize("dialect", DIALECTS)
def test_upgrade_downgrade_stamp_with_steps_and_audit(retort, new_db, dialect):
    c = retort.client
    url = new_db(dialect)
    project, bundle = setup_project(c, chain_bundle(3))
    db = register_db(c, project, url, tags={"env": "test"})

    state = c.get(f"/v1/databases/{db}").body
    assert state["current"] == [] and state["head"] == ["t003"]
    assert state["pending"] == ["t001", "t002", "t003"]

    job = run_job(c, db, action="upgrade", target="head")
    assert job["state"] == "succeeded", job
    assert job["from_heads"] == [] and job["to_heads"] == ["t003"]
    assert job["bundle"] == bundle["id"]
    assert job["lock"]["fencing_token"] >= 1 and job["lock"]["waited_ms"] >= 0
    assert [s["revisions"] for s in job["steps"]] == [["t001"], ["t002"], ["t003"]]
    assert all(s["direction"] == "up" and s["state"] == "applied" for s in job["steps"])
    assert any("CREATE TABLE items" in q for q in job["steps"][0]["sql"])
    assert any("ALTER TABLE items ADD" in q for q in job["steps"][1]["sql"])
    graph = {r["id"]: r for r in c.get(f"/v1/projects/{project}/bundles/latest").body["revisions"]}
    assert job["steps"][2]["sha256"] == graph["t003"]["sha256"]
    assert all(s["duration_ms"] >= 0 and s["started_at"] <= s["finished_at"] for s in job["steps"])
    assert job["requested_by"] == "admin"
    assert "items" in tables(url)

    state = c.get(f"/v1/databases/{db}").body
    assert state["current"] == ["t003"] and state["pending"] == []

    events = c.get(f"/v1/audit?database={db}").body["events"]
    actions = [e["action"] for e in reversed(events) if e["job_id"] == job["id"]]
    assert actions == [
        "job.requested",
        "job.claimed",
        "lease.granted",
        "job.started",
        "step.applied",
        "step.applied",
        "step.applied",
        "job.succeeded",
        "lease.released",
    ]
    token = job["lock"]["fencing_token"]
    assert all(
        e["fencing_token"] == token
        for e in events
        if e["job_id"] == job["id"] and e["actor"] == "worker" and e["action"] != "job.claimed"
    )
    assert c.get("/v1/audit/verify").body["ok"] is True

    down = run_job(c, db, action="downgrade", target="-1")
    assert down["state"] == "succeeded", down
    assert down["to_heads"] == ["t002"]
    assert down["steps"][0]["direction"] == "down" and down["steps"][0]["revisions"] == ["t003"]
    assert down["lock"]["fencing_token"] > token

    stamp = run_job(c, db, action="stamp", target="base")
    assert stamp["state"] == "succeeded", stamp
    assert stamp["to_heads"] == []
    assert c.get(f"/v1/databases/{db}").body["current"] == []

    noop = run_job(c, db, action="stamp", target="t002")
    assert noop["to_heads"] == ["t002"]
    up = run_job(c, db, action="upgrade", target="+1")
    assert up["state"] == "succeeded" and up["to_heads"] == ["t003"], up


FAILING = {
    "versions/f1.py": revision(
        "f1", None, "op.create_table('base_t', sa.Column('id', sa.Integer))"
    ),
    "versions/f2.py": revision("f2", "f1", "op.add_column('base_t', sa.Column('x', sa.Integer))"),
    "versions/f3.py": revision(
        "f3",
        "f2",
        """
        op.create_table('half_built', sa.Column('id', sa.Integer))
        op.execute('INSERT INTO no_such_table VALUES (1)')
        """,
        message="half built",
    ),
}
DB_MESSAGES = {
    "postgresql": 'relation "no_such_table" does not exist',
    "mysql": "doesn't exist",
    "sqlite": "no such table: no_such_table",
}


@pytest.mark.parametrize("dialect", DIALECTS)
def test_failing_revision_leaves_last_good_revision(retort, new_db, dialect):
    c = retort.client
    url = new_db(dialect)
    project, _ = setup_project(c, FAILING)
    db = register_db(c, project, url)
    job = run_job(c, db)
    assert job["state"] == "failed", job
    err = job["error"]
    assert err["revision"] == "f3"
    assert "no_such_table" in err["statement"]
    assert DB_MESSAGES[dialect] in err["database_message"]
    assert job["to_heads"] == ["f2"]
    assert [s["state"] for s in job["steps"]] == ["applied", "applied", "failed"]
    assert job["steps"][2]["revisions"] == ["f3"]
    assert c.get(f"/v1/databases/{db}").body["current"] == ["f2"]
    if dialect == "mysql":
        # DDL commits implicitly: the half-built table is really there, and we say so.
        assert err["code"] == "needs_attention"
        assert "half_built" in tables(url)
        assert "implicitly" in err["message"]
    else:
        assert err["code"] == "revision_failed"
        assert "half_built" not in tables(url)
        assert "last good revision" in err["message"]
    failed_events = [
        e for e in c.get(f"/v1/audit?job={job['id']}").body["events"] if e["action"] == "job.failed"
    ]
    assert failed_events and failed_events[0]["data"]["error"]["revision"] == "f3"


@pytest.mark.parametrize("dialect", ["postgresql", "mysql"])
def test_unreachable_target_fails_after_bounded_retries(prod, dialect):
    c = prod.client
    project, _ = setup_project(c, chain_bundle(1))
    port = 1  # nothing listens there
    url = (
        f"postgresql://retort:s3cret-pw@127.0.0.1:{port}/x"
        if dialect == "postgresql"
        else f"mysql://retort:s3cret-pw@127.0.0.1:{port}/x"
    )
    db = register_db(c, project, url)
    job = run_job(c, db)
    assert job["state"] == "failed"
    assert job["error"]["code"] == "target_unreachable"
    assert "after 2 attempts" in job["error"]["message"]
    assert "s3cret-pw" not in str(job)
    retries = [
        e
        for e in c.get(f"/v1/audit?job={job['id']}").body["events"]
        if e["action"] == "target.connect_retry"
    ]
    assert len(retries) == 1
    # The lease was released: the next job gets it at once.
    again = run_job(c, db)
    assert again["lock"]["fencing_token"] > job["lock"]["fencing_token"]
    assert c.get(f"/v1/databases/{db}").body["lock"]["held_by_job"] is None


def test_changed_revision_file_is_refused(prod, new_db):
    c = prod.client
    project, _ = setup_project(c, chain_bundle(2))
    db = register_db(c, project, new_db("postgresql"))
    assert run_job(c, db)["state"] == "succeeded"
    edited = chain_bundle(3)
    edited["versions/t001.py"] += "\n# edited after it was applied\n"
    r = c.post(
        f"/v1/projects/{project}/bundles", raw=make_tar(edited), content_type="application/gzip"
    )
    assert r.status == 201
    job = run_job(c, db)
    assert job["state"] == "failed"
    assert job["error"]["code"] == "revision_changed"
    assert job["error"]["revision"] == "t001"
    assert "t001" in job["error"]["message"]
    assert job["steps"] == []
    assert c.get(f"/v1/databases/{db}").body["current"] == ["t002"]
