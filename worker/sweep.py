"""The sweeper's own process: `retort beat` (`python -m worker.sweep`).

The sweep runs here, in a loop, not as a Celery task: a task would wait in the
jobs' queue behind every queued migration, and expire there, exactly when a
lost worker's job needs it (issue 15). This process runs no tenant code and
holds no worker slot, so recovery starts within `lease_ttl_s +
sweep_interval_s` however full the workers are. It sends messages through the
broker like the API does (service.queue.Dispatcher). More than one may run
(one per machine, say): each step is a conditional update, so two sweepers
never hand the same job over twice.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

from service import logs, metrics
from service.audit import checkpoints
from service.audit.actions import AuditAction
from service.config import Config
from service.db import PING_IDLE_AFTER_S, make_engine, transaction, utcnow
from service.idempotency.ops import purge_expired
from service.jobs import sweeper
from service.jobs.ops import due_drift_checks
from service.jobs.wakeups import Wakeups
from service.queue import Dispatcher
from service.rollouts.drive import drive
from service.rollouts.ops import running_rollouts
from service.sessions import make_state_sessions
from service.webhooks import outbox
from service.webhooks.delivery import deliveries_to_resend, post_signed

log = logging.getLogger("retort.sweeper")


def broker_epoch_key(config: Config) -> str:
    """Present in the broker while it keeps its data; gone after a restart of a
    Redis that keeps nothing on disk, or a flush: then no queued job has a message."""
    return f"retort:{config.queue}:broker-epoch"


class Sweeper:
    def __init__(self, config: Config, sessions, dispatcher: Dispatcher):
        self.config = config
        self._sessions = sessions
        self._dispatcher = dispatcher
        self._signing_key = checkpoints.load_signing_key(config.audit_signing_key_path)
        self._checkpoint_at = 0.0
        self._drift_at = 0.0
        self._wakeups = Wakeups(config.broker_url, config.queue)

    def checkpoint(self) -> dict | None:
        """Sign the audit chain's head and copy it out of the database, if it grew."""
        with transaction(self._sessions) as s:
            cp = checkpoints.make_checkpoint(s, self._signing_key)
        if cp is not None:
            checkpoints.write_outside(self.config.data_dir, cp)
            url = self.config.audit_checkpoint_webhook_url
            if url:
                payload = {"event": AuditAction.AUDIT_CHECKPOINT, "checkpoint": cp}
                secret = self.config.audit_checkpoint_webhook_secret
                error = post_signed(self.config, url, secret, AuditAction.AUDIT_CHECKPOINT, payload)
                if error:
                    log.error("audit checkpoint %s not sent to %s: %s", cp["seq"], url, error)
        return cp

    def once(self) -> dict:
        """One sweep: hand over lost jobs, resend lost messages, purge old keys."""
        config = self.config
        with transaction(self._sessions) as s:
            handed = sweeper.recover_lost_jobs(s, config.max_attempts)
        metrics.lease_takeovers(handed)  # committed: counted once
        with self._dispatcher.broker() as broker:
            key = broker_epoch_key(config)
            broker_lost = not broker.exists(key)
            lost_before = utcnow() if broker_lost else None
            sent: list[int] = []
            while True:
                with transaction(self._sessions) as s:
                    queued = sweeper.jobs_to_redispatch(
                        s, config.redispatch_after_s, lost_before=lost_before
                    )
                for job_id in queued:
                    self._dispatcher.send_job(job_id)
                sent += queued
                if not broker_lost or not queued:
                    break
            if broker_lost:  # only once every queued job has a message again
                broker.set(key, lost_before.isoformat())
        with transaction(self._sessions) as s:
            parked = sweeper.parked_to_wake(s, config.lease_ttl_s, config.lock_wait_timeout_s)
        for job_id in parked:
            self._dispatcher.send_job(job_id)
        with transaction(self._sessions) as s:
            rollouts = running_rollouts(s)
        for rollout_id in rollouts:  # a rollout whose wake-up was lost moves on here
            try:
                drive(self._sessions, self._dispatcher, self._wakeups, rollout_id)
            except Exception:  # noqa: BLE001 - the sweep's other duties go on
                log.exception("sweeper: moving rollout %s on failed", rollout_id)
        with transaction(self._sessions) as s:
            deliveries = deliveries_to_resend(s)
        for delivery_id in deliveries:
            self._dispatcher.send_delivery(delivery_id)
        with transaction(self._sessions) as s:
            purged = purge_expired(s, config.idempotency_ttl_s)
        drift: list[int] = []
        if time.monotonic() - self._drift_at >= config.drift_sweep_interval_s:
            self._drift_at = time.monotonic()
            try:
                with transaction(self._sessions) as s:
                    drift = due_drift_checks(s)
                for job_id in drift:
                    self._dispatcher.send_job(job_id)
            except Exception:  # noqa: BLE001 - the sweep's other duties go on
                log.exception("sweeper: scheduling drift checks failed")
        if time.monotonic() - self._checkpoint_at >= config.audit_checkpoint_interval_s:
            self.checkpoint()
            self._checkpoint_at = time.monotonic()
        if handed["recovering"] or handed["failed"] or sent or deliveries:
            log.warning(
                "sweeper: recovering %s, failed %s (worker lost), sent again %s%s, "
                "deliveries sent again %s",
                handed["recovering"],
                handed["failed"],
                sent,
                " (the broker lost its messages)" if broker_lost and sent else "",
                deliveries,
            )
        return {
            **handed,
            "redispatched": sent,
            "deliveries": deliveries,
            "purged": purged,
            "drift_checks": drift,
            "parked_woken": parked,
        }

    def run(self, stop: threading.Event) -> None:
        """Sweep every `sweep_interval_s` (from one start to the next) until `stop`.

        A failed sweep (the state database or the broker down) is logged and
        tried again at the next tick: the sweeper outlives every outage.
        """
        interval = self.config.sweep_interval_s
        failing = False
        while not stop.is_set():
            started = time.monotonic()
            try:
                self.once()
                if failing:
                    log.warning("sweeper: sweeping again")
                failing = False
            except Exception as exc:  # noqa: BLE001 - the loop must go on
                if not failing:
                    log.error("sweeper: a sweep failed, trying every %.1f s: %s", interval, exc)
                failing = True
            stop.wait(max(0.0, interval - (time.monotonic() - started)))


def main() -> None:
    config = Config.from_env()
    logs.configure(config.log_format)
    metrics.configure(config)  # before anything imports prometheus_client
    metrics.serve(config)  # --metrics-port
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    engine = make_engine(config.database_url, ping_idle_after_s=PING_IDLE_AFTER_S)
    dispatcher = Dispatcher(config)
    log.warning(
        "retort sweeper: every %.1f s (lease TTL %.1f s): recovery starts within %.1f s of a "
        "lost worker",
        config.sweep_interval_s,
        config.lease_ttl_s,
        config.lease_ttl_s + config.sweep_interval_s,
    )
    sessions = make_state_sessions(engine, config.audit_keys)
    outbox.attach(sessions, config, dispatcher)  # hand-overs notify webhooks
    try:
        Sweeper(config, sessions, dispatcher).run(stop)
    finally:
        engine.dispose()


if __name__ == "__main__":
    main()
