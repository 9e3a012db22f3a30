"""Thin tasks: take an id, call domain code."""

from __future__ import annotations

import logging
from functools import cache

from service.crypto import SecretBox
from service.db import make_engine, make_sessionmaker, transaction
from service.idempotency.ops import purge_expired
from service.jobs import sweeper
from service.jobs.runner import run_job
from service.queue import DELIVER, RUN_JOB, SWEEP
from service.webhooks import outbox
from service.webhooks.delivery import attempt_delivery, deliveries_to_resend
from worker.celery_app import app, config

log = logging.getLogger("retort.worker")


@cache
def _sessions():
    # One engine per pool process, built after the fork.
    sessions = make_sessionmaker(make_engine(config.database_url))
    outbox.attach(sessions, config)
    return sessions


@cache
def _box() -> SecretBox:
    return SecretBox(config.secret_keys)


@app.task(name=RUN_JOB, acks_late=True, reject_on_worker_lost=True)
def run(job_id: int) -> str:
    return run_job(config, _sessions(), job_id)


@app.task(name=DELIVER, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def deliver(delivery_id: int) -> None:
    delay = attempt_delivery(config, _sessions(), _box(), delivery_id)
    if delay is not None:
        deliver.apply_async(args=[delivery_id], countdown=delay, queue=config.webhook_queue)


@app.task(name=SWEEP, acks_late=False, ignore_result=True)
def sweep() -> dict:
    with transaction(_sessions()) as s:
        failed = sweeper.fail_jobs_with_expired_leases(s)
    with transaction(_sessions()) as s:
        queued = sweeper.jobs_to_redispatch(s, config.redispatch_after_s)
    for job_id in queued:
        run.apply_async(args=[job_id])
    with transaction(_sessions()) as s:
        deliveries = deliveries_to_resend(s)
    for delivery_id in deliveries:
        deliver.apply_async(args=[delivery_id], queue=config.webhook_queue)
    with transaction(_sessions()) as s:
        purged = purge_expired(s, config.idempotency_ttl_s)
    if failed or queued or deliveries:
        log.warning(
            "sweeper: failed %s (lease expired), sent again %s, deliveries sent again %s",
            failed,
            queued,
            deliveries,
        )
    return {"failed": failed, "redispatched": queued, "deliveries": deliveries, "purged": purged}
