"""The recovery action left to a human: unlock a database whose lease holder is gone."""

from __future__ import annotations

from tests.faults.conftest import _wait, applied_log, held_database, start_job


def test_unlock_is_refused_while_the_holder_is_alive_then_frees_a_dead_ones_lease(
    stack, new_db, tmp_path
):
    # No sweeper in this stack: nothing recovers the job but the admin.
    s = stack(workers=("w1",), beat=False)
    c = s.client
    url = new_db("postgresql")
    hold, db = held_database(c, tmp_path, url)
    job_id = start_job(c, db)
    hold.wait_entered()

    r = c.post(f"/v1/databases/{db}/unlock")
    assert r.status == 409, r
    assert r.body["error"]["code"] == "lease_held"
    assert r.body["error"]["details"]["job"] == job_id
    assert 0 < r.body["error"]["details"]["expires_in_s"] <= 4
    assert c.get(f"/v1/jobs/{job_id}").body["state"] == "running"  # untouched

    s.kill_worker("w1")
    hold.wait_abandoned()  # its runner dies a moment after it: opening first races its COMMIT
    hold.open()
    _wait(lambda: c.post(f"/v1/databases/{db}/unlock").status != 409, 15, "the lease to expire")
    job = c.get(f"/v1/jobs/{job_id}").body
    assert job["state"] == "failed" and job["error"]["code"] == "unlocked", job
    assert c.get(f"/v1/databases/{db}").body["lock"]["held_by_job"] is None
    events = c.get(f"/v1/audit?job={job_id}").body["events"]
    unlocked = next(e for e in events if e["action"] == "lease.unlocked")
    assert unlocked["actor"] == "admin" and unlocked["data"]["job"] == job_id
    assert applied_log(url) == ["r1"]  # r2 died with its worker, rolled back

    again = c.post(f"/v1/databases/{db}/unlock")
    assert again.status == 409 and again.body["error"]["code"] == "not_locked", again
    assert c.post("/v1/databases/nope/unlock").status == 404
    s.add_worker("w2")
    later = c.wait_job(c.post("/v1/jobs", {"database": db, "target": "head"}).body["id"])
    assert later["state"] == "succeeded", later
    assert applied_log(url) == ["r1", "r2", "r3"]
