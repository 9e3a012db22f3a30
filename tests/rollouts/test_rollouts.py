"""Fleet rollouts (issue 19): canary, waves, halts, limits, steering, no-op settling."""

from __future__ import annotations

import datetime as dt

from tests.helpers import chain_bundle, register_db, revision, setup_project, tables
from tests.rollouts.conftest import (
    NO_LINT,
    drop_table,
    fleet,
    jobs_of,
    make_table,
    wait_rollout,
)


def _t(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value)


def _start(c, body):
    r = c.post("/v1/rollouts", body)
    assert r.status == 202, r
    assert r.headers["Location"].endswith(f"/v1/rollouts/{r.body['id']}")
    return r.body


def test_a_rollout_migrates_the_selected_databases_canary_first_then_waves(prod, new_db):
    c = prod.client
    project, bundle = setup_project(c, chain_bundle(2), settings=NO_LINT)
    urls = [new_db("sqlite") for _ in range(5)]
    names = fleet(c, project, urls)
    other = new_db("sqlite")
    register_db(c, project, other, tags={"tier": "internal"})
    started = _start(
        c,
        {
            "project": project,
            "selector": {"tags": {"tier": "tenant"}},
            "canary": 1,
            "wave_size": 2,
            "max_parallel": 2,
        },
    )
    assert started["total"] == 5 and [w["size"] for w in started["waves"]] == [1, 2, 2]
    assert [w["name"] for w in started["waves"]] == ["canary", "wave 1", "wave 2"]
    done = wait_rollout(c, started["id"])
    assert done["state"] == "succeeded", done
    assert done["at_target"] == 5 and done["not_at_target"] == 0
    assert all(w["state"] == "finished" for w in done["waves"])
    jobs = jobs_of(c, done["id"])
    assert [j["database"] for j in jobs] == names
    assert all(j["state"] == "succeeded" and j["to_heads"] == ["t002"] for j in jobs)
    assert all(j["rollout"] == done["id"] for j in jobs)
    # The canary ended before any other job was created; each wave before the next.
    assert all(_t(j["created_at"]) >= _t(jobs[0]["finished_at"]) for j in jobs[1:])
    assert all(_t(j["created_at"]) >= _t(jobs[2]["finished_at"]) for j in jobs[3:])
    assert all(_t(j["created_at"]) >= _t(jobs[1]["finished_at"]) for j in jobs[3:])
    assert "items" in tables(urls[0]) and "items" not in tables(other)
    page = c.get(f"/v1/rollouts/{done['id']}/databases?state=not_at_target").body
    assert page["databases"] == []
    one = c.get(f"/v1/rollouts/{done['id']}/databases?wave=0").body["databases"]
    assert one == [
        {
            "database": names[0],
            "wave": 0,
            "server": one[0]["server"],
            "job": jobs[0]["id"],
            "state": "succeeded",
            "heads": ["t002"],
            "error": None,
        }
    ]
    actions = [
        e["action"]
        for e in c.get(f"/v1/audit?project={project}&limit=1000").body["events"]
        if e["action"].startswith("rollout.")
    ]
    assert actions[::-1] == [
        "rollout.started",
        "rollout.wave_finished",
        "rollout.wave_finished",
        "rollout.succeeded",
    ]
    listed = c.get(f"/v1/rollouts?project={project}").body["rollouts"]
    assert [r["id"] for r in listed] == [done["id"]]


def test_a_failing_canary_halts_the_rollout_and_retry_failed_goes_on(prod, new_db):
    c = prod.client
    project, _ = setup_project(c, chain_bundle(2), settings=NO_LINT)
    urls = [new_db("sqlite") for _ in range(4)]
    make_table(urls[0], "items")  # the canary's t001 fails: the table exists
    names = fleet(c, project, urls)
    started = _start(c, {"project": project, "canary": 1, "max_parallel": 3})
    halted = wait_rollout(c, started["id"], until=lambda d: d["state"] == "halted")
    assert halted["halted"]["reason"] == "canary_failed", halted
    assert halted["counts"]["failed"] == 1 and halted["counts"]["pending"] == 3, halted
    failed = c.get(f"/v1/rollouts/{halted['id']}/databases?state=failed").body["databases"]
    assert [d["database"] for d in failed] == [names[0]]
    assert failed[0]["error"] == "migration_failed" or failed[0]["error"], failed
    # No other database was touched.
    assert all("alembic_version" not in tables(u) for u in urls[1:])
    r = c.post(f"/v1/rollouts/{halted['id']}/resume")
    assert r.status == 200 and r.body["state"] in ("running", "succeeded", "failed")
    c.post(f"/v1/rollouts/{halted['id']}/pause")
    # Fixed by hand; retry the failed one and go on.
    drop_table(urls[0], "items")
    assert c.post(f"/v1/rollouts/{halted['id']}/resume").status in (200, 409)
    retried = c.post(f"/v1/rollouts/{halted['id']}/retry-failed")
    assert retried.status == 200, retried
    done = wait_rollout(c, halted["id"])
    assert done["state"] == "succeeded", done
    assert all(tables(u) >= {"items", "alembic_version"} for u in urls)
    again = c.post(f"/v1/rollouts/{halted['id']}/retry-failed")
    assert again.status == 409 and again.body["error"]["code"] == "rollout_state"


def test_halting_on_the_failure_ratio_starts_no_new_job(prod, new_db):
    c = prod.client
    project, _ = setup_project(c, chain_bundle(1), settings=NO_LINT)
    urls = [new_db("sqlite") for _ in range(8)]
    for url in urls[1:4]:
        make_table(url, "items")
    fleet(c, project, urls)
    started = _start(c, {"project": project, "max_parallel": 1, "halt_on_failure_ratio": 0.25})
    halted = wait_rollout(c, started["id"], until=lambda d: d["state"] == "halted")
    assert halted["halted"]["reason"] == "failure_ratio", halted
    # Judged from 4 finished jobs (1/0.25): 1 ok and 3 failed of 4 is 75 % > 25 %.
    counts = halted["counts"]
    assert counts["succeeded"] + counts["failed"] == 4 and counts["failed"] == 3, counts
    assert counts["pending"] == 4
    assert "75%" in halted["halted"]["message"]
    again = c.get(f"/v1/rollouts/{halted['id']}").body
    assert again["counts"] == counts  # nothing new started after the halt
    # Halted by the deciding job's own worker, right after it ended; no job made after.
    events = c.get(f"/v1/audit?project={project}&limit=1000").body["events"]
    halt_at = _t(next(e["ts"] for e in events if e["action"] == "rollout.halted"))
    jobs = jobs_of(c, halted["id"])
    last = max(jobs, key=lambda j: j["finished_at"])
    one_job = _t(last["finished_at"]) - _t(last["created_at"])
    assert halt_at - _t(last["finished_at"]) <= max(one_job, dt.timedelta(seconds=1)), events
    assert all(_t(j["created_at"]) <= halt_at for j in jobs)


def test_the_per_server_limit_is_never_exceeded(prod, new_db):
    c = prod.client
    slow = {"versions/s.py": revision("s", None, "import time; time.sleep(0.6)")}
    project, _ = setup_project(c, slow, settings=NO_LINT)
    urls = [new_db("postgresql") for _ in range(4)]
    fleet(c, project, urls)
    started = _start(c, {"project": project, "max_parallel": 4, "max_parallel_per_server": 1})
    done = wait_rollout(c, started["id"])
    assert done["state"] == "succeeded", done
    spans = sorted((_t(j["started_at"]), _t(j["finished_at"])) for j in jobs_of(c, done["id"]))
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert start >= end, spans  # one at a time on the one server


def test_a_noop_rollout_settles_every_database_without_steps(prod, new_db):
    c = prod.client
    project, _ = setup_project(c, chain_bundle(2), settings=NO_LINT)
    urls = [new_db("sqlite") for _ in range(6)]
    fleet(c, project, urls)
    first = wait_rollout(c, _start(c, {"project": project, "max_parallel": 6})["id"])
    assert first["state"] == "succeeded", first
    second = wait_rollout(c, _start(c, {"project": project, "max_parallel": 6})["id"])
    assert second["state"] == "succeeded", second
    jobs = jobs_of(c, second["id"])
    assert len(jobs) == 6 and all(j["steps"] == [] for j in jobs)
    assert all(j["from_heads"] == j["to_heads"] == ["t002"] for j in jobs)


def test_pause_resume_and_abort(prod, new_db):
    c = prod.client
    slow = {"versions/s.py": revision("s", None, "import time; time.sleep(0.5)")}
    project, _ = setup_project(c, slow, settings=NO_LINT)
    urls = [new_db("sqlite") for _ in range(6)]
    fleet(c, project, urls)
    r = _start(c, {"project": project, "max_parallel": 1})
    paused = c.post(f"/v1/rollouts/{r['id']}/pause")
    assert paused.status == 200 and paused.body["state"] == "paused"
    again = c.post(f"/v1/rollouts/{r['id']}/pause")
    assert again.status == 409 and "paused" in again.body["error"]["message"]
    still = wait_rollout(
        c, r["id"], until=lambda d: d["counts"]["running"] + d["counts"]["queued"] == 0
    )
    assert still["state"] == "paused" and still["counts"]["pending"] >= 4, still
    resumed = c.post(f"/v1/rollouts/{r['id']}/resume")
    assert resumed.status == 200 and resumed.body["state"] == "running"
    wait_rollout(c, r["id"], until=lambda d: d["counts"]["succeeded"] >= 3)
    aborted = c.post(f"/v1/rollouts/{r['id']}/abort")
    assert aborted.status == 200 and aborted.body["state"] == "aborted", aborted
    done = wait_rollout(
        c, r["id"], until=lambda d: d["counts"]["running"] + d["counts"]["queued"] == 0
    )
    assert done["counts"]["skipped"] + done["counts"]["cancelled"] >= 1, done
    assert (
        done["counts"]["succeeded"] + done["counts"]["skipped"] + done["counts"]["cancelled"] == 6
    )
    assert c.post(f"/v1/rollouts/{r['id']}/resume").status == 409


def test_bad_requests_get_clear_errors(prod, new_db):
    c = prod.client
    project, _ = setup_project(c, chain_bundle(1), settings=NO_LINT)
    fleet(c, project, [new_db("sqlite")])
    cases = [
        ({"project": project, "selector": {"names": ["nope"]}}, 422, "unknown_databases"),
        ({"project": project, "selector": {"tags": {"tier": "x"}}}, 422, "no_databases"),
        ({"project": project, "wave_size": 2, "waves": [1]}, 422, None),
        ({"project": project, "canary": 5}, 422, None),
        ({"project": project, "canary": ["nope"]}, 422, "unknown_databases"),
        ({"project": project, "max_parallel": 0}, 422, None),
        ({"project": project, "halt_on_failure_ratio": 1.5}, 422, None),
        ({"project": project, "action": "downgrade"}, 422, None),
        ({"project": "no-such-project"}, 404, None),
        ({"project": project, "bogus": 1}, 422, None),
    ]
    for body, status, code in cases:
        r = c.post("/v1/rollouts", body)
        assert r.status == status, (body, r)
        assert set(r.body["error"]) >= {"code", "message", "details"}, r
        if code:
            assert r.body["error"]["code"] == code, r
    assert c.get("/v1/rollouts/999999999").status == 404
    assert c.post("/v1/rollouts/999999999/pause").status == 404
    assert c.get("/v1/rollouts/1/databases?state=nope").status == 422
