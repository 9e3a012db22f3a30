import logging

from flask import Blueprint, url_for

from service.app import actor, parse_json, parse_query, services
from service.db import transaction
from service.jobs.ops import (
    cancel_job,
    create_job,
    get_job,
    list_jobs,
    mark_dispatched,
    serialize_job,
)
from service.jobs.schemas import JobCreate, JobList

bp = Blueprint("jobs", __name__)
log = logging.getLogger("retort.api")


@bp.post("/jobs")
def post_job():
    body = parse_json(JobCreate)
    with transaction(services().sessions) as s:
        job = create_job(s, body, actor())
    # Sent after the commit: a worker must find the row. If the broker is down
    # the job stays queued and the sweeper sends it again.
    try:
        services().dispatcher.send_job(job.id)
        sent = True
    except Exception:  # noqa: BLE001
        log.exception("could not send job %s to the broker; the sweeper will", job.id)
        sent = False
    with transaction(services().sessions) as s:
        if sent:
            mark_dispatched(s, job.id)
        out = serialize_job(s, get_job(s, job.id))
    return out, 202, {"Location": url_for("jobs.show_job", job_id=job.id)}


@bp.get("/jobs/<int:job_id>")
def show_job(job_id: int):
    with transaction(services().sessions) as s:
        return serialize_job(s, get_job(s, job_id))


@bp.get("/jobs")
def index_jobs():
    params = parse_query(JobList)
    with transaction(services().sessions) as s:
        jobs, cursor = list_jobs(s, params)
        return {
            "jobs": [serialize_job(s, j, with_steps=False) for j in jobs],
            "next_cursor": cursor,
        }


@bp.post("/jobs/<int:job_id>/cancel")
def post_cancel(job_id: int):
    with transaction(services().sessions) as s:
        return serialize_job(s, cancel_job(s, job_id, actor()))
