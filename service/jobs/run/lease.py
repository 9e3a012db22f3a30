"""The lease on a target database: take it, wait for it, keep it alive with a heartbeat.

The lease lives in Retort's state database and is fenced by a token that only
grows; the heartbeat thread renews it and stops the job's runner once it is
lost or the shutdown grace is over.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.db import epoch_now, transaction, utcnow
from service.jobs.models import FINAL_STATES, Job
from service.jobs.run.context import JobContext
from service.jobs.run.transitions import update_job
from service.locks import ops as leases

log = logging.getLogger("retort.worker")


def try_lease(s: Session, ctx: JobContext, worker: str, started: float, first: bool = False):
    """Try for the lease in the caller's transaction; True once granted, else its holder's job.

    On the grant, the token is written on the job in the same transaction.
    """
    sent = time.monotonic()
    ttl = ctx.config.lease_ttl_s
    token, holder = leases.try_acquire(s, ctx.database_id, ctx.job_id, worker, ttl)
    if token is None:
        if first and holder is not None:
            update_job(s, ctx.job_id, waiting_on_job_id=holder)
        return holder
    waited_ms = int((time.monotonic() - started) * 1000)
    update_job(
        s,
        ctx.job_id,
        waiting_on_job_id=None,
        fencing_token=token,
        lock_waited_ms=waited_ms,
        claim_expires_at=None,
    )
    ctx.token = token
    ctx.clock.renewed(sent)
    ctx.audit(s, "lease.granted", {"waited_ms": waited_ms, "ttl_s": ttl})
    return True


def acquire_lease(ctx: JobContext, worker: str) -> bool:
    """Wait for the lease; on the grant, record the token on the job in the same transaction.

    While waiting, the claim is renewed: a worker that dies here leaves a claim
    that expires, and the sweeper hands the job to another worker.
    """
    config, job_id = ctx.config, ctx.job_id
    ttl = config.lease_ttl_s
    started = time.monotonic()
    renewed = started
    delay = 0.02
    announced_holder = None
    while True:
        if ctx.process.shutdown_deadline is not None:
            unclaim(ctx, "worker_shutdown")
            return False
        with transaction(ctx.sessions) as s:
            # Locked: a cancel or hand-over cannot commit between this read and
            # the grant's write on the job (a final job never changes again).
            state = s.scalar(select(Job.state).where(Job.id == job_id).with_for_update())
            if state != "waiting_for_lock":
                log.info("job %s left waiting_for_lock (%s) before it got the lease", job_id, state)
                return False
            holder = try_lease(s, ctx, worker, started)
            if holder is True:
                return True
            values: dict[str, Any] = {}
            if holder != announced_holder:
                values["waiting_on_job_id"] = holder
                announced_holder = holder
            if time.monotonic() - renewed > ttl / 3:
                values["claim_expires_at"] = epoch_now(s.bind.dialect.name) + ttl
                renewed = time.monotonic()
            if values:
                s.execute(update(Job).where(Job.id == job_id).values(**values))
        if time.monotonic() - started > config.lock_wait_timeout_s:
            with transaction(ctx.sessions) as s:
                failed = s.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.state == "waiting_for_lock")
                    .values(
                        state="failed",
                        finished_at=utcnow(),
                        claim_expires_at=None,
                        error={
                            "code": "lock_timeout",
                            "message": f"job {holder} held the lease on this database for "
                            f"longer than {config.lock_wait_timeout_s:.0f} s",
                            "revision": None,
                            "statement": None,
                            "held_by_job": holder,
                        },
                    )
                ).rowcount
                if failed:
                    ctx.audit(s, "job.failed", {"code": "lock_timeout"})
            return False
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


def unclaim(ctx: JobContext, reason: str) -> None:
    """Give a job that has not started back to the queue (this worker is stopping)."""
    with transaction(ctx.sessions) as s:
        count = s.execute(
            update(Job)
            .where(Job.id == ctx.job_id, Job.state == "waiting_for_lock")
            .values(
                state="queued",
                worker=None,
                dispatched_at=None,
                claim_expires_at=None,
                waiting_on_job_id=None,
            )
        ).rowcount
        if count:
            ctx.audit(s, "job.released", {"code": reason})


class Beat:
    """A running job's lease heartbeat (see _heartbeat), and what it saw."""

    def __init__(self, ctx: JobContext, stop) -> None:
        self.ctx = ctx
        self.lost = threading.Event()
        self.stopped = threading.Event()
        self.done = threading.Event()
        self.wake = threading.Event()
        ctx.process.wakers.add(self.wake)
        self.thread = threading.Thread(
            target=_heartbeat,
            args=(ctx, stop, self.lost, self.stopped, self.done, self.wake),
            name=f"lease-{ctx.job_id}",
            daemon=True,
        )
        self.thread.start()
        if ctx.process.shutdown_deadline is not None:
            self.wake.set()

    def end(self) -> None:
        self.done.set()
        self.wake.set()
        self.thread.join()
        self.ctx.process.wakers.discard(self.wake)


def _heartbeat(
    ctx: JobContext,
    stop,
    lost: threading.Event,
    stopped: threading.Event,
    done: threading.Event,
    wake: threading.Event,
) -> None:
    """Renew the lease; stop the migration once the lease is lost or the shutdown grace is over."""
    ttl = ctx.config.lease_ttl_s
    last_ok = time.monotonic()
    next_renewal = last_ok + ttl / 3
    while True:
        timeout = next_renewal - time.monotonic()
        deadline = ctx.process.shutdown_deadline
        if deadline is not None:
            timeout = min(timeout, deadline - time.monotonic())
        wake.wait(max(timeout, 0))
        wake.clear()
        if done.is_set():
            return
        deadline = ctx.process.shutdown_deadline
        if deadline is not None and time.monotonic() >= deadline:
            # The grace is over: stop the migration (the target rolls its step
            # back); _finalize frees the lease and hands the job over at once.
            log.warning("job %s: still running after the shutdown grace; stopping it", ctx.job_id)
            stopped.set()
            stop()
            return
        if time.monotonic() < next_renewal:
            continue
        next_renewal = time.monotonic() + ttl / 3
        sent = time.monotonic()
        try:
            with transaction(ctx.sessions) as s:
                ok = leases.renew(s, ctx.database_id, ctx.token, ttl)
            if ok:
                ctx.clock.renewed(sent)
        except Exception:  # noqa: BLE001 - state DB blip: try again until the TTL is spent
            log.exception("job %s: lease renewal failed", ctx.job_id)
            if time.monotonic() - last_ok < ttl * 0.9:
                next_renewal = time.monotonic() + min(1.0, ttl / 6)
                continue
            ok = False
        if ok:
            last_ok = time.monotonic()
            continue
        # Lost, taken over, or past its TTL: another job may already hold the
        # database, so this migration must not go on. A job that already ended
        # released the lease itself; its child is only closing connections.
        stop()
        try:
            with transaction(ctx.sessions) as s:
                state = s.scalar(select(Job.state).where(Job.id == ctx.job_id))
        except Exception:  # noqa: BLE001
            state = None
        if state not in FINAL_STATES:
            log.error(
                "job %s lost its lease (token %s); stopped its migration", ctx.job_id, ctx.token
            )
            lost.set()
        return
