"""The worker's side of a job: its process-wide state and one job's fenced writes.

`WorkerProcess` is everything a pool process keeps between jobs (the state
sessions, the publisher, the warm runners, what it read of bundles, the
shutdown deadline): one object owned by the process, no module globals.
`JobContext` is one job: its identity as the job row says (never as a runner
says), its lease token, and the transactions that write its state.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from service import metrics, notify
from service.audit.actions import AuditAction
from service.audit.ops import record_event
from service.config import Config
from service.crypto import SecretBox
from service.db import transaction
from service.jobs.run.environments import Environments
from service.jobs.run.lease_clock import LeaseClock
from service.jobs.run.sandbox import Probe, RunnerPool, probe
from service.jobs.wakeups import Scheduler, Wakeups
from service.locks import ops as leases
from service.locks.ops import FencedOutError
from service.queue import Dispatcher
from service.rollouts.drive import drive

log = logging.getLogger("retort.worker")

# Errors of a state database that is restarting or unreachable: worth a retry.
STATE_DOWN = (sa.exc.OperationalError, sa.exc.InterfaceError)


class WorkerProcess:
    """What one worker process keeps for its jobs."""

    def __init__(self, config: Config, sessions: sessionmaker[Session]) -> None:
        self.config = config
        self.sessions = sessions
        self.box = SecretBox(config.secret_keys)
        self.name = f"{os.uname().nodename}:{os.getpid()}"
        self._publisher: notify.Publisher | None = None
        self._pool: RunnerPool | None = None
        self.environments = Environments(config)
        self.bundles: dict[int, Any] = {}  # bundle pk -> BundleInfo (bundles never change)
        # project id -> its SQLite targets' real paths, in bind groups (jobs.run.sqlite_binds)
        self.sqlite_files: dict[int, Any] = {}
        # A warm shutdown (SIGTERM) lets running migrations go on until this
        # monotonic deadline, then stops them and hands their jobs over.
        self.shutdown_deadline: float | None = None
        self.wakers: set[threading.Event] = set()
        self._wakeups: Wakeups | None = None
        self._scheduler: Scheduler | None = None

    @property
    def sandbox(self) -> Probe:
        return probe(self.config.sandbox, self.config.bwrap_path)

    @property
    def pool(self) -> RunnerPool:
        if self._pool is None:
            self._pool = RunnerPool(self.config, self.sandbox)
        return self._pool

    def publisher(self) -> notify.Publisher:
        if self._publisher is None:
            self._publisher = notify.Publisher(self.config.broker_url, self.config.queue)
        return self._publisher

    @property
    def wakeups(self) -> Wakeups:
        if self._wakeups is None:
            self._wakeups = Wakeups(self.config.broker_url, self.config.queue)
        return self._wakeups

    @property
    def scheduler(self) -> Scheduler:
        """This process's thread for what follows a job, and for due wake-ups."""
        if self._scheduler is None:

            def act(member: str, sender: Dispatcher) -> None:
                kind, _, ident = member.partition(":")
                if kind == "job":
                    sender.send_job(int(ident))
                elif kind == "rollout":
                    drive(self.sessions, sender, self.wakeups, int(ident))

            self._scheduler = Scheduler(self.wakeups, act, self.config)
        return self._scheduler

    def request_shutdown(self, grace_s: float) -> None:
        """Called when this worker is shutting down (signal-safe)."""
        if self.shutdown_deadline is None:
            self.shutdown_deadline = time.monotonic() + grace_s
        for wake in list(self.wakers):
            wake.set()

    def close(self) -> None:
        if self._scheduler is not None:
            self._scheduler.drain(5.0)  # what follows the last job (the sweeper covers it else)
        if self._pool is not None:
            self._pool.close_all()
        self.environments.release_all()


@dataclass
class JobContext:
    """One job as the worker runs it."""

    job_id: int
    database_id: int
    database: str
    project: str
    project_id: int
    settings: dict[str, Any]
    process: WorkerProcess
    token: int = 0
    clock: LeaseClock = field(default_factory=LeaseClock)
    # For metrics.job_ended, from this worker's own writes (no query of its own):
    # the row as the start left it (created_at, started_at, lock_waited_ms), and
    # the final state this worker gave the job.
    start_row: sa.Row | None = None
    ended: str | None = None

    @property
    def config(self) -> Config:
        return self.process.config

    @property
    def sessions(self) -> sessionmaker[Session]:
        return self.process.sessions

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
            except STATE_DOWN as exc:
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
        self.process.publisher().publish(self.job_id)

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
        metrics.fenced_out_write()
        try:
            with transaction(self.sessions) as s:
                record_event(
                    s,
                    AuditAction.WRITE_FENCED_OUT,
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
