"""The lease on a target database: take it, keep it alive with a heartbeat.

The lease lives in Retort's state database and is fenced by a token that only
grows; the heartbeat thread renews it and stops the job's runner once it is
lost or the shutdown grace is over.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.audit.actions import AuditAction
from service.audit.ops import record_event
from service.db import transaction
from service.jobs.models import Job
from service.jobs.run.context import JobContext
from service.jobs.run.transitions import update_job
from service.jobs.states import FINAL_STATES
from service.locks import ops as leases

log = logging.getLogger("retort.worker")


def try_lease(s: Session, ctx: JobContext, worker: str, waited_ms: int | None, attempt: int):
    """Try for the lease in the caller's transaction (the claim's); True once granted,
    else its holder's job.

    On the grant the job is claimed (audited) and the token written on it, in
    the same transaction. `waited_ms`: how long the job was parked before.
    """
    sent = time.monotonic()
    ttl = ctx.config.lease_ttl_s
    token, holder = leases.try_acquire(s, ctx.database_id, ctx.job_id, worker, ttl)
    if token is None:
        return holder
    record_event(
        s,
        AuditAction.JOB_CLAIMED,
        actor="worker",
        project=ctx.project,
        database=ctx.database,
        job_id=ctx.job_id,
        data={"worker": worker, "attempt": attempt},
    )
    waited = waited_ms or 0
    update_job(
        s,
        ctx.job_id,
        waiting_on_job_id=None,
        waiting_for=None,
        waiting_since=None,
        fencing_token=token,
        lock_waited_ms=waited,
        claim_expires_at=None,
    )
    ctx.token = token
    ctx.clock.renewed(sent)
    ctx.audit(s, AuditAction.LEASE_GRANTED, {"waited_ms": waited, "ttl_s": ttl})
    return True


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
            # In the job's context: its log lines say which job (service.logs).
            target=contextvars.copy_context().run,
            args=(_heartbeat, ctx, stop, self.lost, self.stopped, self.done, self.wake),
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
