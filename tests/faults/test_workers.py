"""Workers that die, freeze or are stopped in the middle of a migration."""

from __future__ import annotations

import signal
import time

import pytest

from tests.faults.conftest import _wait, applied_log, held_database, start_job


def _events(c, job_id: int) -> list[dict]:
    return c.get(f"/v1/audit?job={job_id}&limit=1000").body["events"][::-1]  # oldest first


def _steps_by_revision(job: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for step in job["steps"]:
        for rev in step["revisions"]:
            out.setdefault(rev, []).append(step)
    return out


def _start_held_job(s, new_db, tmp_path, dialect: str):
    c = s.client
    url = new_db(dialect)
    hold, db = held_database(c, tmp_path, url)
    job_id = start_job(c, db)
    hold.wait_entered()
    job = c.get(f"/v1/jobs/{job_id}").body
    assert job["state"] == "running", job
    return c, hold, url, db, job


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
def test_worker_killed_mid_migration_is_recovered(stack, new_db, tmp_path, dialect):
    s = stack()
    c, hold, url, db, job = _start_held_job(s, new_db, tmp_path, dialect)
    first_token = job["lock"]["fencing_token"]
    name, _ = s.worker_of(job)
    s.kill_worker(name)  # r2 is mid-transaction: it dies with its worker
    hold.wait_abandoned()
    hold.open()

    done = c.wait_job(job["id"], timeout=90)
    assert done["state"] == "succeeded", done
    assert done["attempt"] == 2
    assert done["to_heads"] == ["r3"]
    assert done["from_heads"] == []
    assert done["lock"]["fencing_token"] > first_token
    # r2 ran twice, but only the second run committed: nothing applied twice.
    assert hold.times_entered() == 2
    assert applied_log(url) == ["r1", "r2", "r3"]
    steps = _steps_by_revision(done)
    assert {rev: len(v) for rev, v in steps.items()} == {"r1": 1, "r2": 1, "r3": 1}
    # r1 was recorded by the first attempt, or (its record still buffered when the
    # worker died) by the second, from what the target's version table says.
    r1 = steps["r1"][0]
    assert r1["fencing_token"] == first_token or "recorded on recovery" in r1["message"], r1
    assert steps["r2"][0]["fencing_token"] == steps["r3"][0]["fencing_token"] > first_token

    # The audit log tells the story, and its chain still verifies.
    actions = [(e["action"], e["fencing_token"]) for e in _events(c, job["id"])]
    names = [a for a, _ in actions]
    assert names.index("job.started") < names.index("job.recovering") < names.index("job.resumed")
    granted = [t for a, t in actions if a == "lease.granted"]
    assert len(granted) == 2 and granted[0] < granted[1], actions
    recovering = next(e for e in _events(c, job["id"]) if e["action"] == "job.recovering")
    assert recovering["data"]["code"] == "worker_lost"
    assert recovering["actor"] == "sweeper"
    resumed = next(e for e in _events(c, job["id"]) if e["action"] == "job.resumed")
    assert resumed["data"]["current_heads"] == ["r1"]  # read from the target, not assumed
    assert c.get("/v1/audit/verify").body["ok"] is True
    assert c.get(f"/v1/databases/{db}").body["lock"]["held_by_job"] is None


@pytest.mark.parametrize("sandbox", ["bwrap", "process"])
def test_a_frozen_holders_late_writes_are_fenced_out(stack, new_db, tmp_path, sandbox):
    """A holder frozen past its lease (SIGSTOP, a VM pause) cannot commit once it wakes.

    The pool process freezes (its heartbeat with it) while its runner goes on
    to its step's end and waits there, holding the target's session lock, for
    the worker's word on the fence; the worker, thawed, refuses the step.
    """
    s = stack(sandbox=sandbox)
    c, hold, url, db, job = _start_held_job(s, new_db, tmp_path, "postgresql")
    old_token = job["lock"]["fencing_token"]
    _, pool_pid = s.worker_of(job)
    s.freeze(pool_pid)
    # The lease expires, the sweeper hands the job over, a new attempt takes the
    # lease with a higher token and waits for the target's session lock...
    _wait(lambda: c.get(f"/v1/jobs/{job['id']}").body["attempt"] == 2, 30, "a second attempt")
    _wait(
        lambda: (c.get(f"/v1/jobs/{job['id']}").body["lock"]["fencing_token"] or 0) > old_token,
        30,
        "the new holder's lease",
    )
    # ...which the old migration still holds. Let it go on: its step is refused.
    hold.open()
    s.thaw(pool_pid)
    done = c.wait_job(job["id"], timeout=90)
    assert done["state"] == "succeeded", done
    new_token = done["lock"]["fencing_token"]
    assert new_token > old_token
    assert applied_log(url) == ["r1", "r2", "r3"]
    assert hold.times_entered() == 2
    steps = _steps_by_revision(done)
    assert [st["fencing_token"] for st in steps["r2"]] == [new_token]
    refused = [e for e in _events(c, job["id"]) if e["action"] == "write.fenced_out"]
    assert refused, "the stale holder's write was not refused"
    assert refused[0]["data"]["token"] == old_token
    assert refused[0]["data"]["lease_token"] == new_token
    assert refused[0]["data"]["refused"] == "step.applied"
    # Once thawed, the old holder finds its lease gone and leaves the job alone.
    time.sleep(3)
    again = c.get(f"/v1/jobs/{job['id']}").body
    assert again["state"] == "succeeded" and again["lock"]["fencing_token"] == new_token
    assert c.get("/v1/audit/verify").body["ok"] is True


def test_sigterm_lets_the_running_migration_finish(stack, new_db, tmp_path):
    s = stack(workers=("w1",))
    c, hold, url, db, job = _start_held_job(s, new_db, tmp_path, "postgresql")
    w1 = s.workers["w1"]
    w1.send_signal(signal.SIGTERM)
    time.sleep(1)
    assert w1.poll() is None  # still finishing its migration
    hold.open()
    done = c.wait_job(job["id"], timeout=30)
    assert done["state"] == "succeeded" and done["attempt"] == 1, done
    assert w1.wait(timeout=20) == 0
    assert c.get(f"/v1/databases/{db}").body["lock"]["held_by_job"] is None
    assert applied_log(url) == ["r1", "r2", "r3"]


@pytest.mark.parametrize("sandbox", ["bwrap", "process"])
def test_sigterm_stops_a_migration_past_the_grace_and_hands_it_over(
    stack, new_db, tmp_path, sandbox
):
    """Past the grace the worker kills the job's runner (its revision waits at a gate)."""
    s = stack(workers=("w1",), shutdown_grace_s=2, sandbox=sandbox)
    c, hold, url, db, job = _start_held_job(s, new_db, tmp_path, "postgresql")
    w1 = s.workers["w1"]
    w1.send_signal(signal.SIGTERM)
    started = time.monotonic()
    assert w1.wait(timeout=20) == 0
    assert time.monotonic() - started < 10  # the grace (2 s), not the migration's length
    # The lease is free at once (no TTL to wait out) and the job is queued again.
    after = c.get(f"/v1/jobs/{job['id']}").body
    assert after["state"] == "queued" and after["attempt"] == 2, after
    assert c.get(f"/v1/databases/{db}").body["lock"]["held_by_job"] is None
    handed = [e for e in _events(c, job["id"]) if e["action"] == "job.recovering"]
    assert handed and handed[0]["data"]["code"] == "worker_shutdown"
    assert applied_log(url) == ["r1"]  # r2 was rolled back
    hold.open()
    s.add_worker("w2")
    done = c.wait_job(job["id"], timeout=60)
    assert done["state"] == "succeeded", done
    assert applied_log(url) == ["r1", "r2", "r3"]


def test_worker_killed_mid_migration_on_mysql_stops_for_a_human(stack, new_db, tmp_path):
    s = stack()
    c, hold, url, db, job = _start_held_job(s, new_db, tmp_path, "mysql")
    name, _ = s.worker_of(job)
    s.kill_worker(name)  # r2's DDL already committed itself: MySQL has no transactional DDL
    hold.open()
    done = c.wait_job(job["id"], timeout=90)
    assert done["state"] == "failed", done
    assert done["attempt"] == 2
    assert done["error"]["code"] == "needs_attention"
    # r2 was at its gate: rolled back with its connection (r1), or, when the gate
    # opened in the moment between the worker's death and its runner's (the runner
    # dies with it, a few milliseconds later), committed under the lease the job
    # still held (r2). Either way the job stops, saying what the target says.
    assert done["error"]["database_heads"] in (["r1"], ["r2"]), done["error"]
    assert "half applied" in done["error"]["message"]
    assert hold.times_entered() == 1  # the recovered attempt did not run r2 blindly again
    # What the runner left behind in its last moments: r2's rows, and, when r2
    # had committed and the runner (dying a moment after its worker, later on a
    # busy machine) got into r3, r3's first statements too (MySQL's DDL commits
    # implicitly): the half-applied revision the error tells a human about.
    log = applied_log(url)
    assert log in (["r1", "r2"], ["r1", "r2", "r3"]), log
    assert c.get(f"/v1/databases/{db}").body["lock"]["held_by_job"] is None


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
def test_a_job_whose_lease_a_waiter_takes_over_still_ends_and_keeps_only_its_own_steps(
    stack, new_db, tmp_path, dialect
):
    """Issue 15, items 1 and 3: X's worker dies while Y waits for the same database.

    Y, parked, is woken when X's lease expires and takes it, unless the
    sweeper's round hands X's job over first and X's next attempt takes it
    (issue 19: no waiter polls the lease any more). Either way X must still end
    (within the lease TTL plus the sweep interval, and a margin), and whichever
    applied r2 and r3 keeps them: the history shows each revision once.
    """
    s = stack()
    c, hold, url, db, x = _start_held_job(s, new_db, tmp_path, dialect)
    y_id = start_job(c, db)
    _wait(lambda: c.get(f"/v1/jobs/{y_id}").body["state"] == "waiting_for_lock", 30, "Y waits")
    name, _ = s.worker_of(x)
    killed = time.monotonic()
    s.kill_worker(name)  # X is mid-r2; Y's worker is the other one
    hold.wait_abandoned()
    hold.open()
    y = c.wait_job(y_id, timeout=60)
    assert y["state"] == "succeeded", y
    done = c.wait_job(x["id"], timeout=60)
    # The lease TTL (4 s) and the sweep interval (1 s) of the fault stack, and a margin.
    assert time.monotonic() - killed < 4 + 1 + 15
    assert done["state"] in ("succeeded", "failed"), done
    recovered = [e for e in _events(c, x["id"]) if e["action"] == "job.recovering"]
    assert recovered and recovered[0]["data"]["code"] in ("lease_taken_over", "worker_lost")
    assert applied_log(url) == ["r1", "r2", "r3"]
    history = c.get(f"/v1/databases/{db}/history?limit=100").body["history"]
    ups = [
        (h["revisions"], h["job"])
        for h in history
        if h["direction"] == "up" and h["state"] == "applied"
    ]
    by_rev = {}
    for revisions, job_id in ups:
        for rev in revisions:
            by_rev.setdefault(rev, []).append(job_id)
    assert {rev: len(jobs) for rev, jobs in by_rev.items()} == {"r1": 1, "r2": 1, "r3": 1}, ups
    assert by_rev["r2"] == by_rev["r3"] and by_rev["r2"][0] in (y_id, x["id"]), by_rev
    applied_by_x = [
        st["revisions"]
        for st in done["steps"]
        if st["direction"] == "up" and st["state"] == "applied"
    ]
    assert applied_by_x == ([["r1"]] if by_rev["r2"] == [y_id] else [["r1"], ["r2"], ["r3"]])
    assert c.get(f"/v1/databases/{db}").body["lock"]["held_by_job"] is None
    assert c.get("/v1/audit/verify").body["ok"] is True
