"""In the runner: connect to the job's target, lock it, and apply the revisions with Alembic.

Runs inside the sandboxed runner process only. It knows its job's target URL
and bundle and nothing else; every outcome goes back to the worker over the
channel, which checks and records it. Imports nothing of Retort's state side.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic.config import Config as AlembicConfig
from alembic.runtime.environment import EnvironmentContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.engine import URL, Connection, make_url

from service import targets
from service.jobs.run import plan
from service.jobs.run.failure import (
    JobFailure,
    db_message,
    describe,
    load_failure,
    locate,
    partial_ddl,
)
from service.jobs.run.preflight import Preflight, drift
from service.jobs.run.protocol import Channel

# Target engines a runner keeps (one idle connection each) for its project's
# next jobs on the same database. Few: a fleet migrates each database once, and
# every kept connection counts against the target server's max_connections.
_MAX_ENGINES = 8
_MAX_SCRIPTS = 8


class Stopped(Exception):
    """The worker said stop (the job was fenced out or halted): roll the step back."""


class _TargetLost(Exception):
    """The connection to the target dropped in the middle of a migration step."""

    def __init__(self, revision: str | None, reason: str, partial: bool):
        super().__init__(reason)
        self.revision, self.reason, self.partial = revision, reason, partial


class Runner:
    """One runner process: its target engines and loaded scripts, kept for its next jobs."""

    def __init__(self, chan: Channel) -> None:
        self.chan = chan
        self._engines: OrderedDict[tuple, sa.Engine] = OrderedDict()
        # A SQLite engine's file as it last connected: (device, inode).
        self._files: dict[tuple, tuple[int, int] | None] = {}
        self._scripts: OrderedDict[str, ScriptDirectory] = OrderedDict()
        self.import_path = ImportPath()  # the running bundle's folders on sys.path
        self.preflight = Preflight()  # upgrades' renderings, for their lint
        self.conn: Connection | None = None  # the running job's target connection

    # ------------------------------------------------------------- messages
    def event(self, name: str, data: dict[str, Any]) -> None:
        self.chan.send({"type": "event", "name": name, "data": data})

    def ask(self, message: dict[str, Any]) -> dict[str, Any]:
        self.chan.send(message)
        return self.chan.recv()

    # ------------------------------------------------------------------ job
    def run_job(self, job: dict[str, Any]) -> None:
        """Run one job to its end, with the project's environment variables set."""
        env = job.get("env") or {}
        saved = {name: os.environ.get(name) for name in env}
        os.environ.update(env)
        try:
            self._run_job(job)
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    def _run_job(self, job: dict[str, Any]) -> None:
        """Run one job to its end, then send its outcome: exactly one of not_early,
        aborted, stopped, done or failed (after the target's lock is released)."""
        url = make_url(job["url"])
        outcome: dict[str, Any] = {"type": "aborted"}
        locked = False
        try:
            if self._connect(job, url) is None:
                outcome = {"type": "not_early"}
            else:
                locked = self._lock(job, self.conn, url)
                if not locked:
                    outcome = {"type": "not_early"}
                else:
                    outcome = self._run(job, self.conn, url) or outcome
        except Stopped:
            outcome = {"type": "stopped"}
        except JobFailure as exc:
            outcome = {"type": "failed", "error": exc.error}
        except MemoryError:
            outcome = {
                "type": "failed",
                "error": {
                    "code": "memory_limit",
                    "message": "the migration ran out of memory (the runner's limit is "
                    f"{job.get('memory_mb')} MB of address space)",
                },
            }
        except Exception as exc:  # noqa: BLE001 - any other error ends the job with its reason
            error = {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"}
            error.update(locate(exc, job["bundle"]["dir"]))
            outcome = {"type": "failed", "error": error}
        finally:
            if self.conn is not None:
                self._release(job, self.conn, url, locked)
                self.conn = None
        self.chan.send(outcome)

    def _engine(self, job: dict[str, Any], url: URL) -> sa.Engine:
        key = (job["url"], job.get("sqlite_journal"))
        engine = self._engines.pop(key, None)
        if engine is not None and _file_identity(url) != self._files.get(key):
            # A SQLite file removed or replaced since this engine last opened it is
            # another database: a pooled connection would still read the old file.
            engine.dispose()
            engine = None
        if engine is None:
            url = _driver_for_this_sqlalchemy(url)
            engine = targets.make_target_engine(url, job["connect"]["timeout_s"], pooled=True)
            if job.get("sqlite_journal") == "truncate":
                sa.event.listen(engine, "connect", _keep_journal_file)
            while len(self._engines) >= _MAX_ENGINES:
                self._engines.popitem(last=False)[1].dispose()
        self._engines[key] = engine
        return engine

    def _connect(self, job: dict[str, Any], url: URL) -> Connection | None:
        engine = self._engine(job, url)
        early = job.get("early", False)
        attempts = 1 if early else job["connect"]["attempts"]

        def on_retry(attempt: int, exc: Exception) -> None:
            self.event("target.connect_retry", {"attempt": attempt, "reason": db_message(exc)})

        try:
            self.conn = targets.connect_with_retries(
                engine, attempts, job["connect"]["backoff_s"], None if early else on_retry
            )
            self._files[(job["url"], job.get("sqlite_journal"))] = _file_identity(url)
            return self.conn
        except sa.exc.OperationalError as exc:
            if early:
                return None
            raise JobFailure(
                "target_unreachable",
                f"cannot connect to {targets.mask_url(url)} after {attempts} "
                f"attempts: {db_message(exc)}",
            ) from None

    def _lock(self, job: dict[str, Any], conn: Connection, url: URL) -> bool:
        """Take the target's session lock (SQLite: the worker holds a file lock instead)."""
        if targets.dialect_of(url) == "sqlite":
            return True
        started = time.monotonic()
        delay = 0.02
        while not targets.try_session_lock(conn, url, job["settings"]):
            if job.get("early"):
                return False
            if time.monotonic() - started > job["lock_wait_timeout_s"]:
                raise JobFailure(
                    "lock_timeout",
                    "another session holds the migration lock on the target database "
                    f"(waited {job['lock_wait_timeout_s']:.0f} s)",
                )
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
        job["_waited_ms"] = int((time.monotonic() - started) * 1000)
        return True

    def _release(self, job: dict[str, Any], conn: Connection, url: URL, locked: bool) -> None:
        clean = True
        try:
            targets.rollback(conn)
            if locked and targets.dialect_of(url) != "sqlite":
                targets.release_session_lock(conn, url, job["settings"])
        except Exception:  # noqa: BLE001 - dropping the session releases the lock anyway
            clean = False
        if not clean or job.get("sqlite_journal") == "truncate":
            # A SQLite connection in exclusive locking mode keeps its lock until it closes.
            try:
                conn.invalidate()
            except Exception:  # noqa: BLE001
                pass
        conn.close()

    def _heads(self, job: dict[str, Any], conn: Connection, url: URL) -> list[str]:
        """Under the session lock: set the project's timeouts, read the heads, commit."""
        targets.apply_session_settings(conn, url, job["settings"])
        heads = targets.read_heads(conn, job["settings"])
        targets.commit(conn)  # the autobegin trap: Alembic must start from no transaction
        return heads

    def scripts(self, job: dict[str, Any]) -> ScriptDirectory:
        """The bundle's scripts, loaded once per runner (bundles never change).

        Its folders go first on sys.path until the job ends (`_run`); a bundle
        switched away from has its modules forgotten, and its scripts with them.
        """
        bundle = job["bundle"]
        forgotten = self.import_path.enter(bundle)
        if forgotten is not None:
            self._scripts.pop(forgotten, None)
        script = self._scripts.pop(bundle["digest"], None)
        if script is None:
            script = load_scripts(
                Path(bundle["dir"]), bundle["versions_path"], import_folders(bundle)
            )
            while len(self._scripts) >= _MAX_SCRIPTS:
                self._scripts.popitem(last=False)
        self._scripts[bundle["digest"]] = script
        return script

    def _run(self, job: dict[str, Any], conn: Connection, url: URL) -> dict[str, Any] | None:
        """Run the job's revisions, with its bundle's folders on sys.path until it ends."""
        try:
            return self._migrate(job, conn, url)
        finally:
            self.import_path.leave()

    def _migrate(self, job: dict[str, Any], conn: Connection, url: URL) -> dict[str, Any] | None:
        heads = self._heads(job, conn, url)
        script = self.scripts(job)
        action, target = job["action"], job["target"]
        kind = job.get("kind") or "migrate"
        mysql = targets.dialect_of(url) == "mysql"
        if job["attempt"] > 1 and job["previously_started"] and mysql and kind == "migrate":
            plan.refuse_blind_resume(script, action, target, heads)
        lost: list[dict[str, Any]] = []
        if job["attempt"] > 1 and action == "upgrade" and job.get("from_heads") is not None:
            lost = plan.applied_between(script, job["from_heads"], heads)
        # A plan or a drift check has its answer to give even at the target.
        noop = (
            kind == "migrate"
            and job["attempt"] == 1
            and plan.nothing_to_do(script, action, target, heads)
        )
        reply = self.ask(
            {
                "type": "locked",
                "heads": heads,
                "waited_ms": job.get("_waited_ms", 0),
                "noop": noop,
                "lost_steps": lost,
                "backend": _backend_id(conn),
            }
        )
        if reply.get("type") != "go":
            return None  # the worker ended the job (nothing to do, cancelled, refused)
        if kind == "plan":
            return {"type": "planned", "plan": self.preflight.plan(job, conn, url, script, heads)}
        if kind == "drift":
            return {"type": "drifted", "drift": drift(job, conn, url, script, heads)}
        if action == "upgrade" and job.get("lint"):
            # Linted once the job runs: its time counts against the job's limit,
            # and a revision that hangs while rendered hangs a running job.
            lint = self._lint(job, conn, url, script, heads)
            reply = self.ask({"type": "linted", "lint": lint})
            if reply.get("type") != "go":
                return None  # parked for an approval
        migration = _Migration(self, job, conn, url, script)
        migration.fence_until = _deadline(reply.get("fence_until"))
        return migration.run()

    def _lint(self, job, conn: Connection, url: URL, script, heads) -> dict[str, Any]:
        """The upgrade's findings; a lint that cannot run says why instead of blocking."""
        try:
            return self.preflight.lint_upgrade(job, conn, url, script, heads)
        except JobFailure as exc:
            return {"mode": None, "findings": [], "error": exc.error["message"]}
        except Exception as exc:  # noqa: BLE001 - the migration itself reports what is wrong
            targets.rollback(conn)
            return {"mode": None, "findings": [], "error": f"{type(exc).__name__}: {exc}"[:500]}


def _deadline(value: Any) -> float:
    """A CLOCK_MONOTONIC deadline from the worker (one clock for the whole machine)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _backend_id(conn: Connection) -> int | None:
    """The server's id of this session (the worker ends it if it must stop the runner)."""
    try:
        dbapi = conn.connection.dbapi_connection
        if hasattr(dbapi, "info") and hasattr(dbapi.info, "backend_pid"):
            return int(dbapi.info.backend_pid)  # psycopg
        if hasattr(dbapi, "thread_id"):
            return int(dbapi.thread_id())  # PyMySQL
    except Exception:  # noqa: BLE001 - unknown: the socket's close ends the session
        return None
    return None


def _keep_journal_file(dbapi_conn, _record) -> None:
    """In the sandbox the rollback journal is a bound file: truncate it, never delete it.

    It stays beside the database, where SQLite's crash recovery looks for it. A
    database in WAL mode keeps its mode.
    """
    mode = str(dbapi_conn.execute("PRAGMA journal_mode").fetchone()[0]).lower()
    if mode == "delete":
        dbapi_conn.execute("PRAGMA journal_mode=TRUNCATE")
    if mode != "wal":
        # Hold SQLite's lock from the first read to the end of the job (the
        # worker kept commits out until then, having checked that the bound
        # journal is the one at its path): no other program commits meanwhile,
        # so none deletes the journal this runner's bind holds (see
        # RunnerProcess.binds_current). The connection is closed when the job
        # ends, which releases the lock. (WAL: readers and writers coexist; its
        # files are kept by the connections that use them.)
        dbapi_conn.execute("PRAGMA locking_mode=EXCLUSIVE")


def import_folders(bundle: dict[str, Any]) -> list[str]:
    """The bundle's folders on the import path, bundle-relative: its python_path, else
    (a bundle with helper modules) the folder holding versions/."""
    if bundle.get("python_path"):
        return list(bundle["python_path"])
    if bundle.get("helpers"):
        return [bundle["versions_path"].rpartition("/")[0] or "."]
    return []


class ImportPath:
    """The running bundle's folders, first on sys.path while its job runs (before the
    environment's site-packages and Retort's own code, as Alembic's prepend_sys_path).

    A warm runner serves several bundles of its project. Modules a bundle
    imported stay loaded for its next jobs (its scripts are kept too); when the
    runner switches to another bundle they are forgotten (sys.modules and the
    import caches), so `import myapp` finds the new bundle's own.
    """

    def __init__(self) -> None:
        self.entries: list[str] = []  # what enter() put on sys.path
        # (digest, dir) of the last bundle with folders: its modules may be loaded.
        self.loaded: tuple[str, str] | None = None

    def enter(self, bundle: dict[str, Any]) -> str | None:
        """Put the bundle's folders first; return the digest of a bundle forgotten now."""
        self.leave()
        root = Path(bundle["dir"])
        forgotten = None
        if self.loaded is not None and self.loaded[0] != bundle["digest"]:
            forgotten = self.loaded[0]
            forget_modules(self.loaded[1])
            self.loaded = None
        folders = import_folders(bundle)
        if folders:  # only a bundle with folders on the path can import its own modules
            self.loaded = (bundle["digest"], str(root))
        self.entries = [str(root / folder) for folder in folders]
        for entry in reversed(self.entries):
            while entry in sys.path:
                sys.path.remove(entry)
            sys.path.insert(0, entry)
        return forgotten

    def leave(self) -> None:
        """Take the bundle's folders off sys.path (its modules stay loaded)."""
        for entry in self.entries:
            while entry in sys.path:
                sys.path.remove(entry)
        self.entries = []


def forget_modules(bundle_dir: str) -> None:
    """Drop every module loaded from a bundle's folder, and the import system's caches of it."""
    prefix = str(Path(bundle_dir)) + "/"
    for name, module in list(sys.modules.items()):
        origin = getattr(module, "__file__", None)
        try:
            paths = [str(p) for p in (getattr(module, "__path__", None) or ())]
        except Exception:  # noqa: BLE001 - an odd __path__: judged by its file alone
            paths = []
        if (isinstance(origin, str) and origin.startswith(prefix)) or any(
            p.startswith(prefix) for p in paths
        ):
            sys.modules.pop(name, None)
    for key in list(sys.path_importer_cache):
        if isinstance(key, str) and (key + "/").startswith(prefix):
            sys.path_importer_cache.pop(key, None)
    importlib.invalidate_caches()


def load_scripts(bundle_dir: Path, versions_path: str, folders: list[str]) -> ScriptDirectory:
    """Load a bundle's revisions (its `folders`, bundle-relative, are on sys.path already)."""
    root = bundle_dir / versions_path.rpartition("/")[0] if "/" in versions_path else bundle_dir
    try:
        script = ScriptDirectory(str(root), version_locations=[str(bundle_dir / versions_path)])
        script.revision_map.heads  # noqa: B018 - load every revision file now
        return script
    except Exception as exc:  # noqa: BLE001
        raise load_failure(
            exc, bundle_dir, versions_path, folders, lambda f: _revision_id(bundle_dir / f)
        ) from None


def _revision_id(path: Path) -> str | None:
    """The `revision = '...'` of a revision file, read from its syntax tree."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            targets_ = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "revision" for t in targets_):
                value = node.value
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    return value.value
    return None


class _Migration:
    """One Alembic run of a job, reporting each step as it lands."""

    def __init__(self, runner: Runner, job, conn: Connection, url: URL, script) -> None:
        self.runner, self.job, self.conn, self.url, self.script = runner, job, conn, url, script
        self.settings = job["settings"]
        self.version_table = self.settings.get("version_table") or "alembic_version"
        self.target = job["target"]
        self.relative = plan.is_relative(self.target)
        self.statements: list[str] = []
        self.planned: list[Any] = []
        self.applied = 0
        self.boundary = 0.0
        self.boundary_at = 0.0
        # Until then the worker knows its lease is held (LeaseClock): a step may
        # commit without waiting for its word. After it, each step asks first.
        self.fence_until = 0.0

    def run(self) -> dict[str, Any]:
        reconnects = 0
        while True:
            try:
                self._alembic()
                break
            except _TargetLost as lost:
                reconnects += 1
                self._reconnect(lost, reconnects)
        to_heads = targets.read_heads(self.conn, self.settings)
        targets.commit(self.conn)
        return {"type": "done", "to_heads": to_heads, "steps": self.applied}

    # ------------------------------------------------------------- Alembic
    def _plan_steps(self, rev, _context):
        if plan.RELATIVE.match(self.target) and len(rev) > 1:
            raise JobFailure(
                "ambiguous_relative_target",
                f"relative target {self.target} is ambiguous: the database has {len(rev)} heads "
                f"({', '.join(sorted(rev))}); use a revision id or branch@{self.target}",
            )
        steps = plan.steps_for(self.script, self.job["action"], self.target, rev)
        self.planned.extend(steps)
        dest = plan.destination(self.job["action"], steps) if self.relative else None
        if dest:
            # A recovered attempt must go where this one was going, not N further.
            self.runner.chan.send({"type": "resolved", "target": dest})
            self.target, self.relative = dest, False
        return steps

    def _alembic(self) -> None:
        base = self.applied
        env = EnvironmentContext(
            AlembicConfig(), self.script, fn=self._plan_steps, destination_rev=self.target
        )
        naming = self.settings.get("naming_convention")
        sa.event.listen(self.conn, "before_cursor_execute", self._on_sql)
        try:
            with env:
                env.configure(
                    connection=self.conn,
                    transaction_per_migration=True,
                    on_version_apply=self._on_version_apply,
                    version_table=self.version_table,
                    version_table_schema=self.settings.get("version_table_schema"),
                    target_metadata=sa.MetaData(naming_convention=naming)
                    if naming
                    else sa.MetaData(),
                )
                self.boundary, self.boundary_at = time.perf_counter(), time.time()
                with env.begin_transaction():
                    env.run_migrations()
        except (JobFailure, Stopped, MemoryError):
            raise
        except Exception as exc:  # noqa: BLE001 - a revision raised, or the target went away
            if self.conn.invalidated:
                raise self._target_lost(base, exc) from None
            if isinstance(exc, CommandError) and not self.planned:
                raise JobFailure(
                    "invalid_target", f"cannot {self.job['action']} to {self.target}: {exc}"
                ) from None
            if not self.planned:
                raise JobFailure(
                    "migration_failed",
                    f"Alembic failed before running any revision: {type(exc).__name__}: "
                    f"{db_message(exc)}",
                    **locate(exc, self.job["bundle"]["dir"]),
                ) from None
            raise self._step_failure(self.planned[self.applied - base :], exc) from None
        finally:
            try:
                sa.event.remove(self.conn, "before_cursor_execute", self._on_sql)
            except Exception:  # noqa: BLE001 - an invalidated connection may have dropped it
                pass

    def _on_sql(self, conn, cursor, statement, parameters, context, executemany) -> None:
        text = statement.strip()
        if text == "BEGIN":  # the SQLite transactional recipe's own statement
            return
        if parameters:
            text += f"  -- parameters: {json.dumps(parameters, default=str)[:500]}"
        self.statements.append(text)

    def _on_version_apply(self, ctx, step, heads, run_args) -> None:
        # After the step's DDL and version-table update, before its COMMIT: past
        # fence_until the worker checks the fence first, and a `stop` rolls the
        # step back.
        now, at = time.perf_counter(), time.time()
        sql, self.statements = self.statements, []
        record = {
            "type": "step",
            # up_revision_ids is the upper side of the step whatever its direction.
            "revisions": list(step.up_revision_ids),
            "direction": "stamp" if step.is_stamp else ("up" if step.is_upgrade else "down"),
            "upgrade": bool(step.is_upgrade),
            "message": step.up_revision.doc if step.up_revision is not None else None,
            "sql": sql,
            "started_at": self.boundary_at,
            "finished_at": at,
            "duration_ms": (now - self.boundary) * 1000,
        }
        self.boundary, self.boundary_at = now, at
        if time.monotonic() < self.fence_until:
            self.runner.chan.send(record)  # the worker records it; the lease is surely held
        else:
            record["ask"] = True
            reply = self.runner.ask(record)
            if reply.get("type") != "ok":
                raise Stopped()
            self.fence_until = _deadline(reply.get("fence_until"))
        self.applied += 1

    # ------------------------------------------------------------- failures
    def _target_lost(self, base: int, exc: Exception) -> _TargetLost:
        pending = self.planned[self.applied - base :]
        revision = _revision_of(pending[0]) if pending else None
        partial = targets.dialect_of(self.url) == "mysql" and partial_ddl(
            self.statements, self.version_table
        )
        self.statements = []
        return _TargetLost(revision, db_message(exc), partial)

    def _reconnect(self, lost: _TargetLost, count: int) -> None:
        """Connect again after the target dropped mid-step, and go on from its heads.

        PostgreSQL and SQLite rolled the interrupted step back with the connection;
        on MySQL/MariaDB, a step that had run DDL may be half applied: stop there.
        """
        where = f"during revision {lost.revision}" if lost.revision else "during the migration"
        self.runner.event(
            "target.connection_lost",
            {"revision": lost.revision, "reason": lost.reason, "reconnect": count},
        )
        try:
            self.conn.invalidate()
        except Exception:  # noqa: BLE001 - already gone
            pass
        self.conn.close()
        self.runner.conn = None
        if count > self.job["connect"]["attempts"]:
            raise JobFailure(
                "target_unreachable",
                f"the connection to the target dropped {where} {count} times; giving up",
                revision=lost.revision,
            )
        try:
            fresh = self.runner._connect({**self.job, "early": False}, self.url)
        except JobFailure as exc:
            undone = (
                "statements of it that ran before may still be applied (MySQL/MariaDB DDL "
                "commits implicitly)"
                if lost.partial
                else "it was rolled back by the database"
            )
            exc.error["message"] = (
                f"the connection to the target was lost {where} ({lost.reason}) and could not "
                f"be made again; {undone}. {exc.error['message']}"
            )
            exc.error["revision"] = lost.revision
            raise
        assert fresh is not None
        self.conn = fresh
        self.runner._lock({**self.job, "early": False}, fresh, self.url)
        heads = self.runner._heads(self.job, fresh, self.url)
        if lost.partial:
            raise JobFailure(
                "needs_attention",
                f"the connection to the MySQL/MariaDB target was lost {where} after some of its "
                f"DDL had run, and DDL commits implicitly there: {lost.revision} may be half "
                f"applied while the version table says {', '.join(heads) or 'base'}. Inspect "
                f"the database, finish or undo {lost.revision} by hand, then stamp.",
                revision=lost.revision,
                database_heads=heads,
            )
        self.runner.event("target.reconnected", {"current_heads": heads, "reconnect": count})

    def _step_failure(self, pending: list[Any], exc: Exception) -> JobFailure:
        """Describe the failed step and what the database was left with."""
        failed = pending[0] if pending else None
        revision = _revision_of(failed) if failed is not None else None
        # The statement that failed, as the database error says; none for an error
        # of the revision's own Python (the last statement that ran succeeded).
        statement = getattr(exc, "statement", None)
        # What the failed step ran, taken before the read-back below adds Retort's own.
        sql, self.statements = list(self.statements), []
        message = describe(exc)
        if isinstance(exc, sa.exc.ObjectNotExecutableError):
            message += (
                " (a plain string passed to execute(): SQLAlchemy 2.x needs "
                "sqlalchemy.text('...') or op.execute('...'))"
            )
        try:
            targets.rollback(self.conn)
            heads_now = targets.read_heads(self.conn, self.settings)
            targets.commit(self.conn)
        except Exception:  # noqa: BLE001
            heads_now = None
        mysql = targets.dialect_of(self.url) == "mysql"
        # What the failed step ran before the failing statement: on MySQL each
        # DDL statement of it is committed.
        ran = sql[:-1] if statement and sql and statement.strip() in sql[-1] else sql
        partial = mysql and partial_ddl(ran, self.version_table)
        where = ", ".join(heads_now) if heads_now else "base"
        located = locate(exc, self.job["bundle"]["dir"])
        at = f" ({located['file']}, line {located['line']})" if located else ""
        if located.get("source"):
            at += f" `{located['source'][:200]}`"
        if heads_now is None:
            code = "needs_attention"
            summary = (
                f"revision {revision}{at} failed and the database's state could not be read "
                f"back afterwards; check its version table before retrying. Error: {message}"
            )
        elif partial:
            code = "needs_attention"
            summary = (
                f"revision {revision}{at} failed on MySQL/MariaDB, where DDL commits implicitly: "
                f"statements of {revision} that ran before the failure are still applied, while "
                f"the version table says {where}. Inspect the database, undo or finish "
                f"{revision} by hand, then stamp. Error: {message}"
            )
        else:
            code = "revision_failed"
            rolled = "was rolled back" if not mysql else "changed nothing"
            summary = (
                f"revision {revision}{at} failed and {rolled}; the database is at {where} "
                f"(its last good revision). Error: {message}"
            )
        now = time.time()
        step = {
            "revisions": [revision] if revision else [],
            "direction": "up" if getattr(failed, "is_upgrade", True) else "down",
            "message": getattr(failed, "doc", None),
            "sql": sql,
            "started_at": self.boundary_at or now,
            "finished_at": now,
            "duration_ms": (time.perf_counter() - self.boundary) * 1000 if self.boundary else 0,
        }
        return JobFailure(
            code,
            summary,
            revision=revision,
            statement=statement,
            database_message=message,
            database_heads=heads_now,
            step=step,
            to_heads=heads_now,
            **located,
        )


def _file_identity(url: URL) -> tuple[int, int] | None:
    """A SQLite file's (device, inode); None for another dialect or a missing file."""
    if targets.dialect_of(url) != "sqlite" or not url.database:
        return None
    try:
        st = os.stat(url.database)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _revision_of(step: Any) -> str | None:
    return getattr(getattr(step, "revision", None), "revision", None)


def _driver_for_this_sqlalchemy(url: URL) -> URL:
    """SQLAlchemy 1.4 (a project's environment) has no psycopg 3 dialect: use psycopg2."""
    if not sa.__version__.startswith("1.") or url.drivername != "postgresql+psycopg":
        return url
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        raise JobFailure(
            "environment_failed",
            f"SQLAlchemy {sa.__version__} reaches PostgreSQL through psycopg2, which this "
            "project's environment does not have: add psycopg2-binary to its requirements",
        ) from None
    return url.set(drivername="postgresql+psycopg2")
