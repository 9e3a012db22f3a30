"""What deploy pipelines lean on: long polls, event streams, idempotent and coalesced requests."""

import json
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from tests.helpers import chain_bundle, make_tar, register_db, revision, setup_project, unique


def _slow(seconds: float, rev: str = "s", down=None) -> str:
    return revision(rev, down, f"import time; time.sleep({seconds})", message=f"slow {rev}")


def test_wait_holds_the_request_until_the_job_changes(prod, new_db):
    c = prod.client
    project, _ = setup_project(c, {"versions/s.py": _slow(2)})
    db = register_db(c, project, new_db("sqlite"))
    job = c.post("/v1/jobs", {"database": db}).body
    c.wait_state(job["id"], "running")
    running = c.get(f"/v1/jobs/{job['id']}")
    started = time.monotonic()
    r = c.get(f"/v1/jobs/{job['id']}?wait=25", headers={"If-None-Match": running.headers["ETag"]})
    held = time.monotonic() - started
    # Held while the revision slept, answered as soon as the step landed: no tight loop.
    assert r.status == 200, r
    assert 0.5 < held < 20, held
    assert r.headers["ETag"] != running.headers["ETag"]
    final = c.wait_job(job["id"])
    assert final["state"] == "succeeded"
    # A finished job answers at once, whatever the wait asked for.
    started = time.monotonic()
    r = c.get(f"/v1/jobs/{job['id']}?wait=30")
    assert r.body["state"] == "succeeded" and time.monotonic() - started < 2
    # An ETag the client saw earlier: the change already happened, no hold.
    started = time.monotonic()
    r = c.get(f"/v1/jobs/{job['id']}?wait=30", headers={"If-None-Match": running.headers["ETag"]})
    assert time.monotonic() - started < 2
    r = c.get(f"/v1/jobs/{job['id']}?wait=-1")
    assert r.status == 422 and r.body["error"]["details"]["field"] == "wait"


def test_fifty_waiters_do_not_block_a_status_read(retort, new_db):
    """Fifty pipelines, ten tokens (one token may hold only a few long polls: issue 16)."""
    c = retort.client
    project, _ = setup_project(c, {"versions/s.py": _slow(12)})
    db = register_db(c, project, new_db("sqlite"))
    tokens = []
    for i in range(10):
        body = {"name": unique(f"pipeline{i}"), "role": "viewer", "projects": [project]}
        r = c.post("/v1/tokens", body)
        assert r.status == 201, r
        tokens.append(r.body["token"])
    job = c.post("/v1/jobs", {"database": db}).body
    running = c.wait_state(job["id"], "running")
    etag = c.get(f"/v1/jobs/{job['id']}").headers["ETag"]
    assert running["state"] == "running"

    def long_poll(i):
        started = time.monotonic()
        r = c.get(
            f"/v1/jobs/{job['id']}?wait=30",
            headers={"If-None-Match": etag},
            token=tokens[i % len(tokens)],
        )
        return r.status, time.monotonic() - started

    with ThreadPoolExecutor(50) as pool:
        waiters = [pool.submit(long_poll, i) for i in range(50)]
        time.sleep(1.5)  # let them all arrive and park
        assert sum(f.done() for f in waiters) < 50
        started = time.monotonic()
        status = c.get(f"/v1/jobs/{job['id']}")
        listing = c.get("/v1/projects")
        fast = time.monotonic() - started
        results = [f.result() for f in waiters]
    assert status.status == 200 and listing.status == 200
    assert fast < 2, f"a status read took {fast:.2f}s behind 50 long polls"
    assert all(code == 200 for code, _ in results)
    # Most were held until the job finished its step; none hammered the server.
    assert sum(held > 5 for _, held in results) >= 40, sorted(h for _, h in results)
    assert c.wait_job(job["id"])["state"] == "succeeded"


def test_events_stream_states_and_steps_until_the_job_ends(retort, new_db):
    c = retort.client
    files = {
        "versions/a.py": _slow(0.5, "a"),
        "versions/b.py": _slow(0.5, "b", "a"),
        "versions/c.py": _slow(0.5, "c", "b"),
    }
    project, _ = setup_project(c, files)
    db = register_db(c, project, new_db("sqlite"))
    job = c.post("/v1/jobs", {"database": db}).body
    req = urllib.request.Request(
        f"{c.base}/v1/jobs/{job['id']}/events", headers={"Authorization": f"Bearer {c.token}"}
    )
    events = []
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        name = None
        for raw in resp:  # ends when the server closes the stream
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[len("data: ") :])))
    kinds = [k for k, _ in events]
    assert kinds[-1] == "end" and events[-1][1]["state"] == "succeeded"
    steps = [d["revisions"] for k, d in events if k == "step"]
    assert steps == [["a"], ["b"], ["c"]], events
    states = [d["state"] for k, d in events if k == "state"]
    assert states[-1] == "succeeded" and len(states) == len(set(states))
    assert "running" in states or states[0] in ("queued", "waiting_for_lock")
    r = c.get("/v1/jobs/987654321/events")
    assert r.status == 404 and r.body["error"]["code"] == "not_found"


def test_idempotency_key_replays_the_first_answer(prod, new_db):
    c = prod.client
    project, _ = setup_project(c, chain_bundle(2))
    db = register_db(c, project, new_db("sqlite"))
    body = {"database": db, "coalesce": False}
    first = c.post("/v1/jobs", body, headers={"Idempotency-Key": "deploy-42"})
    again = c.post("/v1/jobs", body, headers={"Idempotency-Key": "deploy-42"})
    assert first.status == again.status == 202
    assert again.body["id"] == first.body["id"]
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert "Idempotent-Replayed" not in first.headers
    other = c.post("/v1/jobs", {**body, "target": "t001"}, headers={"Idempotency-Key": "deploy-42"})
    assert other.status == 422 and other.body["error"]["code"] == "idempotency_key_reused"
    bad = c.post("/v1/jobs", body, headers={"Idempotency-Key": "has space"})
    assert bad.status == 422 and bad.body["error"]["code"] == "invalid_idempotency_key"
    assert c.wait_job(first.body["id"])["state"] == "succeeded"
    # Retried after the job ran: still the same job, not a second migration.
    late = c.post("/v1/jobs", body, headers={"Idempotency-Key": "deploy-42"})
    assert late.body["id"] == first.body["id"] and late.body["state"] == "succeeded"

    # Ten retries racing with one key make one job.
    def post(_):
        return c.post("/v1/jobs", body, headers={"Idempotency-Key": "race-1"}).body["id"]

    with ThreadPoolExecutor(10) as pool:
        ids = set(pool.map(post, range(10)))
    assert len(ids) == 1, ids
    jobs = c.get(f"/v1/jobs?database={db}&limit=100").body["jobs"]
    assert len(jobs) == 2

    # Bundle uploads: the first status (201) comes back, other content is refused.
    tar = make_tar(chain_bundle(3, prefix="u"))
    path = f"/v1/projects/{project}/bundles"
    up = c.post(path, raw=tar, content_type="application/gzip", headers={"Idempotency-Key": "b1"})
    up2 = c.post(path, raw=tar, content_type="application/gzip", headers={"Idempotency-Key": "b1"})
    assert up.status == up2.status == 201 and up.body["id"] == up2.body["id"]
    plain = c.post(path, raw=tar, content_type="application/gzip")
    assert plain.status == 200 and plain.body["id"] == up.body["id"]
    other = make_tar(chain_bundle(4, prefix="u"))
    r = c.post(path, raw=other, content_type="application/gzip", headers={"Idempotency-Key": "b1"})
    assert r.status == 422 and r.body["error"]["code"] == "idempotency_key_reused"


def test_twenty_identical_requests_queue_one_migration(prod, new_db):
    c = prod.client
    files = {"versions/a.py": _slow(3, "a"), "versions/b.py": revision("b", "a")}
    project, _ = setup_project(c, files)
    db = register_db(c, project, new_db("postgresql"))
    # A job holds the database, so the requests below find theirs still waiting.
    blocker = c.post("/v1/jobs", {"database": db, "target": "a"}).body
    c.wait_state(blocker["id"], "running")

    barrier = threading.Barrier(20)

    def request(_):
        barrier.wait()
        r = c.post("/v1/jobs", {"database": db, "target": "head"})
        return r.status, r.body

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(request, range(20)))
    assert all(status == 202 for status, _ in answers), answers
    ids = {body["id"] for _, body in answers}
    assert len(ids) == 1, ids
    (job_id,) = ids
    coalesced = [body for _, body in answers if body["coalesced_into"] == job_id]
    assert len(coalesced) == 19
    assert c.wait_job(blocker["id"])["state"] == "succeeded"
    final = c.wait_job(job_id)
    assert final["state"] == "succeeded" and final["to_heads"] == ["b"]
    events = c.get(f"/v1/audit?job={job_id}&limit=100").body["events"]
    assert sum(e["action"] == "job.coalesced" for e in events) == 19
    # Relative targets never coalesce: two requests for one more step are two steps.
    c.post("/v1/jobs", {"database": db, "action": "downgrade", "target": "base"})
    down = c.get(f"/v1/jobs?database={db}&limit=1").body["jobs"][0]
    c.wait_job(down["id"])
    one = c.post("/v1/jobs", {"database": db, "target": "+1"}).body
    two = c.post("/v1/jobs", {"database": db, "target": "+1"}).body
    assert one["id"] != two["id"] and two["coalesced_into"] is None
    first = c.wait_job(one["id"])
    assert first["state"] == "succeeded", first
    assert c.wait_job(two["id"])["state"] == "succeeded"
    assert c.get(f"/v1/databases/{db}").body["current"] == ["b"]


def test_history_says_what_was_applied_when_and_by_whom(prod, new_db):
    c = prod.client
    project, _ = setup_project(c, chain_bundle(3))
    db = register_db(c, project, new_db("sqlite"))
    up = c.post("/v1/jobs", {"database": db}).body
    c.wait_job(up["id"])
    down = c.post("/v1/jobs", {"database": db, "action": "downgrade", "target": "-1"}).body
    c.wait_job(down["id"])
    page = c.get(f"/v1/databases/{db}/history?limit=2").body
    assert [(h["direction"], h["revisions"]) for h in page["history"]] == [
        ("down", ["t003"]),
        ("up", ["t003"]),
    ]
    first = page["history"][0]
    assert first["job"] == down["id"] and first["requested_by"] == "admin"
    assert first["state"] == "applied" and first["applied_at"].endswith("Z")
    assert first["duration_ms"] >= 0 and first["message"] == "step 3"
    rest = c.get(f"/v1/databases/{db}/history?cursor={page['next_cursor']}").body
    assert [h["revisions"] for h in rest["history"]] == [["t002"], ["t001"]]
    assert rest["next_cursor"] is None
    assert c.get("/v1/databases/nope/history").status == 404
