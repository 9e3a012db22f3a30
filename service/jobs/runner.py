"""Run one migration job: claim, lease, fork, lock the target, apply, record.

The worker's pool process claims the job, takes the lease and keeps it alive
with a heartbeat; the migration itself runs in a child forked for this job
alone, so no project's helper modules are ever seen by another project's job.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
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
from sqlalchemy import delete, select, update
from sqlalchemy.engine import URL, Connection
from sqlalchemy.orm import Session, sessionmaker

from service import targets
from service.audit.ops import record_event
from service.bundles.models import Bundle
from service.bundles.ops import bundle_files
from service.config import Config
from service.crypto import SecretBox
from service.databases.models import AppliedRevision, Database
from service.db import make_engine, make_sessionmaker, transaction, utcnow
from service.jobs.models import FINAL_STATES, Job, JobStep
from service.locks import ops as leases
from service.locks.ops import FencedOutError
from service.projects.models import Project
from service.webhooks import outbox

log = logging.getLogger("retort.worker")
_RELATIVE = re.compile(r"^[+-]\d+$")
_DDL = re.compile(r"^\s*(CREATE|ALTER|DROP|RENAME|TRUNCATE)\b", re.IGNORECASE)


class JobFailure(Exception):
    """A job ends as failed with this error document."""

    def __init__(self, code: str, message: str, **extra: Any):
        super().__init__(message)
        self.error = {"code": code, "message": message, "revision": None, "statement": None}
        self.error.update(extra)


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

    def write(self, fn, *, event: str | None = None, data: dict | None = None) -> Any:
        """Run fn(session) in a transaction fenced by this job's token, with an audit event."""
        with transaction(self.sessions) as s:
            leases.check_fence(s, self.database_id, self.token)
            result = fn(s)
            if event:
                self.audit(s, event, data)
            return result

    def finish(self, s: Session, values: dict[str, Any], event: str, data: dict) -> None:
        """End the job and release its lease in one transaction (already fenced)."""
        count = s.execute(
            update(Job)
            .where(Job.id == self.job_id, Job.state.in_(("waiting_for_lock", "running")))
            .values(finished_at=utcnow(), **values)
        ).rowcount
        if count:
            self.audit(s, event, data)
        if leases.release(s, self.database_id, self.token):
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


def run_job(config: Config, sessions: sessionmaker[Session], job_id: int) -> str:
    """Run a job to its end; a second delivery of the same job does nothing."""
    worker = f"{os.uname().nodename}:{os.getpid()}"
    with transaction(sessions) as s:
        claimed = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == "queued")
            .values(state="waiting_for_lock", worker=worker)
        ).rowcount
        if not claimed:
            job = s.get(Job, job_id)
            log.info("job %s not claimed (state %s)", job_id, job.state if job else "missing")
            return "not_claimed"
        job = s.get(Job, job_id)
        db = s.get(Database, job.database_id)
        project = s.get(Project, job.project_id)
        record_event(
            s,
            "job.claimed",
            actor="worker",
            project=project.name,
            database=db.name,
            job_id=job_id,
            data={"worker": worker},
        )
        database_id, db_name, project_name = db.id, db.name, project.name

    ctx = JobContext(
        job_id, database_id, db_name, project_name, project.settings, 0, sessions, config
    )
    if not _acquire_lease(ctx, worker):
        return "not_started"

    pid = os.fork()
    if pid == 0:  # the child: run the migration, never return into Celery
        code = 0
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            _die_with_parent()
            _run_in_child(ctx)
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

    lost = threading.Event()
    done = threading.Event()
    beat = threading.Thread(
        target=_heartbeat, args=(ctx, pid, lost, done), name=f"lease-{job_id}", daemon=True
    )
    beat.start()
    status = None
    try:
        _, status = os.waitpid(pid, 0)
    finally:
        done.set()
        if status is None:  # interrupted (time limit, shutdown): never orphan the child
            _kill(pid)
            _, status = os.waitpid(pid, 0)
        beat.join()
        _finalize(ctx, os.waitstatus_to_exitcode(status), lost.is_set())
    return "done"


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


def _acquire_lease(ctx: JobContext, worker: str) -> bool:
    """Wait for the lease; on the grant, record the token on the job in the same transaction."""
    config, job_id = ctx.config, ctx.job_id
    started = time.monotonic()
    delay = 0.02
    announced_holder = None
    while True:
        with transaction(ctx.sessions) as s:
            state = s.scalar(select(Job.state).where(Job.id == job_id))
            if state != "waiting_for_lock":
                log.info("job %s left waiting_for_lock (%s) before it got the lease", job_id, state)
                return False
            token, holder = leases.try_acquire(
                s, ctx.database_id, job_id, worker, config.lease_ttl_s
            )
            if token is not None:
                waited_ms = int((time.monotonic() - started) * 1000)
                s.execute(
                    update(Job)
                    .where(Job.id == job_id)
                    .values(waiting_on_job_id=None, fencing_token=token, lock_waited_ms=waited_ms)
                )
                ctx.token = token
                ctx.audit(s, "lease.granted", {"waited_ms": waited_ms, "ttl_s": config.lease_ttl_s})
                return True
            if holder != announced_holder:
                s.execute(update(Job).where(Job.id == job_id).values(waiting_on_job_id=holder))
                announced_holder = holder
        if time.monotonic() - started > config.lock_wait_timeout_s:
            with transaction(ctx.sessions) as s:
                failed = s.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.state == "waiting_for_lock")
                    .values(
                        state="failed",
                        finished_at=utcnow(),
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


def _heartbeat(ctx: JobContext, pid: int, lost: threading.Event, done: threading.Event) -> None:
    """Renew the lease; stop the migration once the lease is lost or cannot be renewed."""
    ttl = ctx.config.lease_ttl_s
    last_ok = time.monotonic()
    while not done.wait(ttl / 3):
        try:
            with transaction(ctx.sessions) as s:
                ok = leases.renew(s, ctx.database_id, ctx.token, ttl)
        except Exception:  # noqa: BLE001 - state DB blip: try again until the TTL is spent
            log.exception("job %s: lease renewal failed", ctx.job_id)
            if time.monotonic() - last_ok < ttl * 0.9:
                continue
            ok = False
        if ok:
            last_ok = time.monotonic()
            continue
        # Lost, taken over, or past its TTL: another job may already hold the
        # database, so this migration must not go on. A job that already ended
        # released the lease itself; its child is only closing connections.
        _kill(pid)
        try:
            with transaction(ctx.sessions) as s:
                state = s.scalar(select(Job.state).where(Job.id == ctx.job_id))
        except Exception:  # noqa: BLE001
            state = None
        if state not in ("succeeded", "failed", "cancelled"):
            log.error(
                "job %s lost its lease (token %s); stopped its migration", ctx.job_id, ctx.token
            )
            lost.set()
        return


def _finalize(ctx: JobContext, exit_code: int, lost: bool) -> None:
    """After the child: fail a job the child could not finish, release the lease."""
    code = "lease_lost" if lost else "worker_crashed"
    message = (
        "the job lost its lease (its heartbeat could not renew it) and was stopped"
        if lost
        else f"the migration process ended unexpectedly (exit code {exit_code})"
    )
    error = {"code": code, "message": message, "revision": None, "statement": None}
    with transaction(ctx.sessions) as s:
        if s.scalar(select(Job.state).where(Job.id == ctx.job_id)) in FINAL_STATES:
            return  # the child ended the job and released the lease itself
    try:
        ctx.write(
            lambda s: ctx.finish(
                s,
                {"state": "failed", "error": error},
                "job.failed",
                {"code": code, "exit_code": exit_code},
            )
        )
    except FencedOutError:
        log.warning("job %s: fenced out, leaving its state to the new holder", ctx.job_id)


# --------------------------------------------------------------------------
# In the forked child: the migration itself.
# --------------------------------------------------------------------------


def _run_in_child(parent_ctx: JobContext) -> None:
    config = parent_ctx.config
    # Never touch the parent's pooled connections: a new engine for this process.
    sessions = make_sessionmaker(make_engine(config.database_url, pooled=False))
    outbox.attach(sessions, config, background=True)
    ctx = JobContext(**{**parent_ctx.__dict__, "sessions": sessions})
    url: URL | None = None
    try:
        with transaction(sessions) as s:
            job = s.get(Job, ctx.job_id)
            db = s.get(Database, ctx.database_id)
            bundle = s.get(Bundle, job.bundle_pk)
            url = targets.normalize_url(SecretBox(config.secret_keys).decrypt(db.url_encrypted))
            action, target = job.action, job.target
            versions_path, revisions = bundle.versions_path, bundle.revisions
        bundle_dir = materialize_bundle(sessions, bundle, config.bundle_cache_dir)
        _migrate(ctx, url, action, target, bundle_dir, versions_path, revisions)
    except FencedOutError as exc:
        log.error("job %s: %s; its writes stop here", ctx.job_id, exc)
    except JobFailure as exc:
        _fail(ctx, exc.error, url)
    except Exception as exc:  # noqa: BLE001 - any other error ends the job with its reason
        message = targets.scrub(f"{type(exc).__name__}: {exc}", url)
        log.error("job %s failed unexpectedly: %s", ctx.job_id, message)
        _fail(
            ctx,
            {"code": "internal_error", "message": message, "revision": None, "statement": None},
            url,
        )


def _fail(ctx: JobContext, error: dict[str, Any], url: URL | None) -> None:
    error = {k: targets.scrub(v, url) if isinstance(v, str) else v for k, v in error.items()}

    def mark(s: Session):
        ctx.finish(s, {"state": "failed", "error": error}, "job.failed", {"error": error})

    try:
        ctx.write(mark)
    except FencedOutError as exc:
        log.error("job %s: %s; not recording its failure", ctx.job_id, exc)


def materialize_bundle(sessions: sessionmaker[Session], bundle: Bundle, cache_dir: Path) -> Path:
    """Write a bundle's files under the cache directory once (atomic rename)."""
    final = cache_dir / bundle.digest
    if final.is_dir():
        return final
    with transaction(sessions) as s:
        files = bundle_files(s, bundle)
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


@dataclass
class _StepRecorder:
    ctx: JobContext
    sha_by_revision: dict[str, str]
    url: URL
    statements: list[str] = field(default_factory=list)
    applied: int = 0
    boundary: float = 0.0
    boundary_at: Any = None

    def start(self) -> None:
        self.boundary = time.perf_counter()
        self.boundary_at = utcnow()

    def on_sql(self, conn, cursor, statement, parameters, context, executemany) -> None:
        text = statement.strip()
        if text == "BEGIN":  # the SQLite transactional recipe's own statement
            return
        if parameters:
            shown = json.dumps(parameters, default=str)
            text += f"  -- parameters: {shown[:500]}"
        self.statements.append(targets.scrub(text, self.url))

    def on_version_apply(self, ctx, step, heads, run_args) -> None:
        # Runs after the step's DDL and version-table update, before its COMMIT:
        # a fenced-out holder raises here and the step is rolled back.
        direction = "stamp" if step.is_stamp else ("up" if step.is_upgrade else "down")
        # up_revision_ids is the upper side of the step whatever its direction:
        # the revisions applied by an upgrade, unapplied by a downgrade.
        revisions = list(step.up_revision_ids)
        sql, self.statements = self.statements, []
        now = time.perf_counter()
        started_at, self.boundary_at = self.boundary_at, utcnow()
        duration = (now - self.boundary) * 1000
        self.boundary = now
        doc = step.up_revision.doc if step.up_revision is not None else None
        sha = self.sha_by_revision.get(revisions[0]) if revisions else None
        is_upgrade = step.is_upgrade

        def record(s: Session):
            s.add(
                JobStep(
                    job_id=self.ctx.job_id,
                    revisions=revisions,
                    direction=direction,
                    state="applied",
                    message=doc,
                    sql=sql,
                    sha256=sha,
                    fencing_token=self.ctx.token,
                    started_at=started_at,
                    finished_at=self.boundary_at,
                    duration_ms=duration,
                )
            )
            if not is_upgrade:
                s.execute(
                    delete(AppliedRevision).where(
                        AppliedRevision.database_id == self.ctx.database_id,
                        AppliedRevision.revision.in_(revisions),
                    )
                )
            else:
                for rev in revisions:
                    s.merge(
                        AppliedRevision(
                            database_id=self.ctx.database_id,
                            revision=rev,
                            sha256=self.sha_by_revision.get(rev, ""),
                            job_id=self.ctx.job_id,
                            applied_at=utcnow(),
                        )
                    )

        self.ctx.write(
            record,
            event="step.applied",
            data={
                "revisions": revisions,
                "direction": direction,
                "duration_ms": round(duration, 3),
                "statements": len(sql),
                "sha256": sha,
            },
        )
        self.applied += 1


def _connect(ctx: JobContext, url: URL) -> tuple[sa.Engine, Connection]:
    engine = targets.make_target_engine(url, ctx.config.connect_timeout_s, ctx.job_id)

    def on_retry(attempt: int, exc: Exception) -> None:
        reason = targets.scrub(_db_message(exc), url)
        with transaction(ctx.sessions) as s:
            ctx.audit(s, "target.connect_retry", {"attempt": attempt, "reason": reason})

    try:
        conn = targets.connect_with_retries(
            engine, ctx.config.connect_attempts, ctx.config.connect_backoff_s, on_retry
        )
    except sa.exc.OperationalError as exc:
        engine.dispose()
        raise JobFailure(
            "target_unreachable",
            f"cannot connect to {targets.mask_url(url)} after {ctx.config.connect_attempts} "
            f"attempts: {targets.scrub(_db_message(exc), url)}",
        ) from None
    return engine, conn


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


def _migrate(ctx, url, action, target, bundle_dir, versions_path, revisions) -> None:
    engine, conn = _connect(ctx, url)
    try:
        waited_ms = _take_session_lock(ctx, conn, url)

        def start(s: Session) -> int:
            count = s.execute(
                update(Job)
                .where(Job.id == ctx.job_id, Job.state == "waiting_for_lock")
                .values(
                    state="running",
                    started_at=utcnow(),
                    lock_waited_ms=Job.lock_waited_ms + waited_ms,
                )
            ).rowcount
            if count:
                ctx.audit(s, "job.started", {"target_lock_waited_ms": waited_ms})
            return count

        started = ctx.write(start)
        if not started:
            return  # cancelled while waiting: nothing was touched
        targets.apply_session_settings(conn, url, ctx.settings)
        from_heads = targets.read_heads(conn, ctx.settings)
        conn.commit()  # the autobegin trap: Alembic must start from no transaction
        ctx.write(
            lambda s: s.execute(
                update(Job).where(Job.id == ctx.job_id).values(from_heads=from_heads)
            )
        )
        sha_by_revision = {r["id"]: r["sha256"] for r in revisions}
        _check_checksums(ctx, sha_by_revision, from_heads)
        root = bundle_dir / versions_path.rpartition("/")[0] if "/" in versions_path else bundle_dir
        script = _load_scripts(root, bundle_dir / versions_path)
        recorder = _StepRecorder(ctx, sha_by_revision, url)
        _run_alembic(ctx, conn, url, script, action, target, recorder)
        to_heads = targets.read_heads(conn, ctx.settings)
        conn.commit()

        def succeed(s: Session):
            ctx.finish(
                s,
                {"state": "succeeded", "to_heads": to_heads},
                "job.succeeded",
                {"from_heads": from_heads, "to_heads": to_heads, "steps": recorder.applied},
            )

        ctx.write(succeed)
    finally:
        try:
            conn.rollback()
            targets.release_session_lock(conn, url, ctx.settings)
        except Exception:  # noqa: BLE001 - closing the session releases it anyway
            pass
        conn.close()
        engine.dispose()


def _check_checksums(ctx: JobContext, sha_by_revision: dict[str, str], current: list[str]):
    with transaction(ctx.sessions) as s:
        applied = dict(
            s.execute(
                select(AppliedRevision.revision, AppliedRevision.sha256).where(
                    AppliedRevision.database_id == ctx.database_id
                )
            )
            .tuples()
            .all()
        )
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


def _load_scripts(root: Path, versions_dir: Path) -> ScriptDirectory:
    # Helper modules beside versions/ are importable; this process is this job's alone.
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


def _run_alembic(ctx, conn, url, script, action, target, recorder: _StepRecorder) -> None:
    planned: list[Any] = []

    def plan(rev, _context):
        if _RELATIVE.match(target) and len(rev) > 1:
            raise JobFailure(
                "ambiguous_relative_target",
                f"relative target {target} is ambiguous: the database has {len(rev)} heads "
                f"({', '.join(sorted(rev))}); use a revision id or branch@{target}",
            )
        if action == "upgrade":
            steps = script._upgrade_revs(target, rev)
        elif action == "downgrade":
            steps = script._downgrade_revs(target, rev)
        else:
            steps = script._stamp_revs(tuple(target.split(",")), rev)
        planned.extend(steps)
        return steps

    settings = ctx.settings
    env = EnvironmentContext(
        AlembicConfig(),
        script,
        fn=plan,
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
    except (FencedOutError, JobFailure):
        raise
    except CommandError as exc:
        if not planned:
            raise JobFailure("invalid_target", f"cannot {action} to {target}: {exc}") from None
        raise _step_failure(ctx, conn, url, planned, recorder, exc) from None
    except Exception as exc:  # noqa: BLE001 - a revision raised
        if not planned:
            raise JobFailure(
                "migration_failed",
                f"Alembic failed before running any revision: {type(exc).__name__}: "
                f"{targets.scrub(_db_message(exc), url)}",
            ) from None
        raise _step_failure(ctx, conn, url, planned, recorder, exc) from None
    finally:
        sa.event.remove(conn, "before_cursor_execute", recorder.on_sql)


def _db_message(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return text or type(exc).__name__


def _step_failure(ctx, conn, url, planned, recorder: _StepRecorder, exc) -> JobFailure:
    """Record the failed step and describe what the database was left with."""
    failed = planned[recorder.applied] if recorder.applied < len(planned) else None
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
