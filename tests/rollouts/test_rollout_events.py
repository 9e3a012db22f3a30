"""What a rollout tells the outside: webhooks, its event stream, approvals between waves."""

from __future__ import annotations

import http.client
import json

from tests.helpers import chain_bundle, setup_project, unique
from tests.rollouts.conftest import NO_LINT, fleet, make_table, wait_rollout
from tests.webhooks.test_webhooks import SECRET, Receiver, _hook, _until, verify


def test_rollout_webhooks_are_signed_and_say_the_rollout(prod, new_db):
    c = prod.client
    project, _ = setup_project(c, chain_bundle(1), settings=NO_LINT)
    urls = [new_db("sqlite") for _ in range(3)]
    make_table(urls[1], "items")  # wave 1's first database fails
    fleet(c, project, urls)
    receiver = Receiver()
    try:
        _hook(
            c,
            project,
            receiver.url,
            ["rollout.started", "rollout.wave_finished", "rollout.halted", "rollout.failed"],
        )
        r = c.post(
            "/v1/rollouts",
            {"project": project, "canary": 1, "max_parallel": 1, "halt_after_failures": 1},
        ).body
        wait_rollout(c, r["id"], until=lambda d: d["state"] == "halted")
        got = _until(lambda: receiver.events() if len(receiver.events()) >= 3 else None)
        assert got == ["rollout.started", "rollout.wave_finished", "rollout.halted"], got
        bodies = [verify(SECRET, q["headers"], q["body"]) for q in receiver.requests]
        assert all(b["rollout"]["rollout"] == r["id"] for b in bodies), bodies
        halted = bodies[2]["rollout"]
        assert halted["state"] == "halted" and halted["reason"] == "failures", halted
        assert "job" not in bodies[0]
    finally:
        receiver.close()


def _stream(prod, path: str, limit_events: int = 50) -> list[tuple[str, dict]]:
    conn = http.client.HTTPConnection("127.0.0.1", prod.port, timeout=60)
    conn.request("GET", path, headers={"Authorization": f"Bearer {prod.token}"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/event-stream")
    events, name = [], None
    for raw in resp:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[6:])))
            if name == "end" or len(events) >= limit_events:
                break
    conn.close()
    return events


def test_the_event_stream_follows_a_rollout_to_its_end(prod, new_db):
    c = prod.client
    project, _ = setup_project(c, chain_bundle(2), settings=NO_LINT)
    fleet(c, project, [new_db("sqlite") for _ in range(4)])
    r = c.post("/v1/rollouts", {"project": project, "max_parallel": 1}).body
    events = _stream(prod, f"/v1/rollouts/{r['id']}/events")
    assert events[-1][0] == "end" and events[-1][1]["state"] == "succeeded", events[-1]
    succeeded = [e[1]["counts"]["succeeded"] for e in events if e[0] == "state"]
    assert succeeded == sorted(succeeded) and succeeded[-1] == 4, succeeded
    assert c.get(f"/v1/rollouts/{r['id']}/events", token=None).status == 401


def test_approve_between_waves_waits_for_an_approver(prod, new_db):
    c = prod.client
    approver = unique("approver")
    project, _ = setup_project(
        c,
        chain_bundle(1),
        settings={**NO_LINT, "lint": {"enabled": False, "approvers": [approver]}},
    )
    fleet(c, project, [new_db("sqlite") for _ in range(3)])
    deployer = c.post(
        "/v1/tokens", {"name": unique("dep"), "role": "deployer", "projects": [project]}
    ).body["token"]
    named = c.post("/v1/tokens", {"name": approver, "role": "viewer", "projects": [project]}).body[
        "token"
    ]
    r = c.post(
        "/v1/rollouts",
        {"project": project, "canary": 1, "approve_between_waves": True},
        token=deployer,
    ).body
    waiting = wait_rollout(c, r["id"], until=lambda d: d["state"] == "waiting_for_approval")
    assert waiting["counts"]["succeeded"] == 1 and waiting["counts"]["pending"] == 2, waiting
    refused = c.post(f"/v1/rollouts/{r['id']}/resume", token=deployer)
    assert refused.status == 403 and refused.body["error"]["code"] == "not_an_approver"
    ok = c.post(f"/v1/rollouts/{r['id']}/resume", token=named)  # a named approver (a viewer)
    assert ok.status == 200 and ok.body["state"] == "running", ok
    done = wait_rollout(c, r["id"])
    assert done["state"] == "succeeded", done
    paused = c.post(f"/v1/rollouts/{r['id']}/pause", token=named)
    assert paused.status == 403  # steering is a deployer's


def test_a_retried_post_with_the_same_idempotency_key_starts_one_rollout(prod, new_db):
    c = prod.client
    project, _ = setup_project(c, chain_bundle(1), settings=NO_LINT)
    fleet(c, project, [new_db("sqlite") for _ in range(2)])
    key = {"Idempotency-Key": unique("key")}
    first = c.post("/v1/rollouts", {"project": project}, headers=key)
    second = c.post("/v1/rollouts", {"project": project}, headers=key)
    assert first.status == second.status == 202
    assert first.body["id"] == second.body["id"]
    assert len(c.get(f"/v1/rollouts?project={project}").body["rollouts"]) == 1
    wait_rollout(c, first.body["id"])
