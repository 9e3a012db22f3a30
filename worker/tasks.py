"""Thin tasks: take an id, call domain code."""

from __future__ import annotations

from functools import cache

from service.db import make_engine, make_sessionmaker
from service.jobs.runner import run_job
from service.queue import RUN_JOB
from worker.celery_app import app, config


@cache
def _sessions():
    # One engine per pool process, built after the fork.
    return make_sessionmaker(make_engine(config.database_url))


@app.task(name=RUN_JOB, acks_late=True, reject_on_worker_lost=True)
def run(job_id: int) -> str:
    return run_job(config, _sessions(), job_id)
