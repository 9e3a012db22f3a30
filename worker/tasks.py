"""Thin tasks: take an id, call domain code."""

from __future__ import annotations

import gc
import importlib
import logging
import os
import signal
from functools import cache

from celery import signals

from service import metrics
from service.crypto import SecretBox
from service.db import PING_IDLE_AFTER_S, make_engine
from service.jobs.run.claim import run_job
from service.jobs.run.context import WorkerProcess
from service.jobs.run.sandbox import probe
from service.queue import DELIVER, RUN_JOB, SETTLE
from service.rollouts.settle import settle_batch
from service.sessions import make_state_sessions
from service.webhooks import outbox
from service.webhooks.delivery import attempt_delivery
from worker.celery_app import app, config

log = logging.getLogger("retort.worker")
# Alembic logs a line per revision at INFO; every step is in the job and the
# audit log already, with its SQL and duration.
logging.getLogger("alembic.runtime.migration").setLevel(logging.WARNING)


@cache
def _sessions():
    # One engine per pool process, built after the fork.
    sessions = make_state_sessions(
        make_engine(config.database_url, ping_idle_after_s=PING_IDLE_AFTER_S), config.audit_keys
    )
    outbox.attach(sessions, config)
    return sessions


@cache
def _process() -> WorkerProcess:
    """This pool process's state for its jobs: sessions, warm runners, caches."""
    return WorkerProcess(config, _sessions())


@cache
def _box() -> SecretBox:
    return SecretBox(config.secret_keys)


@app.task(name=RUN_JOB, acks_late=True, reject_on_worker_lost=True)
def run(job_id: int) -> str:
    return run_job(_process(), job_id)


@app.task(name=SETTLE, acks_late=True, reject_on_worker_lost=True)
def settle(rollout_id: int, database_ids: list[int]) -> dict:
    return settle_batch(_process(), rollout_id, database_ids)


@app.task(name=DELIVER, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def deliver(delivery_id: int) -> None:
    delay = attempt_delivery(config, _sessions(), _box(), delivery_id)
    if delay is not None:
        deliver.apply_async(args=[delivery_id], countdown=delay, queue=config.webhook_queue)


# ------------------------------------------------------------------ shutdown
# SIGTERM starts Celery's warm shutdown, which waits for running tasks without
# a bound. Retort bounds it: the main process tells each pool process, which
# lets its migration run for `shutdown_grace_s`, then stops it and hands the
# job over (WorkerProcess.request_shutdown).

_controller = None


@signals.worker_init.connect
def _remember_controller(sender, **_):
    global _controller
    _controller = sender
    # Say plainly, once, where tenant code will run (docs/security.md).
    found = probe(config.sandbox, config.bwrap_path)
    if config.sandbox == "bwrap" and found.mode != "bwrap":
        log.error(
            "RETORT_SANDBOX=bwrap and bwrap cannot run here; every job will be refused: %s",
            found.reason,
        )
    elif found.mode == "bwrap":
        log.warning("retort worker: %s", found.describe())
    else:
        log.warning("retort worker: %s", found.describe())


# What a job imports on first use, loaded before the heap is frozen (see _settle_heap).
_JOB_MODULES = (
    "sqlite3",
    "sqlalchemy.dialects.sqlite",
    "sqlalchemy.dialects.postgresql",
    "sqlalchemy.dialects.mysql",
    "pymysql",
    "alembic.ddl",
    "alembic.operations.toimpl",
    "alembic.runtime.environment",
)


def _settle_heap() -> None:
    """Take what every job shares out of the cycle collector's way.

    A pool process holds about 150,000 long-lived objects (SQLAlchemy, Alembic,
    Celery, the dialects). Every full collection walks them all, about 130 ms
    here, and a fleet of jobs set one off every few jobs: about 8 ms a job.
    Frozen (gc.freeze), they are never walked again; what jobs leave behind
    is collected as usual. BENCHMARKS.md has the figures.
    """
    for name in _JOB_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:  # an optional driver: its jobs import it (and fail) themselves
            pass
    gc.collect()
    gc.freeze()


@signals.worker_process_init.connect
def _on_pool_process_start(**_):
    signal.signal(signal.SIGUSR2, lambda *_: _process().request_shutdown(config.shutdown_grace_s))
    _settle_heap()
    _process().pool.prime()  # a spare runner, started before the first job needs one
    _process().scheduler  # noqa: B018 - its thread: wake-ups due (service.jobs.wakeups)


@signals.worker_process_shutdown.connect
def _on_pool_process_end(**_):
    """Let this process's warm runners go (they would die with it anyway)."""
    metrics.process_exited(os.getpid())
    if _process.cache_info().currsize:
        _process().close()


@signals.worker_ready.connect
def _serve_metrics(**_):
    """--metrics-port: from the main process, once its pool processes are forked."""
    metrics.serve(config)


@signals.worker_shutting_down.connect
def _tell_pool_processes(sig, how, exitcode, **_):
    pool = getattr(getattr(_controller, "pool", None), "_pool", None)
    for proc in getattr(pool, "_pool", None) or []:
        pid = getattr(proc, "pid", None)
        if isinstance(pid, int):
            try:
                os.kill(pid, signal.SIGUSR2)
            except ProcessLookupError:
                pass
