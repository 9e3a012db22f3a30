"""Fair scheduling (issue 19): a waiting job never holds a worker slot.

The production layout runs two workers of one slot each.
"""

from __future__ import annotations

import datetime as dt

from tests.helpers import register_db, revision, setup_project, unique
from tests.rollouts.conftest import NO_LINT, fleet, jobs_of, wait_rollout


def _t(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value)


def _slow(seconds: float) -> dict[str, str]:
    return {"versions/s.py": revision("s", None, f"import time; time.sleep({seconds})")}


def test_a_job_waiting_for_the_lease_gives_its_worker_slot_back(prod, new_db):
    c = prod.client
    a, _ = setup_project(c, _slow(4), settings=NO_LINT)
    db_a = register_db(c, a, new_db("sqlite"))
    b, _ = setup_project(c, _slow(0), settings=NO_LINT)
    db_b = register_db(c, b, new_db("sqlite"))
    first = c.post("/v1/jobs", {"database": db_a}).body
    c.wait_state(first["id"], "running")
    second = c.post("/v1/jobs", {"database": db_a, "coalesce": False}).body
    parked = c.wait_state(second["id"], "waiting_for_lock")
    deadline = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=10)
    while parked["lock"].get("waiting_for") != "lease" and dt.datetime.now(dt.UTC) < deadline:
        parked = c.get(f"/v1/jobs/{second['id']}").body
    assert parked["lock"]["waiting_for"] == "lease" and parked["worker"] is None, parked
    assert parked["lock"]["held_by_job"] == first["id"]
    # Both slots would be taken if the waiter held one: project B's job runs now.
    other = c.post("/v1/jobs", {"database": db_b}).body
    done_b = c.wait_job(other["id"], timeout=30)
    assert done_b["state"] == "succeeded", done_b
    assert c.get(f"/v1/jobs/{first['id']}").body["state"] == "running"
    done_first = c.wait_job(first["id"], timeout=30)
    assert _t(done_b["finished_at"]) < _t(done_first["finished_at"])
    waited = c.wait_job(second["id"], timeout=30)
    assert waited["state"] == "succeeded", waited
    # Woken by the holder's end, not by a poll: it starts right after.
    assert (_t(waited["started_at"]) - _t(done_first["finished_at"])).total_seconds() < 2
    assert waited["lock"]["waited_ms"] >= 1000
    events = c.get(f"/v1/audit?job={second['id']}&limit=100").body["events"]
    parks = [e for e in events if e["action"] == "job.parked"]
    assert len(parks) == 1 and parks[0]["data"] == {"waiting_for": "lease", "holder": first["id"]}


def test_a_project_running_limit_leaves_a_slot_for_another_project(prod, new_db):
    c = prod.client
    a, _ = setup_project(c, _slow(4), settings={**NO_LINT, "max_running_jobs": 1})
    fleet(c, a, [new_db("sqlite") for _ in range(3)])
    b, _ = setup_project(c, _slow(0), settings=NO_LINT)
    db_b = register_db(c, b, new_db("sqlite"), name=unique("b"))
    r = c.post("/v1/rollouts", {"project": a, "max_parallel": 3}).body
    wait_rollout(c, r["id"], until=lambda d: d["counts"]["running"] >= 1)
    # A's other two jobs are parked (the project's one slot is taken), not holding
    # the second worker: B's job gets it while A's first job still runs.
    other = c.wait_job(c.post("/v1/jobs", {"database": db_b}).body["id"], timeout=60)
    assert other["state"] == "succeeded", other
    done = wait_rollout(c, r["id"])
    assert done["state"] == "succeeded", done
    jobs = sorted(jobs_of(c, r["id"]), key=lambda j: j["started_at"])
    assert _t(other["finished_at"]) < _t(jobs[0]["finished_at"]), (other, jobs[0])
    spans = [(_t(j["started_at"]), _t(j["finished_at"])) for j in jobs]
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert start >= end, spans  # never two of project A's jobs at once
    parked = [
        e
        for j in jobs[1:]
        for e in c.get(f"/v1/audit?job={j['id']}&limit=100").body["events"]
        if e["action"] == "job.parked"
    ]
    assert parked and all(e["data"]["waiting_for"] == "project_slot" for e in parked), parked
