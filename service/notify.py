"""Tell the API processes at once that a job moved, through the broker's Redis.

Waiting clients (`GET /v1/jobs/{id}?wait=`, event streams) are held by a
JobWatcher in each API process. A worker publishes a job's id on one channel
after each commit that changes what a client sees; every API process listens
and looks at its watched jobs right away. The message only says "look at job
N": the job row stays the record of truth, and a lost message costs one
polling interval (`watch_interval_s`, or `watch_live_interval_s` while the
channel is live), never a missed change.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

import redis

log = logging.getLogger("retort.notify")


def channel(queue: str) -> str:
    return f"retort:{queue}:jobs"


def redis_client(broker_url: str) -> redis.Redis | None:
    """A redis-py client for Celery's broker URL; None for a broker that is not Redis."""
    if broker_url.startswith("redis+socket://"):
        return redis.Redis(unix_socket_path=broker_url[len("redis+socket://") :])
    if broker_url.startswith(("redis://", "rediss://", "unix://")):
        return redis.Redis.from_url(broker_url)
    return None


class Publisher:
    """Publish job ids; best effort (a failure is logged once a minute, not raised)."""

    def __init__(self, broker_url: str, queue: str):
        self._url = broker_url
        self._channel = channel(queue)
        self._client: redis.Redis | None = None
        self._pid = 0
        self._warned = 0.0

    def publish(self, job_id: int) -> None:
        try:
            if self._pid != os.getpid():  # a forked process needs its own connection
                self._client, self._pid = redis_client(self._url), os.getpid()
            if self._client is not None:
                self._client.publish(self._channel, str(job_id))
        except redis.RedisError as exc:
            if time.monotonic() - self._warned > 60:
                self._warned = time.monotonic()
                log.warning("could not publish job progress (%s); API polling covers it", exc)


def listen(
    broker_url: str,
    queue: str,
    on_job: Callable[[int], None],
    on_live: Callable[[bool], None] | None = None,
) -> threading.Thread | None:
    """Call on_job(job_id) for every published id, from a daemon thread; reconnects forever.

    on_live(True) once Redis confirmed the subscription (from then on every
    id published reaches on_job, in order), on_live(False) when it is lost.
    """
    client = redis_client(broker_url)
    if client is None:
        return None
    live = on_live or (lambda _live: None)

    def run() -> None:
        delay = 0.5
        while True:
            try:
                pubsub = client.pubsub()
                pubsub.subscribe(channel(queue))
                delay = 0.5
                for message in pubsub.listen():
                    if message["type"] == "subscribe":
                        live(True)
                        continue
                    if message["type"] != "message":
                        continue
                    try:
                        on_job(int(message["data"]))
                    except ValueError:
                        continue
            except redis.RedisError as exc:
                live(False)
                log.warning("job progress channel lost (%s); retrying in %.1f s", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    thread = threading.Thread(target=run, name="job-progress", daemon=True)
    thread.start()
    return thread
