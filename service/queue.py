"""The one Celery app, built from Config; the API only sends tasks by name."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery

from service.config import Config

RUN_JOB = "jobs.run"
DELIVER = "webhooks.deliver"
SETTLE = "rollouts.settle"


def make_celery(config: Config) -> Celery:
    app = Celery("retort", broker=config.broker_url, backend=None)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_default_queue=config.queue,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            # Must exceed the longest migration: a message redelivered early runs
            # the task again; the job row's conditional claim makes that a no-op.
            "visibility_timeout": 6 * 3600,
        },
        worker_hijack_root_logger=False,
        worker_pool="prefork",
        worker_send_task_events=False,
        task_send_sent_event=False,
        enable_utc=True,
        task_routes={DELIVER: {"queue": config.webhook_queue}},
    )
    return app


class Dispatcher:
    """Send job messages; the job row stays the record of truth if sending fails."""

    def __init__(self, config: Config):
        self._app = make_celery(config)
        self._webhook_queue = config.webhook_queue

    def send_job(self, job_id: int) -> None:
        self._app.send_task(RUN_JOB, args=[job_id])

    def send_settle(self, rollout_id: int, database_ids: list[int]) -> None:
        self._app.send_task(SETTLE, args=[rollout_id, database_ids])

    def send_delivery(self, delivery_id: int, countdown: float | None = None) -> None:
        self._app.send_task(
            DELIVER, args=[delivery_id], countdown=countdown, queue=self._webhook_queue
        )

    @contextmanager
    def broker(self) -> Iterator[Any]:
        """The broker's own client (redis-py), for the sweeper's marker key."""
        with self._app.connection_for_write() as conn:
            yield conn.default_channel.client

    def ping(self) -> None:
        with self._app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
