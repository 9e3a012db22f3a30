"""Run one migration job: claim, lease, fork, lock the target, apply, record.

The worker's pool process claims the job, takes the lease and keeps it alive
with a heartbeat; the migration itself runs in a child forked for this job
alone, so no project's helper modules are ever seen by another project's job.
"""

from __future__ import annotations

import functools
import json
import logging
import mmap
import os
import re
import shutil
import signal
import struct
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic.config import Config as AlembicConfig
from alembic.runtime.environment import EnvironmentContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.engine import URL, Connection
from sqlalchemy.orm import Session, sessionmaker

from service import notify, targets
from service.audit.ops import record_event
from service.bundles.models import Bundle, BundleFile
from service.bundles.ops import bundle_files
from service.config import Config
from service.crypto import SecretBox
from service.databases.models import AppliedRevision, Database
from service.db import (
    autocommit,
    epoch_now,
    make_engine,
    make_sessionmaker,
    transaction,
    utcnow,
)
from service.jobs.models import FINAL_STATES, Job, JobStep
from service.jobs.sweeper import hand_over
from service.locks import ops as leases
from service.locks.ops import FencedOutError
from service.projects.models import Project
from service.webhooks import outbox

log = logging.getLogger("retort.worker")
_RELATIVE = re.compile(r"^[+-]\d+$")
_DDL = re.compile(r"^\s*(CREATE|ALTER|DROP|RENAME|TRUNCATE)\b", re.IGNORECASE)

# The statements of a job's hot path are Core statements on the tables, built
# once per shape: an ORM-enabled statement, built anew for each call, cost
# about 0.2 ms more CPU, and a job runs about twenty (see BENCHMARKS.md).
_jobs = Job.__table__


@functools.cache
def _set_job(columns: tuple[str, ...], states: tuple[str, ...] = ()) -> sa.Update:
    """UPDATE jobs SET <columns> WHERE id = :job_id [AND state IN <states>]."""
    stmt = _jobs.update().where(_jobs.c.id == bindparam("job_id"))
    if states:
        stmt = stmt.where(_jobs.c.state.in_(states))
    return stmt.values({c: bindparam(f"v_{c}", type_=_jobs.c[c].type) for c in columns})


def _update_job(s: Session, job_id: int, states: tuple[str, ...] = (), **values: Any) -> int:
    """Set plain values on a job (in the given states only); return the rows changed."""
    stmt = _set_job(tuple(sorted(values)), states)
    params = {f"v_{k}": v for k, v in values.items()}
    return s.connection().execute(stmt, {"job_id": job_id, **params}).rowcount


@functools.cache
def _claim_stmt(dialect: str) -> sa.Update:
    return (
        _jobs.update()
        .where(_jobs.c.id == bindparam("job_id"), _jobs.c.state == "queued")
        .values(
            state="waiting_for_lock",
            worker=bindparam("v_worker"),
            claim_expires_at=epoch_now(dialect) + bindparam("ttl", type_=sa.Float),
        )
    )


_QUEUED_JOB = (
    select(
        _jobs.c.state,
        _jobs.c.database_id,
        _jobs.c.action,
        _jobs.c.target,
        _jobs.c.resolved_target,
        _jobs.c.attempt,
        _jobs.c.started_at,
        _jobs.c.from_heads,
        _jobs.c.bundle_pk,
        Database.name.label("database"),
        Database.url_encrypted,
        Project.name.label("project"),
        Project.settings,
    )
    .join(Database.__table__, Database.id == _jobs.c.database_id)
    .join(Project.__table__, Project.id == _jobs.c.project_id)
    .where(_jobs.c.id == bindparam("job_id"))
)
_JOB_STATE = select(_jobs.c.state).where(_jobs.c.id == bindparam("job_id"))


@functools.cache
def _start_stmt(set_started: bool, set_from: bool) -> sa.Update:
    values: dict[str, Any] = {
        "state": "running",
        "lock_waited_ms": _jobs.c.lock_waited_ms + bindparam("waited", type_=sa.Integer),
    }
    if set_started:
        values["started_at"] = bindparam("v_started_at", type_=_jobs.c.started_at.type)
    if set_from:
        values["from_heads"] = bindparam("v_from_heads", type_=_jobs.c.from_heads.type)
    return (
        _jobs.update()
        .where(_jobs.c.id == bindparam("job_id"), _jobs.c.state == "waiting_for_lock")
        .values(values)
    )


_applied = AppliedRevision.__table__
_APPLIED_CHECKSUMS = select(_applied.c.revision, _applied.c.sha256).where(
    _applied.c.database_id == bindparam("database_id")
)
_UNAPPLY = _applied.delete().where(
    _applied.c.database_id == bindparam("database_id"),
    _applied.c.revision.in_(bindparam("revisions", expanding=True)),
)
_INSERT_APPLIED = insert(_applied)
_INSERT_STEPS = insert(JobStep.__table__)


class JobFailure(Exception):
    """A job ends as failed with this error document."""

    def __init__(self, code: str, message: str, **extra: Any):
        super().__init__(message)
        self.error = {"code": code, "message": message, "revision": None, "statement": None}
        self.error.update(extra)


# Errors of a state database that is restarting or unreachable: worth a retry.
_STATE_DOWN = (sa.exc.OperationalError, sa.exc.InterfaceError)


class LeaseClock:
    """When this job's lease was last granted or renewed, shared with its forked child.

    A lease granted or renewed by a statement sent at local time T expires no
    earlier than T + TTL on the state database's clock (its expiry is computed
    there, after T), and nobody else can take it before that. So until
    T + TTL/2 the holder knows it still holds the lease without asking; the
    half TTL covers clock-rate drift and the moment between check and commit.
    A process frozen past that (SIGSTOP, a VM pause) falls back to the lease
    row and is fenced out there. CLOCK_MONOTONIC is one clock for every
    process of the machine, so the pool process's heartbeat can tell the
    migration child through a shared page.
    """

    def __init__(self) -> None:
        self._page = mmap.mmap(-1, 8)  # anonymous and shared: survives fork
        self._page[:] = struct.pack("d", float("-inf"))

    def renewed(self, sent: float) -> None:
        self._page[:] = struct.pack("d", sent)

    def surely_held(self, ttl: float) -> bool:
        (sent,) = struct.unpack("d", self._page[:])
        return time.monotonic() < sent + ttl / 2


_publisher: notify.Publisher | None = None


def publisher(config: Config) -> notify.Publisher:
    global _publisher
    if _publisher is None:
        _publisher = notify.Publisher(config.broker_url, config.queue)
    return _publisher


@dataclass
class JobContext:
    job_id: int
    database_id: int
    database: str
    project: str
    settings: dict[str, Any]
    token: int
    sessions: sessionmaker[Session]
    config: Config
    clock: LeaseClock
    # Set when the migration runs in the pool process (see _run_here).
    halt: _Halt | None = None

    def write(
        self,
        fn,
        *,
        event: str | None = None,
        data: dict | None = None,
        what: str | None = None,
        fenced_by_fn: bool = False,
    ) -> Any:
        """Run fn(session) in a transaction fenced by this job's token, with an audit event.

        A fenced-out holder's write is refused and the refusal itself is audited
        (as a refused `what`, or `event`). `fenced_by_fn`: fn's first statement
        is the fence itself (leases.release_fenced), so no check_fence first.
        """
        try:
            return self.run(fn, fenced=not fenced_by_fn, event=event, data=data, moved=True)
        except FencedOutError as exc:
            self._audit_refusal(exc, what or event)
            raise

    def run(
        self, fn, *, fenced: bool = False, event: str | None = None, data=None, moved=False
    ) -> Any:
        """Run fn(session) in a transaction, retried while the state database is away.

        Retries stop after a lease TTL: by then the lease may have passed to
        another worker, and the fence decides once the database is back.
        """
        deadline = time.monotonic() + self.config.lease_ttl_s
        delay = 0.1
        while True:
            try:
                with transaction(self.sessions) as s:
                    if fenced:
                        leases.check_fence(s, self.database_id, self.token)
                    result = fn(s)
                    if event:
                        self.audit(s, event, data)
                if fenced or event or moved:
                    self.published()
                return result
            except _STATE_DOWN as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning(
                    "job %s: state database unavailable (%s); retrying in %.1f s",
                    self.job_id,
                    type(exc).__name__,
                    delay,
                )
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def published(self) -> None:
        """Tell waiting clients the job moved (after the commit that moved it)."""
        publisher(self.config).publish(self.job_id)

    def check_fence(self, refused: str) -> None:
        """Raise FencedOutError (and audit it) unless this job's token still holds the lease.

        Within half a TTL of a grant or renewal the lease cannot have passed to
        anyone (see LeaseClock): no query. Past that, the lease row decides.
        """
        if self.clock.surely_held(self.config.lease_ttl_s):
            return
        try:
            self.run(lambda s: leases.check_fence(s, self.database_id, self.token, lock=False))
        except FencedOutError as exc:
            self._audit_refusal(exc, refused)
            raise

    def _audit_refusal(self, exc: FencedOutError, event: str | None) -> None:
        """Say in the audit log that a stale holder tried to write, and was refused."""
        try:
            with transaction(self.sessions) as s:
                record_event(
                    s,
                    "write.fenced_out",
                    actor="worker",
                    project=self.project,
                    database=self.database,
                    job_id=self.job_id,
                    fencing_token=self.token,
                    data={
                        "token": exc.token,
                        "lease_token": exc.current,
                        "lease_holder_job": exc.holder_job_id,
                        "refused": event or "write",
                        "pid": os.getpid(),
                    },
                )
        except Exception:  # noqa: BLE001 - the refusal stands even if it cannot be told
            log.exception("job %s: could not audit a fenced-out write", self.job_id)

    def finish(
        self, s: Session, values: dict[str, Any], event: str, data: dict, released: bool = False
    ) -> None:
        """End the job and release its lease in one transaction (already fenced).

        `released`: the transaction began with leases.release_fenced.
        """
        states = ("waiting_for_lock", "running")
        if _update_job(s, self.job_id, states, finished_at=utcnow(), **values):
            self.audit(s, event, data)
        if released or leases.release(s, self.database_id, self.token):
            self.audit(s, "lease.released")

    def audit(self, s: Session, event: str, data: dict | None = None) -> None:
        record_event(
            s,
            event,
            actor="worker",
            project=self.project,
            database=self.database,
            job_id=self.job_id,
            fencing_token=self.token,
            data=data,
        )


# --------------------------------------------------------------------------
# In the pool process: claim, lease, fork, heartbeat, finalize.
# --------------------------------------------------------------------------


# A warm shutdown of this worker (SIGTERM) lets running migrations go on until
# this monotonic deadline, then stops them and hands their jobs over.
_shutdown_deadline: float | None = None
_wakers: set[threading.Event] = set()


def request_shutdown(grace_s: float) -> None:
    """Called in a pool process when its worker is shutting down (signal-safe)."""
    global _shutdown_deadline
    if _shutdown_deadline is None:
        _shutdown_deadline = time.monotonic() + grace_s
    for wake in list(_wakers):
        wake.set()


def run_job(config: Config, sessions: sessionmaker[Session], job_id: int) -> str:
    """Run a job to its end; a second delivery of the same job does nothing."""
    if _shutdown_deadline is not None:
        # Shutting down: leave the job queued, marked unsent, so the sweeper
        # hands it to another worker at its next round.
        with transaction(sessions) as s:
            s.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == "queued")
                .values(dispatched_at=None)
            )
        return "not_claimed"
    worker = f"{os.uname().nodename}:{os.getpid()}"
    with autocommit(sessions.kw["bind"]) as conn:  # a read: no BEGIN/COMMIT round trips
        job = conn.execute(_QUEUED_JOB, {"job_id": job_id}).one_or_none()
        queued = job is not None and job.state == "queued"
        bundle = _bundle(conn, job.bundle_pk) if queued else None
    if bundle is None:
        log.info("job %s not claimed (state %s)", job_id, job.state if job else "missing")
        return "not_claimed"
    target = job.resolved_target or job.target
    plan = _Plan(
        action=job.action,
        target=target,
        relative=_is_relative(target),
        attempt=job.attempt,
        previously_started=job.started_at is not None,
        from_heads=job.from_heads,
        bundle=bundle,
        url_encrypted=job.url_encrypted,
    )
    ctx = JobContext(
        job_id,
        job.database_id,
        job.database,
        job.project,
        job.settings,
        0,
        sessions,
        config,
        LeaseClock(),
    )
    forked = config.isolation == "fork" or bundle.helpers
    # The usual job (a first attempt, run in this process) opens its target
    # before the claim, so one transaction claims, leases and starts it.
    early = None if forked or plan.attempt > 1 else _open_early(ctx, plan)
    state = granted = started = False
    try:
        with transaction(sessions) as s:
            conn = s.connection()
            claim = _claim_stmt(conn.dialect.name)
            params = {"job_id": job_id, "v_worker": worker, "ttl": config.lease_ttl_s}
            if not conn.execute(claim, params).rowcount:
                state = conn.execute(_JOB_STATE, {"job_id": job_id}).scalar() or "missing"
            else:
                record_event(
                    s,
                    "job.claimed",
                    actor="worker",
                    project=ctx.project,
                    database=ctx.database,
                    job_id=job_id,
                    data={"worker": worker, "attempt": job.attempt},
                )
                granted = _try_lease(s, ctx, worker, time.monotonic(), first=True) is True
                if granted and early is not None:
                    early.started = _start(s, ctx, plan, early.heads, 0, early.noop, early.shas)
        started = early is not None and early.started is not None
    finally:
        if early is not None and not started:
            early.close()
            early = None
    if state:
        log.info("job %s not claimed (state %s)", job_id, state)
        return "not_claimed"
    # Waiting for another job: worth telling at once. A granted claim is not
    # (a waiter woken now would only have to ask again); a started job is.
    if not granted or started:
        ctx.published()
    if not granted and not _acquire_lease(ctx, worker):
        return "not_started"
    if forked:
        return _run_forked(ctx, plan)
    return _run_here(ctx, plan, early)


def _run_forked(ctx: JobContext, plan: _Plan) -> str:
    """Run the migration in a child forked for this job alone (its helper modules stay there)."""
    job_id = ctx.job_id
    pid = os.fork()
    if pid == 0:  # the child: run the migration, never return into Celery
        code = 0
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGUSR2, signal.SIG_IGN)
            _die_with_parent()
            ended = _run_in_child(ctx, plan)
            code = 0 if ended else 3
        except BaseException as exc:  # noqa: BLE001 - the parent records the crash
            print(f"job {job_id}: migration process failed: {type(exc).__name__}", file=sys.stderr)
            code = 70
        finally:
            try:
                outbox.flush(timeout=3)  # the job is over: let its webhooks reach the broker
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)

    beat = _Beat(ctx, lambda: _kill(pid))
    status = None
    try:
        _, status = os.waitpid(pid, 0)
    finally:
        if status is None:  # interrupted (time limit, shutdown): never orphan the child
            _kill(pid)
            _, status = os.waitpid(pid, 0)
        beat.end()
        _finalize(ctx, os.waitstatus_to_exitcode(status), beat.lost.is_set(), beat.stopped.is_set())
    return "done"


class _Beat:
    """A running job's lease heartbeat (see _heartbeat), and what it saw."""

    def __init__(self, ctx: JobContext, stop) -> None:
        self.lost = threading.Event()
        self.stopped = threading.Event()
        self.done = threading.Event()
        self.wake = threading.Event()
        _wakers.add(self.wake)
        self.thread = threading.Thread(
            target=_heartbeat,
            args=(ctx, stop, self.lost, self.stopped, self.done, self.wake),
            name=f"lease-{ctx.job_id}",
            daemon=True,
        )
        self.thread.start()
        if _shutdown_deadline is not None:
            self.wake.set()

    def end(self) -> None:
        self.done.set()
        self.wake.set()
        self.thread.join()
        _wakers.discard(self.wake)


def _run_here(ctx: JobContext, plan: _Plan, early: _Early | None = None) -> str:
    """Run the migration in this process, with the scripts and target engine it keeps.

    For bundles without helper modules: revision files are loaded with
    importlib and never enter sys.modules, and nothing of the bundle is put
    on sys.path, so no job sees another project's code. A lost lease or the
    end of the shutdown grace cannot kill this process: they halt the job,
    which cancels the statement running on the target and refuses every
    further statement and commit, so the target rolls the step back.
    """
    ctx.halt = _Halt()

    def stop() -> None:
        ctx.halt.trigger(ctx.clock)
        threading.Thread(
            target=_exit_unless_halted,
            args=(ctx, beat.done, beat.stopped),
            name="halt",
            daemon=True,
        ).start()

    beat = _Beat(ctx, stop)
    ended = False
    try:
        ended = _run_migration(ctx, ctx.config, plan, early)
    finally:
        beat.end()
        _finalize(ctx, 0 if ended else 3, beat.lost.is_set(), beat.stopped.is_set())
    return "done"


# A halted migration gets this long to reach its next statement or commit (both
# refused once halted); revision code that runs on without either (a sleep, a
# loop) cannot be stopped from another thread, so the pool process ends itself,
# as a forked child would have been killed: the target rolls the step back.
HALT_GRACE_S = 3.0


def _exit_unless_halted(ctx: JobContext, done: threading.Event, stopped: threading.Event) -> None:
    if done.wait(HALT_GRACE_S):
        return
    log.error(
        "job %s: its migration did not stop within %.0f s of being halted; ending this process",
        ctx.job_id,
        HALT_GRACE_S,
    )
    try:
        _finalize(ctx, 70, lost=not stopped.is_set(), stopped=stopped.is_set())
    finally:
        logging.shutdown()
        os._exit(70)


class _Halted(Exception):
    """The job was halted from outside (lease lost, shutdown grace over): stop, roll back."""


class _Halt:
    """How the heartbeat stops a migration running in the pool process itself."""

    def __init__(self) -> None:
        self.halted = False
        self.link: _Link | None = None
        self.url: URL | None = None

    def trigger(self, clock: LeaseClock) -> None:
        self.halted = True
        clock.renewed(float("-inf"))  # from now on every fence check asks the lease row
        link, url = self.link, self.url
        if link is not None and url is not None:
            try:
                targets.interrupt(link.conn, url)
            except Exception:  # noqa: BLE001 - the next statement or commit is refused anyway
                log.exception("could not interrupt the target statement")

    def check(self, ctx: JobContext) -> None:
        """Refuse the next statement or commit of a halted job.

        A stale holder's refusal is audited like any fenced-out write: the fence
        check goes to the lease row once halted (trigger reset the clock).
        """
        if self.halted:
            ctx.check_fence("step.applied")
            raise _Halted("the job was halted")


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this child if the pool process that forked it dies."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _try_lease(s: Session, ctx: JobContext, worker: str, started: float, first: bool = False):
    """Try for the lease in the caller's transaction; True once granted, else its holder's job.

    On the grant, the token is written on the job in the same transaction.
    """
    sent = time.monotonic()
    ttl = ctx.config.lease_ttl_s
    token, holder = leases.try_acquire(s, ctx.database_id, ctx.job_id, worker, ttl)
    if token is None:
        if first and holder is not None:
            _update_job(s, ctx.job_id, waiting_on_job_id=holder)
        return holder
    waited_ms = int((time.monotonic() - started) * 1000)
    _update_job(
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


def _acquire_lease(ctx: JobContext, worker: str) -> bool:
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
        if _shutdown_deadline is not None:
            _unclaim(ctx, "worker_shutdown")
            return False
        with transaction(ctx.sessions) as s:
            # Locked: a cancel or hand-over cannot commit between this read and
            # the grant's write on the job (a final job never changes again).
            state = s.scalar(select(Job.state).where(Job.id == job_id).with_for_update())
            if state != "waiting_for_lock":
                log.info("job %s left waiting_for_lock (%s) before it got the lease", job_id, state)
                return False
            holder = _try_lease(s, ctx, worker, started)
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


def _unclaim(ctx: JobContext, reason: str) -> None:
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
        if _shutdown_deadline is not None:
            timeout = min(timeout, _shutdown_deadline - time.monotonic())
        wake.wait(max(timeout, 0))
        wake.clear()
        if done.is_set():
            return
        if _shutdown_deadline is not None and time.monotonic() >= _shutdown_deadline:
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


def _finalize(ctx: JobContext, exit_code: int, lost: bool, stopped: bool) -> None:
    """After the child: end or hand over a job the child could not finish, free the lease."""
    if exit_code == 0 and not (lost or stopped):
        return  # the child ended the job and released the lease itself
    state = ctx.run(lambda s: s.scalar(select(Job.state).where(Job.id == ctx.job_id)))
    if state in FINAL_STATES:
        return  # the child ended the job and released the lease itself
    try:
        if lost or stopped:
            # The migration was stopped from outside, not by its own doing: the
            # next attempt goes on from the target's current heads.
            reason = "worker_shutdown" if stopped else "lease_lost"
            message = (
                f"the worker was shut down and its migration did not end within "
                f"{ctx.config.shutdown_grace_s:.0f} s; it was stopped and rolled back"
                if stopped
                else "the job lost its lease (its heartbeat could not renew it) and was stopped"
            )
            ctx.write(
                lambda s: hand_over(
                    s,
                    ctx.job_id,
                    reason=reason,
                    message=message,
                    max_attempts=ctx.config.max_attempts,
                    token=ctx.token,
                    actor="worker",
                    count_attempt=not stopped,
                )
            )
            return
        message = f"the migration process ended unexpectedly (exit code {exit_code})"
        error = {"code": "worker_crashed", "message": message, "revision": None, "statement": None}
        ctx.write(
            lambda s: ctx.finish(
                s,
                {"state": "failed", "error": error},
                "job.failed",
                {"code": "worker_crashed", "exit_code": exit_code},
            )
        )
    except FencedOutError:
        log.warning("job %s: fenced out, leaving its state to the new holder", ctx.job_id)


# --------------------------------------------------------------------------
# In the forked child: the migration itself.
# --------------------------------------------------------------------------


@dataclass
class _Plan:
    """What the child is asked to do, as read from the job row."""

    action: str
    target: str  # the resolved target on a recovered attempt of a relative request
    relative: bool
    attempt: int
    previously_started: bool
    from_heads: list[str] | None
    bundle: _BundleInfo
    url_encrypted: str


@dataclass(frozen=True)
class _BundleInfo:
    pk: int
    digest: str
    versions_path: str
    revisions: list[dict[str, Any]]
    # Python files that are not revisions (helpers the revisions may import):
    # such a bundle runs in a process forked for the job alone.
    helpers: bool


# Bundles are immutable: what a job needs of one is read once per process.
_bundles: dict[int, _BundleInfo] = {}
_MAX_BUNDLES = 256


def _bundle(s: Session | Connection, pk: int) -> _BundleInfo:
    info = _bundles.get(pk)
    if info is None:
        row = s.execute(
            select(Bundle.digest, Bundle.versions_path, Bundle.revisions).where(Bundle.pk == pk)
        ).one()
        scripts = {r["path"] for r in row.revisions}
        helpers = any(
            path.endswith(".py")
            and path not in scripts
            and path.rpartition("/")[2] not in ("env.py", "__init__.py")
            for path in s.scalars(select(BundleFile.path).where(BundleFile.bundle_pk == pk))
        )
        info = _BundleInfo(pk, row.digest, row.versions_path, row.revisions, helpers)
        if len(_bundles) >= _MAX_BUNDLES:
            _bundles.pop(next(iter(_bundles)))
        _bundles[pk] = info
    return info


def _run_in_child(parent_ctx: JobContext, plan: _Plan) -> bool:
    """Run the migration; return whether this process ended the job (succeeded or failed)."""
    config = parent_ctx.config
    # Never touch the parent's pooled connections: a new engine for this process,
    # pooled so that its transactions share one connection.
    engine = make_engine(config.database_url)
    sessions = make_sessionmaker(engine)
    outbox.attach(sessions, config, background=True)
    ctx = JobContext(**{**parent_ctx.__dict__, "sessions": sessions})
    try:
        return _run_migration(ctx, config, plan)
    finally:
        engine.dispose()


def _run_migration(ctx: JobContext, config: Config, plan: _Plan, early=None) -> bool:
    url: URL | None = None
    try:
        if early is not None:
            url = early.url
        else:
            url = targets.normalize_url(SecretBox(config.secret_keys).decrypt(plan.url_encrypted))
        bundle_dir = materialize_bundle(ctx, plan.bundle, config.bundle_cache_dir)
        bundle = plan.bundle
        return _migrate(ctx, url, plan, bundle_dir, bundle.versions_path, bundle.revisions, early)
    except FencedOutError as exc:
        log.error("job %s: %s; its writes stop here", ctx.job_id, exc)
    except _Halted:
        log.warning("job %s: halted; its step was rolled back", ctx.job_id)
    except JobFailure as exc:
        return _fail(ctx, exc.error, url)
    except Exception as exc:  # noqa: BLE001 - any other error ends the job with its reason
        message = targets.scrub(f"{type(exc).__name__}: {exc}", url)
        log.error("job %s failed unexpectedly: %s", ctx.job_id, message)
        return _fail(
            ctx,
            {"code": "internal_error", "message": message, "revision": None, "statement": None},
            url,
        )
    return False


def _is_relative(target: str) -> bool:
    """+N, -N and branch@+N depend on where the database is: not safe to run twice."""
    return bool(_RELATIVE.match(target) or re.search(r"@[+-]\d+$", target))


def _fail(ctx: JobContext, error: dict[str, Any], url: URL | None) -> bool:
    error = {k: targets.scrub(v, url) if isinstance(v, str) else v for k, v in error.items()}

    def mark(s: Session):
        ctx.finish(s, {"state": "failed", "error": error}, "job.failed", {"error": error})

    try:
        ctx.write(mark)
        return True
    except FencedOutError as exc:
        log.error("job %s: %s; not recording its failure", ctx.job_id, exc)
        return False


def materialize_bundle(ctx: JobContext, bundle: _BundleInfo, cache_dir: Path) -> Path:
    """Write a bundle's files under the cache directory once (atomic rename)."""
    final = cache_dir / bundle.digest
    if final.is_dir():
        return final
    files = ctx.run(lambda s: bundle_files(s, bundle))
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache_dir))
    try:
        for path, content in files.items():
            dest = tmp / path
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(content)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, final)
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# Steps that follow each other faster than this share one state transaction:
# a 30-revision chain costs one write instead of 30, while a slow migration
# still shows each step as it lands.
STEP_FLUSH_S = 0.25


@dataclass
class _StepRecorder:
    ctx: JobContext
    sha_by_revision: dict[str, str]
    url: URL
    statements: list[str] = field(default_factory=list)
    applied: int = 0
    boundary: float = 0.0
    boundary_at: Any = None
    # Step records not written yet, and when they last were (see STEP_FLUSH_S).
    pending: list[Any] = field(default_factory=list)
    flushed_at: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    flusher: threading.Thread | None = None
    stopping: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        """Before Alembic runs: also start writing buffered steps in the background."""
        self.boundary = time.perf_counter()
        self.boundary_at = utcnow()
        self.flushed_at = time.monotonic()
        self.stopping.clear()
        self.flusher = threading.Thread(target=self._flush_late, name="steps", daemon=True)
        self.flusher.start()

    def stop(self) -> None:
        """After Alembic ran: no background writes from here on."""
        self.stopping.set()
        if self.flusher is not None:
            self.flusher.join()
            self.flusher = None

    def _flush_late(self) -> None:
        # A step buffered while the next one takes its time (a long revision)
        # is written within STEP_FLUSH_S anyway, not only when that one ends.
        while not self.stopping.wait(STEP_FLUSH_S / 2):
            if self.pending and time.monotonic() - self.flushed_at >= STEP_FLUSH_S:
                try:
                    self.flush()
                except Exception as exc:  # noqa: BLE001 - the next step's check decides
                    log.warning("job %s: writing steps failed: %s", self.ctx.job_id, exc)

    def on_sql(self, conn, cursor, statement, parameters, context, executemany) -> None:
        if self.ctx.halt is not None:
            self.ctx.halt.check(self.ctx)
        text = statement.strip()
        if text == "BEGIN":  # the SQLite transactional recipe's own statement
            return
        if parameters:
            shown = json.dumps(parameters, default=str)
            text += f"  -- parameters: {shown[:500]}"
        self.statements.append(targets.scrub(text, self.url))

    def on_version_apply(self, ctx, step, heads, run_args) -> None:
        # Runs after the step's DDL and version-table update, before its COMMIT:
        # a fenced-out or halted holder raises here and the step is rolled back.
        if self.ctx.halt is not None:
            self.ctx.halt.check(self.ctx)
        direction = "stamp" if step.is_stamp else ("up" if step.is_upgrade else "down")
        # up_revision_ids is the upper side of the step whatever its direction:
        # the revisions applied by an upgrade, unapplied by a downgrade.
        revisions = list(step.up_revision_ids)
        sql, self.statements = self.statements, []
        now = time.perf_counter()
        started_at, self.boundary_at = self.boundary_at, utcnow()
        finished_at = self.boundary_at
        duration = (now - self.boundary) * 1000
        self.boundary = now
        doc = step.up_revision.doc if step.up_revision is not None else None
        sha = self.sha_by_revision.get(revisions[0]) if revisions else None
        is_upgrade = step.is_upgrade
        data = {
            "revisions": revisions,
            "direction": direction,
            "duration_ms": round(duration, 3),
            "statements": len(sql),
            "sha256": sha,
        }

        record = {
            "job_id": self.ctx.job_id,
            "revisions": revisions,
            "direction": direction,
            "state": "applied",
            "message": doc,
            "sql": sql,
            "sha256": sha,
            "fencing_token": self.ctx.token,
            "started_at": started_at,
            "finished_at": finished_at,
            "duration_ms": duration,
        }
        record["_upgrade"], record["_event"] = is_upgrade, data

        if time.monotonic() - self.flushed_at >= STEP_FLUSH_S:
            # A slow migration: record this step now (fenced), so it shows at once.
            with self.lock:
                self.pending.append(record)
            self.flush()
        else:
            # Fast steps: check the fence before this COMMIT, write the records
            # together a little later (or with the job's end), fenced again then.
            self.ctx.check_fence("step.applied")
            with self.lock:
                self.pending.append(record)
        self.applied += 1

    def write_pending(self, s: Session) -> None:
        """Write the buffered step records in the caller's (fenced) transaction.

        A few statements whatever the number of steps: the steps in one INSERT,
        the checksums of what is now applied in one DELETE and one INSERT.
        """
        if not self.pending:  # kept until committed: the write may be retried
            return
        applied: dict[str, dict[str, Any]] = {}
        unapplied: set[str] = set()
        steps = []
        for record in self.pending:
            row = {k: v for k, v in record.items() if not k.startswith("_")}
            steps.append(row)
            for rev in row["revisions"]:
                if record["_upgrade"]:
                    unapplied.discard(rev)
                    applied[rev] = {
                        "database_id": self.ctx.database_id,
                        "revision": rev,
                        "sha256": self.sha_by_revision.get(rev, ""),
                        "job_id": self.ctx.job_id,
                        "applied_at": row["finished_at"],
                    }
                else:
                    applied.pop(rev, None)
                    unapplied.add(rev)
            self.ctx.audit(s, "step.applied", record["_event"])
        # Core, not the ORM's bulk path: the rows are plain values already.
        conn = s.connection()
        conn.execute(_INSERT_STEPS, steps)
        if applied or unapplied:
            revisions = sorted(unapplied | set(applied))
            conn.execute(_UNAPPLY, {"database_id": self.ctx.database_id, "revisions": revisions})
        if applied:
            conn.execute(_INSERT_APPLIED, list(applied.values()))

    def flush(self) -> None:
        with self.lock:
            if self.pending:
                self.ctx.write(self.write_pending, what="step.applied")
                self.pending.clear()
            self.flushed_at = time.monotonic()


class _TargetLost(Exception):
    """The connection to the target dropped in the middle of a migration step."""

    def __init__(self, revision: str | None, reason: str, partial: bool):
        super().__init__(reason)
        self.revision = revision
        self.reason = reason
        self.partial = partial


@dataclass
class _Link:
    """The target connection of this job, replaced when it drops and is made again."""

    engine: sa.Engine
    conn: Connection
    pooled: bool = False

    def close(self, clean: bool) -> None:
        """Give the connection back; one that may still hold a session lock is dropped."""
        if not clean:
            try:
                self.conn.invalidate()
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.conn.close()
        if not self.pooled:
            self.engine.dispose()


# Target engines kept by a pool process: one per database URL and session settings.
_engines: dict[tuple[str, str], sa.Engine] = {}
_MAX_ENGINES = 32


def _target_engine(url: URL, ctx: JobContext) -> sa.Engine:
    key = (url.render_as_string(hide_password=False), json.dumps(ctx.settings, sort_keys=True))
    engine = _engines.pop(key, None)
    if engine is None:
        engine = targets.make_target_engine(url, ctx.config.connect_timeout_s, pooled=True)
        while len(_engines) >= _MAX_ENGINES:
            _engines.pop(next(iter(_engines))).dispose()
    _engines[key] = engine  # most recently used last
    return engine


def _drop_engine(engine: sa.Engine, pooled: bool) -> None:
    # A pooled engine stays cached; its broken connections were invalidated.
    if not pooled:
        engine.dispose()


def _connect(ctx: JobContext, url: URL) -> _Link:
    pooled = ctx.halt is not None  # in the pool process: keep the engine for the next jobs
    if pooled:
        engine = _target_engine(url, ctx)
    else:
        engine = targets.make_target_engine(url, ctx.config.connect_timeout_s, ctx.job_id)

    def on_retry(attempt: int, exc: Exception) -> None:
        reason = targets.scrub(_db_message(exc), url)
        ctx.run(
            lambda s: ctx.audit(s, "target.connect_retry", {"attempt": attempt, "reason": reason})
        )

    try:
        conn = targets.connect_with_retries(
            engine, ctx.config.connect_attempts, ctx.config.connect_backoff_s, on_retry
        )
    except sa.exc.OperationalError as exc:
        _drop_engine(engine, pooled)
        raise JobFailure(
            "target_unreachable",
            f"cannot connect to {targets.mask_url(url)} after {ctx.config.connect_attempts} "
            f"attempts: {targets.scrub(_db_message(exc), url)}",
        ) from None
    return _Link(engine, conn, pooled)


def _take_session_lock(ctx: JobContext, conn: Connection, url: URL) -> int:
    """Poll the target's session lock with backoff; return how long it took (ms)."""
    started = time.monotonic()
    delay = 0.02
    while not targets.try_session_lock(conn, url, ctx.settings):
        if time.monotonic() - started > ctx.config.lock_wait_timeout_s:
            raise JobFailure(
                "lock_timeout",
                "another session holds the migration lock on the target database "
                f"(waited {ctx.config.lock_wait_timeout_s:.0f} s)",
            )
        time.sleep(delay)
        delay = min(delay * 2, 1.0)
    return int((time.monotonic() - started) * 1000)


def _prepare(ctx: JobContext, link: _Link, url: URL) -> tuple[int, list[str]]:
    """Take the target's session lock and read its heads; return (waited ms, heads)."""
    waited_ms = _take_session_lock(ctx, link.conn, url)
    return waited_ms, _session_heads(link.conn, url, ctx.settings)


def _session_heads(conn: Connection, url: URL, settings: dict[str, Any]) -> list[str]:
    """Under the session lock: set the project's timeouts, read the heads, commit."""
    targets.apply_session_settings(conn, url, settings)
    heads = targets.read_heads(conn, settings)
    conn.commit()  # the autobegin trap: Alembic must start from no transaction
    return heads


def _script_dir(plan: _Plan, bundle_dir: Path, versions_path: str, here: bool) -> ScriptDirectory:
    """The bundle's scripts: cached by a pool process (`here`), importable in a forked child."""
    root = bundle_dir / versions_path.rpartition("/")[0] if "/" in versions_path else bundle_dir
    if not here:
        return _load_scripts(root, bundle_dir / versions_path, importable=True)
    return _cached_scripts(plan.bundle.digest, root, bundle_dir / versions_path)


@dataclass
class _Started:
    """What _start found: the checksums the database has applied; whether the job ended."""

    applied: dict[str, str]
    ended: bool = False


def _start(s: Session, ctx, plan: _Plan, heads, waited_ms, noop, shas) -> _Started | None:
    """Mark the job running (a no-op one: succeeded) in the caller's fenced transaction.

    None when the job left waiting_for_lock meanwhile (cancelled): nothing was touched.
    """
    resumed = plan.attempt > 1
    stmt = _start_stmt(not plan.previously_started, plan.from_heads is None)
    params = {
        "job_id": ctx.job_id,
        "waited": waited_ms,
        "v_started_at": utcnow(),
        "v_from_heads": heads,
    }
    if not s.connection().execute(stmt, params).rowcount:
        return None
    data = {"target_lock_waited_ms": waited_ms, "current_heads": heads}
    if resumed:
        data["attempt"] = plan.attempt
    ctx.audit(s, "job.resumed" if resumed else "job.started", data)
    applied = _applied_checksums(s, ctx.database_id)
    if noop:
        try:
            _check_checksums(shas, applied, heads)
        except JobFailure:
            return _Started(applied)  # started only: the caller fails it, saying why
        ctx.finish(
            s,
            {"state": "succeeded", "to_heads": heads},
            "job.succeeded",
            {"from_heads": heads, "to_heads": heads, "steps": 0},
        )
        return _Started(applied, ended=True)
    return _Started(applied)


@dataclass
class _Early:
    """A target opened, locked and read before the claim (see _open_early)."""

    url: URL
    settings: dict[str, Any]
    link: _Link
    heads: list[str]
    noop: bool
    shas: dict[str, str]
    started: _Started | None = None  # by the claim transaction

    def close(self) -> None:
        """Release the lock and give the connection back (the job goes the ordinary way)."""
        clean = True
        try:
            self.link.conn.rollback()
            targets.release_session_lock(self.link.conn, self.url, self.settings)
        except Exception:  # noqa: BLE001 - dropping the session releases it anyway
            clean = False
        self.link.close(clean)


def _open_early(ctx: JobContext, plan: _Plan) -> _Early | None:
    """Open the target, take its session lock and read its heads, before the claim.

    Then one transaction claims the job, takes the lease and starts the job
    (and ends it, already at its target): the usual job costs Retort's
    database one transaction less, and starts sooner. Only a first attempt,
    in this process, with one connect attempt and no wait for the lock:
    anything else (the target slow to answer, its lock held, an error) and
    the job takes the ordinary way, lease first, which retries, waits and
    reports. The session lock held a moment before the lease orders nothing
    new: whoever holds the lease also needs that lock to migrate.
    """
    try:
        url = targets.normalize_url(SecretBox(ctx.config.secret_keys).decrypt(plan.url_encrypted))
        engine = _target_engine(url, ctx)
        conn = targets.connect_with_retries(engine, 1, 0)
    except Exception:  # noqa: BLE001 - the ordinary way connects again, and reports
        return None
    link = _Link(engine, conn, True)
    try:
        if not targets.try_session_lock(conn, url, ctx.settings):
            link.close(clean=True)
            return None
        heads = _session_heads(conn, url, ctx.settings)
        bundle = plan.bundle
        bundle_dir = materialize_bundle(ctx, bundle, ctx.config.bundle_cache_dir)
        script = _script_dir(plan, bundle_dir, bundle.versions_path, here=True)
        noop = _nothing_to_do(script, plan, heads)
        shas = {r["id"]: r["sha256"] for r in bundle.revisions}
        return _Early(url, ctx.settings, link, heads, noop, shas)
    except Exception:  # noqa: BLE001 - as above
        link.close(clean=False)  # dropped, so its session lock goes with it
        return None


def _migrate(ctx, url, plan: _Plan, bundle_dir, versions_path, revisions, early=None) -> bool:
    sha_by_revision = {r["id"]: r["sha256"] for r in revisions}
    script = _script_dir(plan, bundle_dir, versions_path, here=ctx.halt is not None)
    mysql = targets.dialect_of(url) == "mysql"
    if early is not None:
        link, heads, started = early.link, early.heads, early.started
    else:
        link = _connect(ctx, url)
    if ctx.halt is not None:
        ctx.halt.link, ctx.halt.url = link, url
    clean = False
    try:
        if early is None:
            waited_ms, heads = _prepare(ctx, link, url)
            if plan.attempt > 1 and plan.previously_started and mysql:
                _refuse_blind_resume(script, plan, heads)
            # Already there (the usual `upgrade head` of a deploy that changed no
            # schema): the job starts and succeeds in one transaction, no Alembic run.
            noop = plan.attempt == 1 and _nothing_to_do(script, plan, heads)
            started = ctx.write(
                lambda s: _start(s, ctx, plan, heads, waited_ms, noop, sha_by_revision)
            )
            if started is None:
                return False  # cancelled while waiting: nothing was touched
        if started.ended:
            return True
        applied, resumed = started.applied, plan.attempt > 1
        from_heads = plan.from_heads if plan.from_heads is not None else heads
        if resumed and plan.action == "upgrade" and plan.from_heads is not None:
            _record_lost_steps(ctx, script, plan.from_heads, heads, sha_by_revision)
        _check_checksums(sha_by_revision, applied, heads)
        recorder = _StepRecorder(ctx, sha_by_revision, url)
        reconnects = 0
        while True:
            try:
                _run_alembic(ctx, link.conn, url, script, plan, recorder)
                break
            except _TargetLost as lost:
                recorder.flush()  # the steps committed before the loss
                reconnects += 1
                _reconnect(ctx, link, url, lost, reconnects)
        to_heads = targets.read_heads(link.conn, ctx.settings)
        link.conn.commit()

        def succeed(s: Session):
            leases.release_fenced(s, ctx.database_id, ctx.token)  # also the fence
            recorder.write_pending(s)
            ctx.finish(
                s,
                {"state": "succeeded", "to_heads": to_heads},
                "job.succeeded",
                {"from_heads": from_heads, "to_heads": to_heads, "steps": recorder.applied},
                released=True,
            )

        ctx.write(succeed, fenced_by_fn=True, what="job.succeeded")
        return True
    finally:
        if ctx.halt is not None:
            ctx.halt.link = None
        try:
            link.conn.rollback()
            targets.release_session_lock(link.conn, url, ctx.settings)
            clean = not (ctx.halt is not None and ctx.halt.halted)
        except Exception:  # noqa: BLE001 - closing the session releases it anyway
            pass
        link.close(clean)


def _record_lost_steps(ctx, script, from_heads, heads, sha_by_revision) -> None:
    """Record the steps an earlier attempt committed on the target but not in Retort.

    Steps are written in batches (STEP_FLUSH_S); a worker lost within that window
    leaves the target ahead of the job's records. The target's version table is
    the truth: record what it says was applied, and say how it was learned.
    """
    try:
        now = [r.revision for r in script.revision_map.iterate_revisions(tuple(heads), ())]
        before = {r.revision for r in script.revision_map.iterate_revisions(tuple(from_heads), ())}
    except Exception:  # noqa: BLE001 - heads outside this bundle: the checksum check says so
        return

    def record(s: Session) -> None:
        recorded = {
            rev
            for revs in s.scalars(
                select(JobStep.revisions).where(
                    JobStep.job_id == ctx.job_id,
                    JobStep.state == "applied",
                    JobStep.direction == "up",
                )
            )
            for rev in revs
        }
        for rev in reversed(now):  # oldest first
            if rev in before or rev in recorded:
                continue
            at = utcnow()
            doc = script.get_revision(rev).doc
            s.add(
                JobStep(
                    job_id=ctx.job_id,
                    revisions=[rev],
                    direction="up",
                    state="applied",
                    message=f"{doc} (recorded on recovery: applied by an earlier attempt "
                    "whose worker was lost before recording it)",
                    sql=[],
                    sha256=sha_by_revision.get(rev),
                    fencing_token=ctx.token,
                    started_at=at,
                    finished_at=at,
                    duration_ms=0.0,
                )
            )
            s.merge(
                AppliedRevision(
                    database_id=ctx.database_id,
                    revision=rev,
                    sha256=sha_by_revision.get(rev, ""),
                    job_id=ctx.job_id,
                    applied_at=at,
                )
            )
            ctx.audit(s, "step.recovered", {"revisions": [rev], "direction": "up"})

    ctx.write(record)


def _reconnect(ctx: JobContext, link: _Link, url: URL, lost: _TargetLost, count: int) -> None:
    """Connect again after the target dropped mid-step, and go on from its heads.

    PostgreSQL and SQLite rolled the interrupted step back with the connection;
    on MySQL/MariaDB, a step that had run DDL may be half applied: stop there.
    """
    where = f"during revision {lost.revision}" if lost.revision else "during the migration"
    ctx.run(
        lambda s: ctx.audit(
            s,
            "target.connection_lost",
            {"revision": lost.revision, "reason": lost.reason, "reconnect": count},
        )
    )
    link.close(clean=False)
    if count > ctx.config.connect_attempts:
        raise JobFailure(
            "target_unreachable",
            f"the connection to the target dropped {where} {count} times; giving up",
            revision=lost.revision,
        )
    try:
        fresh = _connect(ctx, url)
    except JobFailure as exc:
        undone = (
            "statements of it that ran before may still be applied (MySQL/MariaDB DDL commits "
            "implicitly)"
            if lost.partial
            else "it was rolled back by the database"
        )
        exc.error["message"] = (
            f"the connection to the target was lost {where} ({lost.reason}) and could not be "
            f"made again; {undone}. {exc.error['message']}"
        )
        exc.error["revision"] = lost.revision
        raise
    link.engine, link.conn = fresh.engine, fresh.conn
    if ctx.halt is not None:
        ctx.halt.link = link
    _, heads = _prepare(ctx, link, url)
    if lost.partial:
        raise JobFailure(
            "needs_attention",
            f"the connection to the MySQL/MariaDB target was lost {where} after some of its DDL "
            f"had run, and DDL commits implicitly there: {lost.revision} may be half applied "
            f"while the version table says {', '.join(heads) or 'base'}. Inspect the database, "
            f"finish or undo {lost.revision} by hand, then stamp.",
            revision=lost.revision,
            database_heads=heads,
        )
    ctx.run(
        lambda s: ctx.audit(s, "target.reconnected", {"current_heads": heads, "reconnect": count})
    )


def _steps_for(script: ScriptDirectory, action: str, target: str, heads) -> list[Any]:
    if action == "upgrade":
        return list(script._upgrade_revs(target, heads))
    if action == "downgrade":
        return list(script._downgrade_revs(target, heads))
    return list(script._stamp_revs(tuple(target.split(",")), heads))


def _nothing_to_do(script: ScriptDirectory, plan: _Plan, heads: list[str]) -> bool:
    """Whether an absolute upgrade or downgrade finds the database already at its target."""
    if plan.relative or plan.action not in ("upgrade", "downgrade"):
        return False
    try:
        return not _steps_for(script, plan.action, plan.target, tuple(heads))
    except Exception:  # noqa: BLE001 - the full run reports what is wrong with the target
        return False


def _destination(action: str, steps: list[Any]) -> str | None:
    """The one revision a relative upgrade or downgrade ends at, if it is one."""
    if not steps or action not in ("upgrade", "downgrade"):
        return None
    ends = steps[-1].to_revisions
    if not ends:
        return "base"
    return ends[0] if len(ends) == 1 else None


def _refuse_blind_resume(script: ScriptDirectory, plan: _Plan, heads: list[str]) -> None:
    """A MySQL migration that was cut off may have left a half-applied step: stop for a human."""
    if plan.relative:
        remaining = True  # it never planned, or its destination is not one revision
    else:
        remaining = bool(_steps_for(script, plan.action, plan.target, tuple(heads)))
    if remaining:
        where = ", ".join(heads) or "base"
        raise JobFailure(
            "needs_attention",
            "the worker running this job was lost in the middle of its migration of a "
            "MySQL/MariaDB database, where DDL commits statement by statement: the revision "
            f"after {where} may be half applied. Inspect the database, finish or undo that "
            "revision by hand, then stamp.",
            database_heads=heads,
        )


def _applied_checksums(s: Session, database_id: int) -> dict[str, str]:
    rows = s.connection().execute(_APPLIED_CHECKSUMS, {"database_id": database_id})
    return dict(rows.tuples().all())


def _check_checksums(sha_by_revision: dict[str, str], applied: dict[str, str], current: list[str]):
    changed = sorted(
        rev
        for rev, sha in applied.items()
        if rev in sha_by_revision and sha and sha_by_revision[rev] != sha
    )
    if changed:
        raise JobFailure(
            "revision_changed",
            f"revision {changed[0]} was applied from a different file than the bundle carries "
            f"(applied sha256 {applied[changed[0]][:12]}, "
            f"bundle {sha_by_revision[changed[0]][:12]});"
            " revision files must not change once applied: add a new revision instead",
            revision=changed[0],
            revisions=changed,
        )
    unknown = [h for h in current if h not in sha_by_revision]
    if unknown:
        raise JobFailure(
            "unknown_current_revision",
            f"the database is at {', '.join(unknown)}, which this bundle does not contain; "
            "upload a bundle that includes it",
            revision=unknown[0],
        )


# Loaded scripts kept by a pool process, by bundle digest (bundles never change).
_scripts: dict[str, ScriptDirectory] = {}
_MAX_SCRIPTS = 32


def _cached_scripts(digest: str, root: Path, versions_dir: Path) -> ScriptDirectory:
    script = _scripts.pop(digest, None)
    if script is None:
        script = _load_scripts(root, versions_dir, importable=False)
        while len(_scripts) >= _MAX_SCRIPTS:
            _scripts.pop(next(iter(_scripts)))
    _scripts[digest] = script  # most recently used last
    return script


def _load_scripts(root: Path, versions_dir: Path, importable: bool) -> ScriptDirectory:
    """Load a bundle's revisions; `importable`: its helper modules too (a forked child only)."""
    if importable:
        sys.path.insert(0, str(root))
    try:
        script = ScriptDirectory(str(root), version_locations=[str(versions_dir)])
        script.revision_map.heads  # noqa: B018 - load every revision file now
        return script
    except Exception as exc:  # noqa: BLE001
        raise JobFailure(
            "bundle_load_failed",
            f"the revision scripts do not load: {type(exc).__name__}: {exc}",
        ) from None


def _run_alembic(ctx, conn, url, script, plan: _Plan, recorder: _StepRecorder) -> None:
    planned: list[Any] = []
    base = recorder.applied

    def plan_steps(rev, _context):
        target = plan.target
        if _RELATIVE.match(target) and len(rev) > 1:
            raise JobFailure(
                "ambiguous_relative_target",
                f"relative target {target} is ambiguous: the database has {len(rev)} heads "
                f"({', '.join(sorted(rev))}); use a revision id or branch@{target}",
            )
        steps = _steps_for(script, plan.action, target, rev)
        planned.extend(steps)
        dest = _destination(plan.action, steps) if plan.relative else None
        if dest:
            # A recovered attempt must go where this one was going, not N further.
            ctx.write(
                lambda s: s.execute(
                    update(Job).where(Job.id == ctx.job_id).values(resolved_target=dest)
                )
            )
            plan.target, plan.relative = dest, False
        return steps

    settings = ctx.settings
    action, target = plan.action, plan.target
    env = EnvironmentContext(
        AlembicConfig(),
        script,
        fn=plan_steps,
        destination_rev=target,
    )
    sa.event.listen(conn, "before_cursor_execute", recorder.on_sql)
    try:
        with env:
            env.configure(
                connection=conn,
                transaction_per_migration=True,
                on_version_apply=recorder.on_version_apply,
                version_table=settings.get("version_table") or "alembic_version",
                version_table_schema=settings.get("version_table_schema"),
                target_metadata=(
                    sa.MetaData(naming_convention=settings["naming_convention"])
                    if settings.get("naming_convention")
                    else sa.MetaData()
                ),
            )
            recorder.start()
            with env.begin_transaction():
                env.run_migrations()
    except (FencedOutError, JobFailure, _Halted):
        raise
    except Exception as exc:  # noqa: BLE001 - a revision raised, or the target went away
        if ctx.halt is not None and ctx.halt.halted:
            raise _Halted(f"the job was halted: {type(exc).__name__}") from None
        if conn.invalidated:
            raise _target_lost(url, planned, recorder, base, exc, ctx) from None
        if isinstance(exc, CommandError) and not planned:
            raise JobFailure("invalid_target", f"cannot {action} to {target}: {exc}") from None
        if not planned:
            raise JobFailure(
                "migration_failed",
                f"Alembic failed before running any revision: {type(exc).__name__}: "
                f"{targets.scrub(_db_message(exc), url)}",
            ) from None
        raise _step_failure(
            ctx, conn, url, planned[recorder.applied - base :], recorder, exc
        ) from None
    finally:
        recorder.stop()
        try:
            sa.event.remove(conn, "before_cursor_execute", recorder.on_sql)
        except Exception:  # noqa: BLE001 - an invalidated connection may have dropped it
            pass


def _target_lost(url, planned, recorder, base, exc, ctx) -> _TargetLost:
    pending = planned[recorder.applied - base :]
    revision = getattr(getattr(pending[0], "revision", None), "revision", None) if pending else None
    version_table = ctx.settings.get("version_table") or "alembic_version"
    partial = targets.dialect_of(url) == "mysql" and any(
        _DDL.match(q) and version_table not in q for q in recorder.statements
    )
    recorder.statements = []
    return _TargetLost(revision, targets.scrub(_db_message(exc), url), partial)


def _db_message(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return text or type(exc).__name__


def _step_failure(ctx, conn, url, pending, recorder: _StepRecorder, exc) -> JobFailure:
    """Record the failed step and describe what the database was left with."""
    failed = pending[0] if pending else None
    revision = None
    doc = None
    if failed is not None:
        revision = getattr(getattr(failed, "revision", None), "revision", None)
        doc = getattr(failed, "doc", None)
    statement = getattr(exc, "statement", None) or (
        recorder.statements[-1] if recorder.statements else None
    )
    message = targets.scrub(_db_message(exc), url)
    sql = recorder.statements
    try:
        conn.rollback()
        heads_now = targets.read_heads(conn, ctx.settings)
        conn.commit()
    except Exception:  # noqa: BLE001
        heads_now = None
    dialect = targets.dialect_of(url)
    version_table = ctx.settings.get("version_table") or "alembic_version"
    # What the failed step ran before the failing statement, minus Alembic's own
    # version-table bookkeeping: on MySQL each DDL statement of it is committed.
    ran = sql[:-1] if statement and sql and statement.strip() in sql[-1] else sql
    partial = dialect == "mysql" and any(_DDL.match(q) and version_table not in q for q in ran)
    where = ", ".join(heads_now) if heads_now else "base"
    if heads_now is None:
        code = "needs_attention"
        summary = (
            f"revision {revision} failed and the database's state could not be read back "
            f"afterwards; check its version table before retrying. Error: {message}"
        )
    elif partial:
        code = "needs_attention"
        summary = (
            f"revision {revision} failed on MySQL/MariaDB, where DDL commits implicitly: "
            f"statements of {revision} that ran before the failure are still applied, while the "
            f"version table says {where}. Inspect the database, undo or finish {revision} by "
            f"hand, then stamp. Error: {message}"
        )
    else:
        code = "revision_failed"
        rolled = "was rolled back" if dialect != "mysql" else "changed nothing"
        summary = (
            f"revision {revision} failed and {rolled}; the database is at {where} "
            f"(its last good revision). Error: {message}"
        )
    now = utcnow()
    duration = (time.perf_counter() - recorder.boundary) * 1000 if recorder.boundary else 0.0

    def record(s: Session):
        recorder.write_pending(s)
        s.add(
            JobStep(
                job_id=ctx.job_id,
                revisions=[revision] if revision else [],
                direction="up" if getattr(failed, "is_upgrade", True) else "down",
                state="failed",
                message=doc,
                sql=[targets.scrub(x, url) for x in sql],
                sha256=recorder.sha_by_revision.get(revision) if revision else None,
                fencing_token=ctx.token,
                started_at=recorder.boundary_at or now,
                finished_at=now,
                duration_ms=duration,
            )
        )
        s.execute(update(Job).where(Job.id == ctx.job_id).values(to_heads=heads_now))

    ctx.write(record, event="step.failed", data={"revision": revision, "error": message})
    return JobFailure(
        code,
        summary,
        revision=revision,
        statement=targets.scrub(statement, url) if statement else None,
        database_message=message,
        database_heads=heads_now,
    )
