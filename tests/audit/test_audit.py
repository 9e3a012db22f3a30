"""The audit log is append-only and its hash chain proves it."""

import datetime as dt

import pytest
import sqlalchemy as sa

from tests.helpers import chain_bundle, register_db, run_job, setup_project


def test_chain_verifies_and_database_refuses_edits(retort, new_db):
    c = retort.client
    project, _ = setup_project(c, chain_bundle(1))
    db = register_db(c, project, new_db("sqlite"))
    assert run_job(c, db)["state"] == "succeeded"
    result = c.get("/v1/audit/verify").body
    assert result["ok"] is True and result["events"] > 5 and result["first_bad"] is None

    engine = sa.create_engine(retort.state_url, poolclass=sa.pool.NullPool)
    with pytest.raises(sa.exc.DBAPIError, match="append-only"):
        with engine.begin() as conn:
            conn.exec_driver_sql("UPDATE audit_events SET actor = 'mallory'")
    with pytest.raises(sa.exc.DBAPIError, match="append-only"):
        with engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM audit_events")
    engine.dispose()


def test_audit_pages_with_cursor_and_filters(prod, new_db):
    c = prod.client
    project, _ = setup_project(c, chain_bundle(2))
    db = register_db(c, project, new_db("sqlite"))
    run_job(c, db)
    everything = c.get(f"/v1/audit?project={project}&limit=1000").body["events"]
    assert {e["project"] for e in everything} == {project}
    seqs, cursor = [], None
    while True:
        page = c.get(
            f"/v1/audit?project={project}&limit=3" + (f"&cursor={cursor}" if cursor else "")
        )
        seqs += [e["seq"] for e in page.body["events"]]
        cursor = page.body["next_cursor"]
        if not cursor:
            break
    assert seqs == [e["seq"] for e in everything] and seqs == sorted(seqs, reverse=True)
    assert c.get("/v1/audit?limit=0").status == 422


def test_every_event_of_a_job_has_its_own_time_in_the_chains_order(prod, new_db):
    """Issue 21, item 7: the events of one transaction (claim, grant, start) kept one time."""
    c = prod.client
    project, _ = setup_project(c, chain_bundle(2))
    db = register_db(c, project, new_db("sqlite"))
    job = run_job(c, db)
    assert job["state"] == "succeeded", job
    events = c.get(f"/v1/audit?job={job['id']}&limit=100").body["events"][::-1]
    worker = [e for e in events if e["actor"] == "worker"]
    assert len(worker) >= 6, [e["action"] for e in worker]
    times = [dt.datetime.fromisoformat(e["ts"]) for e in events]
    assert len(set(times)) == len(times), times
    assert times == sorted(times), times  # oldest first, as the chain runs
