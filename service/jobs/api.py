import json
import logging
import threading
import time
from typing import Any

from flask import Blueprint, Response, current_app, request, url_for

from service.db import autocommit, transaction
from service.errors import ServiceError
from service.jobs.approvals import decide
from service.jobs.cache import CachedJob
from service.jobs.cancel import cancel_job
from service.jobs.ops import (
    check_visible,
    create_drift_check,
    create_job,
    job_etag,
    latest_drift,
    list_history,
    list_jobs,
    read_job,
    undispatched,
)
from service.jobs.schemas import (
    DriftOut,
    HistoryList,
    HistoryPage,
    JobCreate,
    JobDecision,
    JobList,
    JobOut,
    JobPage,
    JobShow,
)
from service.jobs.states import FINAL_STATES
from service.jobs.watch import TooManyWaitersError
from service.limits import hold_stream
from service.openapi import operation
from service.principal import Principal
from service.web import (
    Services,
    actor,
    idempotent,
    parse_json,
    parse_query,
    principal,
    require,
    services,
)

bp = Blueprint("jobs", __name__)
log = logging.getLogger("retort.api")

# Sent instead of holding a request when every waiting slot is taken.
RETRY_AFTER_S = 1
# An event stream sends a comment this often when nothing happens, and ends after MAX_STREAM_S.
KEEPALIVE_S = 15
MAX_STREAM_S = 600


class TooManyWaitersServiceError(ServiceError):
    status = 503
    code = "too_many_waiters"
    headers = {"Retry-After": str(RETRY_AFTER_S)}


@bp.post("/jobs")
@operation(
    "Request a migration (upgrade, downgrade, stamp)",
    role="deployer",
    body=JobCreate,
    responses={202: JobOut},
)
def post_job():
    require("deployer")
    body = parse_json(JobCreate)
    svc = services()
    outcome: dict[str, Any] = {"coalesced": False}

    def create(s) -> tuple[str, int]:
        created = create_job(s, body, actor(), principal(), dispatch=True)
        outcome["coalesced"] = created.coalesced
        # The document as it commits.
        outcome["job"] = created.document or read_job(s, created.job.id)
        return str(created.job.id), 202

    resource, status, replayed = idempotent("POST /v1/jobs", body.model_dump(mode="json"), create)
    job_id = int(resource)
    if not outcome["coalesced"] and not replayed:
        _send(svc, job_id)
    out = _read_job(svc, job_id, None) if replayed else outcome["job"]
    out["coalesced_into"] = job_id if outcome["coalesced"] else None
    headers = {"Location": url_for("jobs.show_job", job_id=job_id), "ETag": job_etag(out)}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return out, status, headers


@bp.get("/jobs/<id:job_id>")
@operation(
    "Show a job; `wait` holds the request until it changes", query=JobShow, responses={200: JobOut}
)
def show_job(job_id: int):
    """Show a job; with `?wait=S`, first hold the request until it changes (long poll).

    The baseline is the ETag the client sends in If-None-Match (what it last
    saw), else the job as it is now. A finished job answers at once.
    """
    params = parse_query(JobShow)
    svc = services()
    cached = svc.finished_jobs.get(job_id)
    if cached is not None:  # final: it will never change (see service/jobs/cache.py)
        check_visible(job_id, cached.project, principal())
        response = current_app.response_class(cached.body, mimetype=current_app.json.mimetype)
        return response, 200, {"ETag": cached.etag, "Cache-Control": "no-store"}
    # Taken before the read: a job that moves after it wakes the wait below.
    mark = svc.watcher.mark() if params.wait > 0 else None
    out = _read_job(svc, job_id, principal())
    etag = job_etag(out)
    headers = {"ETag": etag, "Cache-Control": "no-store"}
    if out["state"] in FINAL_STATES:
        response = current_app.json.response(out)
        svc.finished_jobs.put(job_id, CachedJob(out["project"], response.get_data(), etag))
        return response, 200, headers
    wait = min(params.wait, svc.config.max_wait_s)
    seen = request.headers.get("If-None-Match") or etag
    if wait > 0 and out["state"] not in FINAL_STATES and seen == etag:
        release_slot = hold_stream()  # 429 past this token's share of the waiting slots
        deadline = time.monotonic() + wait
        try:
            while svc.watcher.wait(job_id, seen, deadline - time.monotonic(), since=mark):
                mark = svc.watcher.mark()
                out = _read_job(svc, job_id, principal())
                headers["ETag"] = job_etag(out)
                if headers["ETag"] != seen or deadline <= time.monotonic():
                    break
        except TooManyWaitersError:
            headers["Retry-After"] = str(RETRY_AFTER_S)
        finally:
            release_slot()
    return out, 200, headers


def _read_job(svc: Services, job_id: int, who: Principal | None) -> dict:
    # `svc`, not services(): an event stream reads after its request context is gone.
    with autocommit(svc.engine) as conn:
        return read_job(conn, job_id, who)


@bp.get("/jobs/<id:job_id>/events")
@operation(
    "Stream a job's states and steps (Server-Sent Events)", responses={200: "text/event-stream"}
)
def job_events(job_id: int):
    """Stream a job's state changes and steps as Server-Sent Events until it ends.

    Events: `state` (the job without its steps), `step` (one step, in order),
    `end` (the final job, then the stream closes). A stream holds one of the
    process's waiting slots for its whole life and closes after
    MAX_STREAM_S; a reconnect starts over with the current state and every
    step so far.
    """
    svc = services()
    mark = svc.watcher.mark()
    first = _read_job(svc, job_id, principal())  # 404 before the stream starts
    release_slot = hold_stream()  # 429 past this token's share of the waiting slots
    try:
        svc.watcher.reserve()
    except TooManyWaitersError:
        release_slot()
        raise TooManyWaitersServiceError(
            "this API process holds as many waiting requests as it may; retry shortly",
            {"retry_after_s": RETRY_AFTER_S},
        ) from None
    released = threading.Lock()

    def release() -> None:
        if released.acquire(blocking=False):
            svc.watcher.release()
            release_slot()

    def stream():
        job, sent_steps, sent_state, since = first, 0, None, mark
        deadline = time.monotonic() + MAX_STREAM_S
        yield f"retry: {RETRY_AFTER_S * 1000}\n\n"
        try:
            while True:
                steps = job.pop("steps", [])
                for step in steps[sent_steps:]:
                    yield _sse("step", step)
                sent_steps = len(steps)
                if job["state"] != sent_state:
                    sent_state = job["state"]
                    yield _sse("state", job)
                if job["state"] in FINAL_STATES:
                    yield _sse("end", job)
                    return
                if time.monotonic() > deadline:
                    return  # the client reconnects and starts over
                seen = job_etag({**job, "steps": steps})
                if not svc.watcher.wait(job_id, seen, KEEPALIVE_S, reserved=True, since=since):
                    # A comment line keeps proxies from closing an idle stream and
                    # tells us early when the client has gone.
                    yield ": keepalive\n\n"
                since = svc.watcher.mark()
                job = _read_job(svc, job_id, None)
        finally:
            release()

    response = Response(
        stream(),
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
    # Also when the generator never started (the client left at once).
    response.call_on_close(release)
    return response


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


@bp.get("/jobs")
@operation("List jobs, newest first", query=JobList, responses={200: JobPage})
def index_jobs():
    params = parse_query(JobList)
    with transaction(services().sessions) as s:
        jobs, cursor = list_jobs(s, params, principal())
    return {"jobs": jobs, "next_cursor": cursor}


@bp.post("/jobs/<id:job_id>/cancel")
@operation("Cancel a queued or waiting job", role="deployer", responses={200: JobOut})
def post_cancel(job_id: int):
    require("deployer")
    with transaction(services().sessions) as s:
        cancel_job(s, job_id, actor(), principal())
        return read_job(s, job_id)


def _decide(job_id: int, decision: str):
    # Who may decide is the project's rule (an admin, or a named approver of any
    # role; the requester may reject its own job): checked in decide().
    require("viewer")
    # The body is optional: {"comment": "..."} when there is one.
    body = parse_json(JobDecision) if request.content_length or request.is_json else JobDecision()
    svc = services()
    with transaction(svc.sessions) as s:
        decide(s, job_id, decision, principal(), body.comment)
        out = read_job(s, job_id)
    if decision == "approved":
        _send(svc, job_id)
    return out


@bp.post("/jobs/<id:job_id>/approve")
@operation(
    "Approve a job's blocking lint findings: it goes back to the queue",
    role="viewer",
    body=JobDecision,
    responses={200: JobOut},
)
def post_approve(job_id: int):
    return _decide(job_id, "approved")


@bp.post("/jobs/<id:job_id>/reject")
@operation(
    "Reject a job waiting for an approval: it is cancelled",
    role="viewer",
    body=JobDecision,
    responses={200: JobOut},
)
def post_reject(job_id: int):
    return _decide(job_id, "rejected")


def _send(svc: Services, job_id: int) -> None:
    """Hand a job to the broker after its commit: a worker must find the row.

    The row says it was handed over; if the broker is down that mark is
    cleared and the sweeper sends the job again within seconds.
    """
    try:
        svc.dispatcher.send_job(job_id)
    except Exception:  # noqa: BLE001
        log.exception("could not send job %s to the broker; the sweeper will", job_id)
        try:
            with autocommit(svc.engine) as conn:
                undispatched(conn, job_id)
        except Exception:  # noqa: BLE001 - then the sweeper's slower resend covers it
            log.exception("could not mark job %s as not sent", job_id)


@bp.post("/databases/<name>/drift")
@operation(
    "Check a database for drift: compare its schema with what its bundle builds",
    role="deployer",
    responses={202: JobOut},
)
def post_drift(name: str):
    require("deployer")
    svc = services()
    with transaction(svc.sessions) as s:
        created = create_drift_check(s, name, actor(), principal())
        job_id = created.job.id
        out = created.document or read_job(s, job_id)
    if not created.coalesced:
        _send(svc, job_id)
    out["coalesced_into"] = job_id if created.coalesced else None
    headers = {"Location": url_for("jobs.show_job", job_id=job_id), "ETag": job_etag(out)}
    return out, 202, headers


@bp.get("/databases/<name>/drift")
@operation("The newest drift check of a database", responses={200: DriftOut})
def show_drift(name: str):
    with transaction(services().sessions) as s:
        return latest_drift(s, name, principal())


@bp.get("/databases/<name>/history")
@operation(
    "What was applied to a database, newest first", query=HistoryList, responses={200: HistoryPage}
)
def database_history(name: str):
    params = parse_query(HistoryList)
    with transaction(services().sessions) as s:
        history, cursor = list_history(s, name, params.limit, params.cursor, principal())
    return {"history": history, "next_cursor": cursor}
