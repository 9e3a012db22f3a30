"""Drive one job through its runner: claim, lease, hand over the plan, record what comes back.

The worker is the trusted side. It decrypts the job's target URL, verifies the
bundle, takes the lease, and gives the runner only what this job needs; then
it records what the runner reports (fenced by the lease), and ends the job
when the runner finishes, fails, dies or runs past its time.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import update
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session

from service import targets
from service.audit.actions import AuditAction
from service.db import transaction, utcnow
from service.jobs.models import Job
from service.jobs.run import admission, endings, safety
from service.jobs.run import lease as leasing
from service.jobs.run.bundles import BundleInfo, discarded, verified_dir
from service.jobs.run.context import JobContext
from service.jobs.run.environments import EnvironmentFailed, EnvSpec, spec_for
from service.jobs.run.failure import JobFailure, exit_description, killed_by
from service.jobs.run.plan import check_checksums
from service.jobs.run.protocol import ChannelClosed, ProtocolError
from service.jobs.run.sandbox import (
    Probe,
    RunnerProcess,
    RunnerSpec,
    SandboxUnavailable,
    resolve,
)
from service.jobs.run.sqlite_binds import project_files
from service.jobs.run.steps import (
    STEP_FLUSH_S,
    BadReport,
    StepRecorder,
    checked_error,
    checked_heads,
)
from service.jobs.run.target_files import (
    CommitHold,
    SqliteLock,
    is_wal,
    prepare_for_sandbox,
    sqlite_path,
)
from service.jobs.run.transitions import (
    JOB_STATE,
    Started,
    claim_stmt,
    refuse_unclaimed,
    resolve_target,
    start_job,
)
from service.jobs.states import JobState
from service.locks import ops as leases
from service.locks.ops import FencedOutError

log = logging.getLogger("retort.worker")

# Audit events a runner may report about its own job.
_RUNNER_EVENTS = (
    AuditAction.TARGET_CONNECT_RETRY,
    AuditAction.TARGET_CONNECTION_LOST,
    AuditAction.TARGET_RECONNECTED,
)


# The early way (see _open_early) gives up after this long: a revision that
# takes its time loading then runs the ordinary way, under its full limit.
EARLY_LIMIT_S = 30.0
# When the heartbeat stops a job, it waits this long for the job's own thread
# before it kills the runner (see JobRun._stop).
STOP_GRACE_S = 1.0


class _NotEarly(Exception):
    """The runner could not open and lock the target at once: take the ordinary way."""


class RunnerGone(Exception):
    """The runner's channel closed (it died, was killed, or broke the protocol)."""


@dataclass
class Plan:
    """What the job is asked to do, as read from its row."""

    action: str
    target: str
    attempt: int
    previously_started: bool
    from_heads: list[str] | None
    bundle: BundleInfo
    url_encrypted: str
    secret_env: dict[str, str]  # name -> Fernet token (the project's secret variables)
    kind: str = "migrate"  # "migrate", "plan" (a dry run) or "drift"
    options: dict[str, Any] = field(default_factory=dict)  # plan_mode, allow
    approval: dict[str, Any] | None = None
    requested_by: str = ""
    tags: dict[str, str] = field(default_factory=dict)  # the database's
    drifted: bool = False  # the database's newest drift check found differences
    # Parked before (see admission): why, on which job, since when.
    waiting_for: str | None = None
    waiting_on: int | None = None
    waiting_since: dt.datetime | None = None
    rollout_id: int | None = None


class JobRun:
    """One job on this worker, from the claim to its end."""

    def __init__(self, ctx: JobContext, plan: Plan) -> None:
        self.ctx, self.plan = ctx, plan
        self.config = ctx.config
        self.runner: RunnerProcess | None = None
        self.sandbox: Probe | None = None
        self.url: URL | None = None
        self.sqlite_lock: SqliteLock | None = None
        self.recorder: StepRecorder | None = None
        self.started: Started | None = None
        self.locked: dict[str, Any] | None = None  # the runner's `locked` report
        self.stopping = False  # the heartbeat stopped the runner (lease lost, shutdown)
        self.file_lock_waited_ms = 0  # waiting for a SQLite target's lock (the worker's)
        self.deadline: float | None = None  # CLOCK_MONOTONIC: when the runner's time is up
        self.driven = threading.Event()  # the job's own thread is done with the runner
        self.env: EnvSpec | None = None  # the project's environment, None: the worker's
        self.env_python: str | None = None

    # ---------------------------------------------------------------- entry
    def run(self) -> str:
        try:
            return self._run()
        finally:
            if self.runner is not None:
                self.runner.kill()
                self.runner = None
            if self.sqlite_lock is not None:
                self.sqlite_lock.release()

    def _run(self) -> str:
        ctx, plan, worker = self.ctx, self.plan, self.ctx.process.name
        try:
            self.sandbox = resolve(self.config)
            self.url = targets.normalize_url(ctx.process.box.decrypt(plan.url_encrypted))
            self._environment()
        except (SandboxUnavailable, EnvironmentFailed) as exc:
            code = (
                "sandbox_unavailable"
                if isinstance(exc, SandboxUnavailable)
                else ("environment_failed")
            )
            with transaction(ctx.sessions) as s:
                refused = refuse_unclaimed(s, ctx, worker, code, str(exc))
            if refused:
                ctx.published()
            log.error("job %s: %s: %s", ctx.job_id, code, exc)
            return "not_claimed"
        early = plan.attempt == 1 and self._open_early()
        state = granted = False
        wake_at: float | None = None
        try:
            with transaction(ctx.sessions) as s:
                conn = s.connection()
                params = {"job_id": ctx.job_id, "v_worker": worker, "ttl": self.config.lease_ttl_s}
                if not conn.execute(claim_stmt(conn.dialect.name), params).rowcount:
                    state = conn.execute(JOB_STATE, {"job_id": ctx.job_id}).scalar() or "missing"
                else:
                    granted, wake_at = self._admit(s, worker)
                    if granted and early:
                        self.started = self._start(s)
        finally:
            if early and self.started is None:
                # Not started by the claim: let the target's lock go before
                # waiting for the lease (the lease is always taken first).
                self._abort()
                if self.sqlite_lock is not None:
                    self.sqlite_lock.release()
                    self.sqlite_lock = None
        if state:
            log.info("job %s not claimed (state %s)", ctx.job_id, state)
            return "not_claimed"
        if not granted:
            # Parked (or failed by its wait's timeout): the slot is free for the next job.
            ctx.published()
            if wake_at is None:
                return "not_started"
            ctx.process.wakeups.at(f"job:{ctx.job_id}", wake_at)
            return "parked"
        if self.started is not None:
            ctx.published()
        beat = leasing.Beat(ctx, self._stop)
        lost = False
        try:
            self._drive()
        except RunnerGone as exc:
            lost = True
            gone = str(exc)
        except FencedOutError as exc:
            log.error("job %s: %s; leaving its state to the new holder", ctx.job_id, exc)
        except Exception as exc:  # noqa: BLE001 - any other error ends the job with its reason
            log.exception("job %s failed unexpectedly", ctx.job_id)
            if self.runner is not None:
                self._kill("internal error")
            message = targets.scrub(f"{type(exc).__name__}: {exc}", self.url)
            self._fail({"code": "internal_error", "message": message})
        finally:
            self.driven.set()
            beat.end()
        if beat.lost.is_set() or beat.stopped.is_set():
            endings.hand_over_stopped(ctx, beat.stopped.is_set())
        elif lost:
            self._crashed(gone)
        return "done"

    def _admit(self, s: Session, worker: str) -> tuple[bool, float | None]:
        """In the claim's transaction: take the lease, or park the job (see admission).

        Returns (granted, when to wake the parked job); (False, None) when its
        wait for the lease timed out and it failed.
        """
        ctx, plan = self.ctx, self.plan
        before = (plan.waiting_for, plan.waiting_on)
        if admission.project_full(s, ctx):
            wake = admission.park(s, ctx, admission.PROJECT_SLOT, None, before, plan.waiting_since)
            return False, wake
        waited = admission.waited_ms(plan.waiting_since)
        if leasing.try_lease(s, ctx, worker, waited, plan.attempt) is True:
            return True, None
        holder, expires_at = leases.holder_locked(s, ctx.database_id)
        if holder is None and leasing.try_lease(s, ctx, worker, waited, plan.attempt) is True:
            return True, None  # released between the two looks
        if admission.timed_out(plan.waiting_since, self.config.lock_wait_timeout_s):
            endings.fail_lock_timeout(s, ctx, holder)
            return False, None
        timeout_at = admission.park(s, ctx, admission.LEASE, holder, before, plan.waiting_since)
        return False, admission.lease_wake_at(expires_at, timeout_at)

    # -------------------------------------------------------- environments
    def _environment(self) -> None:
        """Find (or build, on this machine's first such job) the project's environment."""
        ctx, info = self.ctx, self.plan.bundle
        bundled = None
        if "requirements.txt" in info.files and not ctx.settings.get("requirements"):
            bundled = (verified_dir(ctx, info) / "requirements.txt").read_text(errors="replace")
        self.env = spec_for(ctx.settings, bundled)
        if self.env is None:
            return
        spec = self.env

        def on_build(state: str, detail: dict[str, Any]) -> None:
            # The job says so while it waits (its runtime and an audit event).
            runtime = {"environment": spec.key, "state": state, **detail}
            # The job is still queued while its environment builds: marked handed
            # over until the build's time is up, so the sweeper does not send it
            # again to another worker that would only wait for the same build.
            until = utcnow() + dt.timedelta(
                seconds=self.config.env_build_timeout_s if state == "building" else 0
            )
            with transaction(ctx.sessions) as s:
                s.execute(
                    update(Job)
                    .where(Job.id == ctx.job_id, Job.state == JobState.QUEUED)
                    .values(runtime=runtime, dispatched_at=until)
                )
                ctx.audit(
                    s, AuditAction(f"environment.{state}"), {"environment": spec.key, **detail}
                )
            ctx.published()

        self.env_python = str(ctx.process.environments.ensure(spec, on_build))

    # ------------------------------------------------------------- runners
    def _spec(self, ahead: bool = False) -> RunnerSpec | None:
        """The runner this job needs; `ahead`: the one its rollout's next group of SQLite
        files will need (None if there is none)."""
        info = self.plan.bundle
        files: frozenset[str] = frozenset()
        group = None
        if self.sandbox is not None and self.sandbox.mode == "bwrap" and self._is_sqlite():
            mine = sqlite_path(self.url.database)
            found = project_files(self.ctx, mine)
            group, files = found.group(mine)
            if ahead:
                following = found.after(group)
                if following is None:
                    return None
                group, files = following
        elif ahead:
            return None
        return RunnerSpec(
            project_id=info.project_id,
            helpers_digest=info.digest if info.helpers else None,
            sqlite_files=files,
            bind_group=group,
            env_key=self.env.key if self.env else None,
            env_python=self.env_python,
        )

    def _is_sqlite(self) -> bool:
        return self.url is not None and targets.dialect_of(self.url) == "sqlite"

    def _take_runner(self, spec: RunnerSpec | None = None) -> RunnerProcess:
        if self.runner is None:
            info = self.plan.bundle
            try:
                mine = [sqlite_path(self.url.database)] if self._is_sqlite() else []
                pool = self.ctx.process.pool
                self.runner = pool.take(spec or self._spec(), mine)
                if self.plan.rollout_id is not None and (following := self._spec(ahead=True)):
                    pool.prepare(following)  # ready when the rollout reaches those files
                # Verified before every use: the runner's own copy if it has one
                # (a warm runner), else the cache's, then linked for it.
                staged, problem = self.runner.staged(info.digest, info.files)
                if problem is not None:
                    discarded(self.ctx, info, f"the runner's copy: {problem}")
                if staged is None:
                    verified = verified_dir(self.ctx, info)
                    staged = self.runner.stage(verified, info.digest, info.files)
                self.bundle_dir = staged
            except (ChannelClosed, OSError) as exc:
                raise JobFailure(
                    "runner_crashed", f"the sandboxed runner could not be started: {exc}"
                ) from None
        return self.runner

    def _job_message(self, early: bool) -> dict[str, Any]:
        plan, config, info = self.plan, self.config, self.plan.bundle
        settings = self.ctx.settings
        assert self.url is not None and self.sandbox is not None
        url = self.url
        if self._is_sqlite():  # the path the sandbox binds (links resolved)
            url = url.set(database=sqlite_path(url.database))
        return {
            "type": "job",
            "job": {
                "url": url.render_as_string(hide_password=False),
                "settings": settings,
                "action": plan.action,
                "target": plan.target,
                "attempt": plan.attempt,
                "previously_started": plan.previously_started,
                "from_heads": plan.from_heads,
                "early": early,
                "bundle": {
                    "dir": str(self.bundle_dir),
                    "digest": info.digest,
                    "versions_path": info.versions_path,
                    "helpers": info.helpers,
                    "python_path": list(info.python_path),
                },
                "connect": {
                    "attempts": config.connect_attempts,
                    "backoff_s": config.connect_backoff_s,
                    "timeout_s": config.connect_timeout_s,
                },
                "lock_wait_timeout_s": config.lock_wait_timeout_s,
                "kind": plan.kind,
                "lint": plan.kind == "migrate"
                and plan.action == "upgrade"
                and safety.lint_settings(settings).get("enabled", True),
                "plan_mode": plan.options.get("plan_mode"),
                "plan_lock_timeout_ms": config.plan_lock_timeout_ms,
                "lint_render_timeout_s": config.lint_render_timeout_s,
                # Only a drift check gets the scratch server (where it builds the schema).
                "drift_scratch_url": config.drift_scratch_url(targets.dialect_of(url))
                if plan.kind == "drift"
                else None,
                # The project's variables for its revisions, its secrets decrypted
                # for this runner only (settings.env and secret_env).
                "env": self._job_env(),
                "memory_mb": config.runner_memory_mb,
                "sqlite_journal": "truncate"
                if self.sandbox.mode == "bwrap" and self._is_sqlite()
                else None,
            },
        }

    def _job_env(self) -> dict[str, str]:
        env = dict(self.ctx.settings.get("env") or {})
        box = self.ctx.process.box
        for name, token in self.plan.secret_env.items():
            env[name] = box.decrypt(token)
        return env

    def _recv(self, timeout: float | None) -> dict[str, Any] | None:
        assert self.runner is not None
        try:
            return self.runner.recv(timeout)
        except (ChannelClosed, ProtocolError) as exc:
            raise RunnerGone(str(exc)) from None

    def _send(self, message: dict[str, Any]) -> None:
        assert self.runner is not None
        try:
            self.runner.send(message)
        except ChannelClosed as exc:
            raise RunnerGone(str(exc)) from None

    def _give_back(self) -> None:
        """The runner ended its job: keep it warm once it says it is idle."""
        runner, self.runner = self.runner, None
        if runner is None:
            return
        try:
            while True:
                message = runner.recv(10)
                if message is None:
                    raise ChannelClosed("no idle report")
                if message.get("type") == "idle":
                    rss = message.get("rss_kb")
                    self.ctx.process.pool.give_back(runner, rss if isinstance(rss, int) else 0)
                    return
        except (ChannelClosed, ProtocolError):
            runner.kill()

    def _abort(self) -> None:
        """Tell a runner holding the target's lock that the job ends here."""
        if self.runner is None:
            return
        try:
            self.runner.send({"type": "abort"})
            while True:
                message = self.runner.recv(10)
                if message is None or message.get("type") == "aborted":
                    break
        except (ChannelClosed, ProtocolError):
            self.runner.kill()
            self.runner = None
            return
        self._give_back()

    def _hand_over(self, early: bool) -> dict[str, Any]:
        """Give the runner its job; return its `locked` report.

        A SQLite target under bwrap: its journal is made again if another program
        deleted it, then commits are held off (CommitHold) while a runner whose
        bound files are the files at their paths (RunnerProcess.binds_current)
        takes the database's lock for the job.
        """
        hold, spec = None, None
        if self._is_sqlite() and self.sandbox is not None and self.sandbox.mode == "bwrap":
            prepare_for_sandbox(self.url.database)
            spec = self._spec()  # reads (and prepares) the project's files before the hold
            if not is_wal(self.url.database):
                hold = CommitHold(self.url.database, self.config.lock_wait_timeout_s)
        try:
            self._take_runner(spec)
            self._send(self._job_message(early=early))
            return self._until_locked()
        finally:
            if hold is not None:
                hold.release()

    def _until_locked(self) -> dict[str, Any]:
        """Read the runner's reports up to `locked`; raise JobFailure if it failed first."""
        while True:
            message = self._recv(self._time_left())
            if message is None:
                self._kill("timeout")
                raise JobFailure("timeout", self._timeout_message())
            kind = message.get("type")
            if kind == "locked":
                return message
            if kind == "event":
                self._audit_event(message)
            elif kind in ("failed", "not_early"):
                self._give_back()
                if kind == "not_early":
                    raise _NotEarly()
                raise JobFailure(**checked_error(message.get("error"), self.url))
            else:
                raise RunnerGone(f"unexpected report {kind!r} before the lock")

    def _open_early(self) -> bool:
        """Open the target, take its lock and read its heads, before the claim.

        Then one transaction claims the job, takes the lease and starts the job
        (and ends it, already at its target): the usual job costs Retort's
        database one transaction less, and starts sooner. Only a first attempt,
        with one connect attempt and no wait for the lock: anything else (the
        target slow to answer, its lock held, an error) and the job takes the
        ordinary way, lease first, which retries, waits and reports.
        """
        try:
            if self._is_sqlite():
                self.sqlite_lock = SqliteLock(self.config.data_dir, self.url.database)
                if not self.sqlite_lock.try_take():
                    self.sqlite_lock.release()
                    self.sqlite_lock = None
                    return False
            self.deadline = time.monotonic() + min(EARLY_LIMIT_S, self._max_duration())
            self.locked = self._hand_over(early=True)
            return True
        except (_NotEarly, JobFailure, RunnerGone, OSError) as exc:
            if isinstance(exc, RunnerGone) and self.runner is not None:
                self.runner.kill()
                self.runner = None
            if self.sqlite_lock is not None:
                self.sqlite_lock.release()
                self.sqlite_lock = None
            self.locked = None
            return False

    # ---------------------------------------------------------------- start
    def _start(self, s: Session) -> Started | None:
        assert self.locked is not None and self.sandbox is not None
        heads = checked_heads(self.locked.get("heads"))
        waited = self.locked.get("waited_ms")
        if not isinstance(waited, int) or waited < 0:
            waited = 0
        waited += self.file_lock_waited_ms
        return start_job(
            s,
            self.ctx,
            attempt=self.plan.attempt,
            previously_started=self.plan.previously_started,
            from_heads_known=self.plan.from_heads is not None,
            heads=heads,
            waited_ms=waited,
            noop=self.locked.get("noop") is True,
            shas=self.plan.bundle.sha_by_revision,
            sandbox=self.sandbox.mode,
            runtime=self._runtime(),
        )

    def _expected(self, kind: Any, linted: bool, recorder: StepRecorder) -> bool:
        """Whether a runner's report fits this job's kind and where it is (the runner
        runs the project's code: its word on what it did is checked, never trusted)."""
        plan = self.plan
        if kind in ("event", "failed", "stopped"):
            return True
        if kind == "planned":
            return plan.kind == "plan"
        if kind == "drifted":
            return plan.kind == "drift"
        if kind == "linted":
            return (
                plan.kind == "migrate"
                and plan.action == "upgrade"
                and not linted
                and not recorder.applied
                and not recorder.pending
            )
        return plan.kind == "migrate"  # step, resolved, done, and anything unknown

    def _linted(self, report: Any) -> bool:
        """Judge the runner's lint report; park the job if it blocks. True: parked."""
        plan, ctx = self.plan, self.ctx
        verdict = safety.judge(
            report,
            ctx.settings,
            plan.tags,
            safety.allowed_codes(plan.options, plan.approval),
            drifted=plan.drifted,
        )
        if verdict.blocking:
            parked = ctx.write(lambda s: safety.park(s, ctx, verdict))
            self._send({"type": "stop"})
            self._give_back()
            if parked:
                ctx.published()
            return True
        if not verdict.empty:
            ctx.write(lambda s: safety.record(s, ctx, verdict, plan.requested_by))
        self._send({"type": "go", "fence_until": self._fence_until()})
        return False

    def _runtime(self) -> dict[str, Any] | None:
        """What runs the revisions: the environment and its versions (the runner says)."""
        if self.runner is None:
            return None
        versions = self.runner.versions
        return {
            "environment": self.env.key if self.env else None,
            "python": versions.get("python"),
            "sqlalchemy": versions.get("sqlalchemy"),
            "alembic": versions.get("alembic"),
        }

    def _max_duration(self) -> float:
        value = self.ctx.settings.get("max_duration_s")
        return float(value) if value else self.config.job_max_duration_s

    def _time_left(self) -> float | None:
        return None if self.deadline is None else max(self.deadline - time.monotonic(), 0)

    def _timeout_message(self) -> str:
        return (
            f"the migration ran longer than its limit of {self._max_duration():.0f} s "
            "(project setting max_duration_s); it was stopped and its running step rolled "
            "back: the database is at the last revision the job's steps show as applied"
        )

    # ---------------------------------------------------------------- drive
    def _drive(self) -> None:
        """Run the job with the lease held; raise RunnerGone if the runner goes away."""
        ctx, plan = self.ctx, self.plan
        self.deadline = time.monotonic() + self._max_duration()
        shas = plan.bundle.sha_by_revision
        self.recorder = StepRecorder(ctx, shas, self.url)
        try:
            if self.started is None:
                if self._is_sqlite() and self.sqlite_lock is None:
                    lock = SqliteLock(self.config.data_dir, self.url.database)
                    self.sqlite_lock = lock
                    self.file_lock_waited_ms = lock.take(self.config.lock_wait_timeout_s)
                self.locked = self._hand_over(early=False)
                self.started = ctx.write(self._start)
                if self.started is None:
                    self._abort()
                    return  # cancelled while waiting: nothing was touched
            if self.started.ended:
                self._abort()
                return
            heads = checked_heads(self.locked.get("heads"))
            lost = self.locked.get("lost_steps")
            if plan.attempt > 1 and plan.action == "upgrade" and plan.from_heads is not None:
                endings.record_lost_steps(ctx, shas, lost if isinstance(lost, list) else [])
            check_checksums(shas, self.started.applied, heads)
        except JobFailure as exc:
            if self.runner is not None and self.locked is not None:
                self._abort()
            self._fail(exc.error)
            return
        self._send({"type": "go", "fence_until": self._fence_until()})
        self._follow(heads)

    def _follow(self, from_heads: list[str]) -> None:
        """Record the runner's reports until the job ends."""
        recorder, ctx, plan = self.recorder, self.ctx, self.plan
        assert recorder is not None
        fenced = linted = False
        while True:
            left = self._time_left()
            timeout = min(left, STEP_FLUSH_S) if recorder.pending else left
            message = self._recv(timeout)
            if message is None:
                if self._time_left() == 0:
                    self._kill("timeout")
                    self._fail({"code": "timeout", "message": self._timeout_message()})
                    return
                if recorder.due():
                    self._flush_or_stop()
                continue
            kind = message.get("type")
            if not self._expected(kind, linted, recorder):
                self._kill("bad report")
                self._fail(
                    {"code": "runner_protocol", "message": f"unexpected report {kind!r} here"}
                )
                return
            if kind == "linted":
                linted = True
            if kind == "step":
                ask = message.get("ask") is True
                try:
                    if fenced:
                        raise FencedOutError("fenced out", ctx.token, 0, None)
                    recorder.on_step(message, check=ask)
                    if ask:
                        self._send({"type": "ok", "fence_until": self._fence_until()})
                except FencedOutError:
                    fenced = True
                    if ask:
                        self._send({"type": "stop"})
                except BadReport as exc:
                    self._kill("bad report")
                    self._fail({"code": "runner_protocol", "message": f"the runner {exc}"})
                    return
            elif kind == "resolved":
                target = message.get("target")
                if isinstance(target, str) and (
                    target == "base" or target in recorder.sha_by_revision
                ):
                    try:
                        ctx.write(lambda s, t=target: resolve_target(s, ctx, t))
                    except FencedOutError:
                        fenced = True
            elif kind == "event":
                self._audit_event(message)
            elif kind == "linted":
                try:
                    if self._linted(message.get("lint")):
                        return
                except FencedOutError:
                    fenced = True
                    self._send({"type": "stop"})
            elif kind in ("planned", "drifted"):
                self._give_back()
                if not fenced:
                    result = message.get("plan" if kind == "planned" else "drift")
                    endings.succeed_with_result(ctx, plan, from_heads, result, self.url)
                return
            elif kind == "done":
                self._give_back()
                if not fenced:
                    origin = plan.from_heads if plan.from_heads is not None else from_heads
                    endings.succeed(ctx, recorder, origin, checked_heads(message.get("to_heads")))
                return
            elif kind == "failed":
                self._give_back()
                if not fenced:
                    endings.record_failure(
                        ctx, recorder, self.url, message.get("error"), self._mode()
                    )
                return
            elif kind == "stopped":
                self._give_back()
                log.error("job %s: fenced out; its runner stopped and rolled back", ctx.job_id)
                return
            else:
                self._kill("bad report")
                self._fail({"code": "runner_protocol", "message": f"unexpected report {kind!r}"})
                return

    def _fence_until(self) -> float:
        """Until when the runner may commit steps without asking (a little before the clock's
        own bound, for the moment between its check and its commit)."""
        if self.stopping:
            return 0.0
        return self.ctx.clock.surely_until(self.config.lease_ttl_s) - 1.0

    def _flush_or_stop(self) -> None:
        try:
            self.recorder.flush()
        except FencedOutError:
            log.error("job %s: fenced out while writing steps", self.ctx.job_id)

    def _audit_event(self, message: dict[str, Any]) -> None:
        name, data = message.get("name"), message.get("data")
        if name not in _RUNNER_EVENTS or not isinstance(data, dict):
            return
        data = {
            str(k)[:64]: targets.scrub(v, self.url)[:2000] if isinstance(v, str) else v
            for k, v in list(data.items())[:10]
            if isinstance(v, (str, int, float, bool, type(None), list))
        }
        self.ctx.run(lambda s: self.ctx.audit(s, name, data))

    # ------------------------------------------------------------- endings
    def _mode(self) -> str | None:
        return self.sandbox.mode if self.sandbox is not None else None

    def _fail(self, error: dict[str, Any]) -> None:
        endings.fail(self.ctx, self.recorder, self.url, error, self._mode())

    def _crashed(self, why: str) -> None:
        """The runner died on its own (not stopped by this worker): fail the job, say how."""
        code = None
        if self.runner is not None:
            try:
                code = self.runner.proc.wait(timeout=5)
            except Exception:  # noqa: BLE001
                code = None
        how = exit_description(code)
        if killed_by(code) == 9:
            how += " (by the kernel's out-of-memory killer, if not by hand)"
        if not endings.is_final(self.ctx):
            message = f"the runner running this job's revisions ended unexpectedly: {how}"
            self._fail({"code": "runner_crashed", "message": message, "exit_code": code})

    # ---------------------------------------------------------------- stops
    def _stop(self) -> None:
        """From the heartbeat thread: stop the runner (the target rolls its step back).

        First a moment for this job's own thread: a step already waiting for
        the fence's answer is refused there (and audited as the refused
        step), and the runner rolls it back itself. A runner busy in a
        statement or in the revision's own code is killed after it.
        """
        self.stopping = True
        self.ctx.clock.forget()
        if self.driven.wait(STOP_GRACE_S):
            return
        runner = self.runner
        if runner is not None:
            runner.signal_kill()
        self._end_backend()

    def _kill(self, why: str) -> None:
        log.warning("job %s: killing its runner (%s)", self.ctx.job_id, why)
        if self.runner is not None:
            self.runner.kill()
            self.runner = None
        self._end_backend()

    def _end_backend(self) -> None:
        """End the target session the runner used, so its locks go at once."""
        backend = (self.locked or {}).get("backend")
        if self.url is None or not isinstance(backend, int) or isinstance(backend, bool):
            return
        try:
            targets.end_session(self.url, backend, self.config.connect_timeout_s)
        except Exception as exc:  # noqa: BLE001 - closing the socket ends it a little later
            log.warning("job %s: could not end the target session: %s", self.ctx.job_id, exc)
