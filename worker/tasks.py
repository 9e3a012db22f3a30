"""Thin tasks: take an id, call domain code."""

from __future__ import annotations

import logging
from functools import cache

from service.db import make_engine, make_sessionmaker, transaction
from service.jobs import sweeper
from service.jobs.runner import run_job
from service.queue import RUN_JOB, SWEEP
from worker.celery_app import app, config

log = logging.getLogger("retort.worker")


@cache
def _sessions():
    # One engine per pool process, built after the fork.
    return make_sessionmaker(make_engine(config.database_url))


@app.task(name=RUN_JOB, acks_late=True, reject_on_worker_lost=True)
def run(job_id: int) -> str:
    return run_job(config, _sessions(), job_id)


@app.task(name=SWEEP, acks_late=False, ignore_result=True)
def sweep() -> dict:
    with transaction(_sessions()) as s:
        failed = sweeper.fail_jobs_with_expired_leases(s)
    with transaction(_sessions()) as s:
        queued = sweeper.jobs_to_redispatch(s, config.redispatch_after_s)
    for job_id in queued:
        run.apply_async(args=[job_id])
    if failed or queued:
        log.warning("sweeper: failed %s (lease expired), sent again %s", failed, queued)
    return {"failed": failed, "redispatched": queued}
