"""/v1/rollouts: start a rollout across a project's databases, watch it, steer it."""

from __future__ import annotations

import json
import threading
import time

from flask import Blueprint, Response, url_for

from service.db import transaction
from service.limits import hold_stream
from service.openapi import operation
from service.rollouts import ops
from service.rollouts.drive import settle
from service.rollouts.schemas import (
    RolloutCreate,
    RolloutDatabasePage,
    RolloutDatabasesQuery,
    RolloutList,
    RolloutOut,
    RolloutPage,
)
from service.rollouts.states import FINAL_STATES
from service.web import actor, idempotent, parse_json, parse_query, principal, require, services

bp = Blueprint("rollouts", __name__)

# An event stream looks at the rollout this often, sends a comment when
# nothing changed for KEEPALIVE_S, and ends after MAX_STREAM_S (reconnect).
POLL_S = 0.5
KEEPALIVE_S = 15
MAX_STREAM_S = 600


@bp.post("/rollouts")
@operation(
    "Start a rollout: one change across a project's databases, canary first, then waves",
    role="deployer",
    body=RolloutCreate,
    responses={202: RolloutOut},
)
def post_rollout():
    require("deployer")
    body = parse_json(RolloutCreate)
    svc = services()
    made: dict = {}

    def create(s) -> tuple[str, int]:
        rollout, advanced = ops.create_rollout(s, body, actor(), principal(), svc.box)
        made["advanced"] = advanced
        return str(rollout.id), 202

    resource, status, _replayed = idempotent(
        "POST /v1/rollouts", body.model_dump(mode="json"), create
    )
    rollout_id = int(resource)
    if "advanced" in made:
        settle(svc.sessions, svc.dispatcher, svc.wakeups, rollout_id, made["advanced"])
    with transaction(svc.sessions) as s:
        out = ops.read_rollout(s, rollout_id)
    return out, status, {"Location": url_for("rollouts.show_rollout", rollout_id=rollout_id)}


@bp.get("/rollouts")
@operation("List rollouts, newest first", query=RolloutList, responses={200: RolloutPage})
def index_rollouts():
    params = parse_query(RolloutList)
    with transaction(services().sessions) as s:
        return ops.list_rollouts(s, params.project, params.limit, params.cursor, principal())


@bp.get("/rollouts/<id:rollout_id>")
@operation("Show a rollout: counts by state, per wave", responses={200: RolloutOut})
def show_rollout(rollout_id: int):
    with transaction(services().sessions) as s:
        return ops.read_rollout(s, rollout_id, principal())


@bp.get("/rollouts/<id:rollout_id>/databases")
@operation(
    "A rollout's databases: each one's job, state and heads (`state=not_at_target`)",
    query=RolloutDatabasesQuery,
    responses={200: RolloutDatabasePage},
)
def show_rollout_databases(rollout_id: int):
    q = parse_query(RolloutDatabasesQuery)
    with transaction(services().sessions) as s:
        return ops.rollout_databases(s, rollout_id, principal(), q.state, q.wave, q.limit, q.cursor)


def _act(rollout_id: int, fn, role: str = "deployer"):
    require(role)
    svc = services()
    with transaction(svc.sessions) as s:
        advanced = fn(s, rollout_id, actor(), principal())
    settle(svc.sessions, svc.dispatcher, svc.wakeups, rollout_id, advanced)
    with transaction(svc.sessions) as s:
        return ops.read_rollout(s, rollout_id)


@bp.post("/rollouts/<id:rollout_id>/pause")
@operation(
    "Pause a rollout: no new jobs, running ones finish",
    role="deployer",
    responses={200: RolloutOut},
)
def post_pause(rollout_id: int):
    return _act(rollout_id, ops.pause_rollout)


@bp.post("/rollouts/<id:rollout_id>/resume")
@operation(
    "Resume a paused or halted rollout (a deployer), or approve its next wave (an approver)",
    role="viewer",
    responses={200: RolloutOut},
)
def post_resume(rollout_id: int):
    # An approver named in settings.lint.approvers may be a viewer (as for jobs).
    return _act(rollout_id, ops.resume_rollout, role="viewer")


@bp.post("/rollouts/<id:rollout_id>/abort")
@operation(
    "Abort a rollout: jobs not yet running are cancelled, no new ones",
    role="deployer",
    responses={200: RolloutOut},
)
def post_abort(rollout_id: int):
    return _act(rollout_id, ops.abort_rollout)


@bp.post("/rollouts/<id:rollout_id>/retry-failed")
@operation(
    "Give each failed database of a rollout a new job, and go on",
    role="deployer",
    responses={200: RolloutOut},
)
def post_retry(rollout_id: int):
    return _act(rollout_id, ops.retry_failed)


@bp.get("/rollouts/<id:rollout_id>/events")
@operation("Stream a rollout's progress (Server-Sent Events)", responses={200: "text/event-stream"})
def rollout_events(rollout_id: int):
    """One `state` event (the rollout) at each change, then `end` when it is final."""
    svc = services()
    with transaction(svc.sessions) as s:
        first = ops.read_rollout(s, rollout_id, principal())  # 404 before the stream
    held = hold_stream()
    gave_back = threading.Lock()

    def release() -> None:
        if gave_back.acquire(blocking=False):
            held()

    def stream():
        doc, sent, quiet_since = first, None, time.monotonic()
        deadline = time.monotonic() + MAX_STREAM_S
        yield "retry: 1000\n\n"
        try:
            while True:
                text = json.dumps(doc, separators=(",", ":"))
                if text != sent:
                    sent, quiet_since = text, time.monotonic()
                    yield f"event: state\ndata: {text}\n\n"
                if doc["state"] in FINAL_STATES:
                    yield f"event: end\ndata: {text}\n\n"
                    return
                if time.monotonic() > deadline:
                    return
                if time.monotonic() - quiet_since > KEEPALIVE_S:
                    quiet_since = time.monotonic()
                    yield ": keepalive\n\n"
                time.sleep(POLL_S)
                with transaction(svc.sessions) as s:
                    doc = ops.read_rollout(s, rollout_id)
        finally:
            release()

    response = Response(
        stream(),
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
    response.call_on_close(release)  # also when the generator never started
    return response
