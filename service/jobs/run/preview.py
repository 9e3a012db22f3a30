"""In the runner: what an upgrade, downgrade or stamp WOULD run, without changing the target.

Three ways to see it (docs/plan.md):
- offline: Alembic renders each step's SQL (`as_sql`); nothing reaches the target;
- rolled_back (PostgreSQL): the steps really run in one transaction that is
  rolled back, and the session's new locks and table rewrites are observed;
- copy (SQLite): the steps really run on a temporary copy of the file.

Runs inside the sandboxed runner (it runs the project's revision code): imports
nothing of Retort's state side. Alembic's runtime here is the runner's own, so
the preview may patch it for its duration (always restored in a `finally`).
"""

from __future__ import annotations

import ast
import collections
import copy
import functools
import json
import os
import re
import sqlite3
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import alembic.op
import sqlalchemy as sa
from alembic.config import Config as AlembicConfig
from alembic.operations import Operations
from alembic.operations import ops as alembic_ops
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import HeadMaintainer, MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util import CommandError
from sqlalchemy.engine import URL, Connection

from service import targets
from service.jobs.run import observe, plan
from service.jobs.run.failure import JobFailure, db_message, locate
from service.jobs.run.observe import live_tables

__all__ = ["choose_mode", "heads_along", "live_tables", "preview", "revisions_info"]

MODES = ("offline", "rolled_back", "copy")
AUTO_MODE = {"postgresql": "rolled_back", "sqlite": "copy", "mysql": "offline"}

_MYSQL_WHY = (
    "MySQL/MariaDB commits every DDL statement implicitly, so a run that is rolled back "
    "would leave its changes behind: only offline rendering is safe there"
)
_DDL = re.compile(r"^(CREATE|ALTER|DROP|RENAME|TRUNCATE)\b", re.IGNORECASE)
# Reads of the catalogs (SQLAlchemy's reflection, e.g. batch mode's on SQLite):
# they run, but they are not what a revision changes, so they are not listed.
_CATALOG_READ = {
    "sqlite": re.compile(
        r"^(PRAGMA\s+(\w+\.)?(table_x?info|index_x?info|index_list|foreign_key_list)\b[^=]*$"
        r"|SELECT\b(?=.*\bsqlite_(master|schema|temp_master)\b)"
        r"(?!.*\b(FROM|JOIN)\s+(?![\s(]|(\w+\.)?sqlite_(master|schema|temp_master)\b)))",
        re.IGNORECASE | re.DOTALL,
    ),
    "postgresql": re.compile(
        r"^SELECT\b(?!.*\bINTO\b)(?=.*\b(pg_catalog|information_schema)\.)"
        r"(?!.*\b(FROM|JOIN)\s+(?![\s(]|pg_catalog\.|information_schema\.))",
        re.IGNORECASE | re.DOTALL,
    ),
}
_TERMINATED = re.compile(r"^(BEGIN|COMMIT);?$", re.IGNORECASE)
# The relation a lock waits for, as the failing statement names it.
_RELATION = re.compile(
    r"\b(?:TABLE(?:\s+ONLY)?|INDEX(?:\s+CONCURRENTLY)?(?:\s+IF\s+(?:NOT\s+)?EXISTS)?[^()]*?\bON"
    r"|INTO|UPDATE|FROM|TRUNCATE(?:\s+TABLE)?|LOCK(?:\s+TABLE)?|REFERENCES)\s+"
    r"((?:\"[^\"]+\"|\w+)(?:\.(?:\"[^\"]+\"|\w+))?)",
    re.IGNORECASE,
)


def preview(
    conn: Connection,
    url: URL,
    script: ScriptDirectory,
    *,
    action: str,
    target: str,
    heads: list[str],
    settings: dict[str, Any],
    mode: str = "auto",
    lock_timeout_ms: int = 2000,
    tmp_dir: str | None = None,
    bundle_dir: str | Path | None = None,
) -> dict[str, Any]:
    """What `action` to `target` would run on this database, from `heads`, in `mode`.

    `conn` is open on the target and not in a transaction. Nothing is changed:
    offline reads nothing, rolled_back rolls its transaction back, copy works
    on a temporary copy of the SQLite file. `bundle_dir` (default: the
    scripts' folder) makes file names bundle-relative. A revision that fails
    while it really runs (rolled_back, copy) raises JobFailure("plan_failed").
    """
    dialect = targets.dialect_of(url)
    chosen = choose_mode(dialect, mode)
    from_heads = sorted(heads)
    steps = _plan(script, action, target, from_heads)
    before, to_heads = heads_along(steps, from_heads)
    answer: dict[str, Any] = {
        "mode": chosen,
        "dialect": dialect,
        "from_heads": from_heads,
        "to_heads": to_heads,
        "nothing_to_do": not steps,
        "limitations": [],
        "sequences_advanced": [],
        "steps": [],
    }
    if dialect == "mysql":
        answer["limitations"].append(_MYSQL_WHY)
    if not steps:
        return answer
    run = _Run(script, settings, dialect, chosen, Path(bundle_dir or script.dir))
    if conn.in_transaction():
        targets.commit(conn)  # the autobegin trap: Alembic must start from no transaction
    with _patched_alembic(run):
        if chosen == "offline":
            _offline(run, conn, steps, before, target)
        elif chosen == "rolled_back":
            answer["sequences_advanced"] = _rolled_back(run, conn, steps, target, lock_timeout_ms)
        else:
            _copy(run, conn, url, steps, target, tmp_dir)
    answer["steps"] = [_annotated(record, chosen) for record in run.records]
    answer["limitations"] += _limitations(chosen, run.records, answer["sequences_advanced"])
    return answer


def choose_mode(dialect: str, mode: str) -> str:
    """The mode for `mode` on `dialect` ("auto": the most faithful one it supports)."""
    if mode == "auto":
        return AUTO_MODE.get(dialect, "offline")
    if mode not in MODES:
        raise JobFailure(
            "invalid_plan_mode", f"unknown plan mode {mode!r}: use auto, {', '.join(MODES)}"
        )
    if mode == "rolled_back" and dialect != "postgresql":
        why = _MYSQL_WHY if dialect == "mysql" else "SQLite previews run on a copy (mode copy)"
        raise JobFailure(
            "invalid_plan_mode", f"the rolled_back mode needs PostgreSQL ({dialect}): {why}"
        )
    if mode == "copy" and dialect != "sqlite":
        raise JobFailure(
            "invalid_plan_mode",
            f"the copy mode copies a SQLite file; this target is {dialect}"
            + (f": {_MYSQL_WHY}" if dialect == "mysql" else ": use rolled_back or offline"),
        )
    return mode


def _plan(script: ScriptDirectory, action: str, target: str, heads: list[str]) -> list[Any]:
    """The steps from `heads` to `target`, refusing what the runner would refuse."""
    if action not in ("upgrade", "downgrade", "stamp"):
        raise JobFailure("invalid_target", f"unknown action {action!r}")
    if plan.RELATIVE.match(target) and len(heads) > 1:
        raise JobFailure(
            "ambiguous_relative_target",
            f"relative target {target} is ambiguous: the database has {len(heads)} heads "
            f"({', '.join(heads)}); use a revision id or branch@{target}",
        )
    try:
        return plan.steps_for(script, action, target, tuple(heads))
    except (CommandError, RevisionError) as exc:
        raise JobFailure("invalid_target", f"cannot {action} to {target}: {exc}") from None
    except AttributeError as exc:  # Alembic takes each step's upgrade()/downgrade() up front
        raise JobFailure(
            "plan_failed",
            f"cannot {action} to {target}: a revision on the way defines no "
            f"{'downgrade' if action == 'downgrade' else 'upgrade'}() ({exc})",
        ) from None


class _NoOutput:
    """The least of a MigrationContext that Alembic's HeadMaintainer needs: writes nowhere."""

    as_sql = True

    def __init__(self) -> None:
        self.impl = self
        self._version = sa.table("alembic_version", sa.column("version_num"))

    def _exec(self, *_args: Any, **_kw: Any) -> None:
        return None


def heads_along(steps: list[Any], heads: list[str]) -> tuple[list[list[str]], list[str]]:
    """The heads before each step and after the last, by Alembic's own bookkeeping."""
    maintainer = HeadMaintainer(_NoOutput(), heads)  # type: ignore[arg-type]
    before = []
    for step in steps:
        before.append(sorted(maintainer.heads))
        maintainer.update_to_step(step)
    return before, sorted(maintainer.heads)


# ----------------------------------------------------------------- recording
class _Run:
    """The steps of one preview as they are recorded, and what is running now."""

    def __init__(self, script, settings, dialect: str, mode: str, bundle_dir: Path) -> None:
        self.script, self.settings, self.dialect, self.mode = script, settings, dialect, mode
        self.bundle_dir = bundle_dir
        self.version_table = settings.get("version_table") or "alembic_version"
        self.records: list[dict[str, Any]] = []
        self.current: dict[str, Any] | None = None  # the record of the step running now
        self.step: Any = None  # that step
        self.raw = 0  # inside op.execute()
        self.autocommit = False  # inside op.get_context().autocommit_block()
        self.failed: tuple[Any, BaseException] | None = None
        self.on_step_start = None  # rolled_back: the observer's per-step snapshot

    def wrap(self, step: Any) -> Any:
        """A copy of `step` whose revision code is recorded as this preview's step."""
        wrapped = copy.copy(step)
        original = step.migration_fn

        @functools.wraps(original)
        def migration_fn(*args: Any, **kw: Any) -> Any:
            self.begin(step)
            try:
                return original(*args, **kw)
            except BaseException as exc:
                self.failed = (step, exc)
                raise
            finally:
                self.current = None

        wrapped.migration_fn = migration_fn
        return wrapped

    def begin(self, step: Any) -> dict[str, Any]:
        """Start the record of a step: its statements are listed from now on."""
        info = step.info
        revision = getattr(step, "revision", None)  # None for a stamp
        self.step = step
        self.current = {
            "revisions": list(info.up_revision_ids),
            "direction": "stamp" if info.is_stamp else ("up" if info.is_upgrade else "down"),
            "message": info.up_revision.doc if info.up_revision is not None else None,
            "revision_file": self.relative(revision.path) if revision is not None else None,
            "rendered": True,
            "note": None,
            "statements": [],
        }
        self.records.append(self.current)
        if self.on_step_start is not None:
            self.on_step_start()
        return self.current

    def relative(self, path: str) -> str:
        """A file's path relative to the bundle (as is, if outside it)."""
        try:
            return str(Path(path).resolve().relative_to(self.bundle_dir.resolve()))
        except ValueError:
            return path

    def add(self, sql: str, *, executed: bool, flag: str | None = None) -> dict[str, Any]:
        """List a statement in the running step."""
        assert self.current is not None
        statement = {
            "sql": sql,
            "raw": self.raw > 0,
            "in_transaction": self.in_transaction(sql),
            "executed": executed,
            "flag": flag,
            "locks": None,
            "rewrote": None,
        }
        self.current["statements"].append(statement)
        return statement

    def records_now(self, statement: str) -> bool:
        """Whether a statement on the connection is the running revision's to list."""
        if self.current is None:
            return False  # Alembic's own: reading and updating the version table
        catalog = _CATALOG_READ.get(self.dialect)
        return not (catalog and not self.raw and catalog.match(observe.head(statement)))

    def in_transaction(self, sql: str) -> bool:
        """Whether a real run would undo the statement with its step if the step failed."""
        if self.autocommit:
            return False
        return not (self.dialect == "mysql" and _DDL.match(observe.head(sql)))

    def where(self, step: Any, exc: BaseException | None = None) -> tuple[str, dict[str, Any]]:
        """'revision X (file, line N)' for a step (and where `exc` was raised in it)."""
        revision = _revision_id(step)
        found = locate(exc, self.bundle_dir) if exc is not None else {}
        if not found and getattr(step, "revision", None) is not None:
            found = {"file": self.relative(step.revision.path)}
        at = ", ".join(
            part
            for part in (found.get("file"), f"line {found['line']}" if "line" in found else None)
            if part
        )
        return f"revision {revision}" + (f" ({at})" if at else ""), found


def _revision_id(step: Any) -> str | None:
    """The step's revision id (a stamp's: the revisions it moves, comma-separated)."""
    revision = getattr(step, "revision", None)
    if revision is not None:
        return revision.revision
    return ",".join(step.info.up_revision_ids) or None


def _with_parameters(statement: str, parameters: Any) -> str:
    """A captured statement as shown: its bound values after it, as a comment."""
    text = statement.strip()
    if parameters:
        text += f"  -- parameters: {json.dumps(parameters, default=str)[:500]}"
    return text


@contextmanager
def _patched_alembic(run: _Run):
    """Mark op.execute() statements raw and autocommit_block() contents, for the preview only.

    rolled_back replaces autocommit_block outright: the real one commits the
    outer transaction, which would make the preview's changes permanent.
    """
    execute_sql = Operations._to_impl.dispatch(alembic_ops.ExecuteSQLOp)
    autocommit_block = MigrationContext.autocommit_block

    def raw_execute(operations: Operations, operation: alembic_ops.ExecuteSQLOp) -> Any:
        run.raw += 1
        try:
            return execute_sql(operations, operation)
        finally:
            run.raw -= 1

    @contextmanager
    def marked_block(self: MigrationContext):
        run.autocommit = True
        try:
            if run.mode == "rolled_back":
                yield  # shown, not run: the statements inside become `SELECT 1`
            else:
                with autocommit_block(self):
                    yield
        finally:
            run.autocommit = False

    Operations.implementation_for(alembic_ops.ExecuteSQLOp, replace=True)(raw_execute)
    MigrationContext.autocommit_block = marked_block  # type: ignore[method-assign]
    try:
        yield
    finally:
        Operations.implementation_for(alembic_ops.ExecuteSQLOp, replace=True)(execute_sql)
        MigrationContext.autocommit_block = autocommit_block  # type: ignore[method-assign]
        # A revision that raised left Alembic's `op` proxy installed: drop it.
        if getattr(alembic.op, "_proxy", None) is not None:
            alembic.op._proxy._remove_proxy()


def _environment(run: _Run, steps: list[Any], target: str, **kw: Any) -> EnvironmentContext:
    """Alembic's environment for these steps, planned already (as the runner's)."""
    return EnvironmentContext(
        AlembicConfig(),
        run.script,
        fn=lambda _rev, _ctx: [run.wrap(step) for step in steps],
        destination_rev=target,
        **kw,
    )


def _configure(run: _Run, env: EnvironmentContext, connection: Connection, **kw: Any) -> None:
    """Configure Alembic with the project's settings, as a migration would."""
    naming = run.settings.get("naming_convention")
    env.configure(
        connection=connection,
        version_table=run.version_table,
        version_table_schema=run.settings.get("version_table_schema"),
        target_metadata=sa.MetaData(naming_convention=naming) if naming else sa.MetaData(),
        **kw,
    )


# ------------------------------------------------------------------- offline
class _Writer:
    """Alembic's offline output buffer: each write() is one statement (static_output)."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.terminator = ";"  # the dialect's, once Alembic is configured

    def write(self, text: str) -> None:
        run = self.run
        sql = text.strip()
        if run.current is None or not sql:
            return  # Alembic's own: the version table, "-- Running ..." comments
        if not run.raw and _TERMINATED.match(sql):
            return  # the transaction around each step, and around autocommit_block
        if self.terminator and sql.endswith(self.terminator):
            sql = sql[: -len(self.terminator)].rstrip()
        flag = "autocommit_block" if run.autocommit else None
        if flag is None and run.dialect == "postgresql":
            flag = observe.no_transaction_flag(sql)
        run.add(sql, executed=False, flag=flag)

    def flush(self) -> None:
        pass


def _offline(run: _Run, conn: Connection, steps, before, target: str) -> None:
    """Render each step on its own, from the heads before it: one that cannot render is
    marked so, and the next ones still render."""
    for step, heads in zip(steps, before):
        recorded = len(run.records)
        writer = _Writer(run)
        # The live connection gives Alembic the server's dialect (its version, MariaDB or
        # MySQL); in as_sql mode Alembic replaces it with a mock and never uses it.
        env = _environment(run, [step], target, as_sql=True)
        try:
            with env:
                _configure(
                    run,
                    env,
                    conn,
                    output_buffer=writer,
                    literal_binds=True,
                    starting_rev=tuple(heads) or None,
                    transaction_per_migration=True,
                )
                writer.terminator = env.get_context().impl.command_terminator
                with env.begin_transaction():
                    env.run_migrations()
        except Exception as exc:  # noqa: BLE001 - the step is reported, the next ones render
            record = run.records[-1] if len(run.records) > recorded else run.begin(step)
            run.current = None
            where, _ = run.where(step, exc)
            record["rendered"] = False
            reason = _offline_reason(exc, run.dialect)
            record["note"] = f"{where} cannot be rendered offline: {reason}"
    run.current = None


_LIVE_ADVICE = collections.defaultdict(
    lambda: "no live preview is safe on MySQL/MariaDB: read its code",
    postgresql="preview it in the rolled_back mode",
    sqlite="preview it in the copy mode",
)


def _offline_reason(exc: BaseException, dialect: str) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, (AttributeError, TypeError)) and "NoneType" in str(exc):
        return (
            "it reads data through op.get_bind(), which returns nothing offline "
            f"(its queries are only written out) ({text}); {_LIVE_ADVICE[dialect]}"
        )
    if isinstance(exc, CommandError) and "batch" in str(exc).lower():
        return (
            f"batch mode needs a live database to reflect the table ({text}); "
            + _LIVE_ADVICE[dialect]
        )
    if isinstance(exc, NotImplementedError):
        return f"an operation this dialect cannot render offline ({text})"
    return text


# -------------------------------------------------------------- rolled back
def _rolled_back(run: _Run, conn: Connection, steps, target: str, lock_timeout_ms: int):
    """Run every step in one transaction on the target, observe it, roll it back.

    Returns the sequences the run advanced (nextval survives ROLLBACK).
    """
    trans = conn.begin()
    capture: _PgCapture | None = None
    try:
        # SET LOCAL: ends with the transaction, whatever the session had.
        # At least 1 ms: lock_timeout = 0 would mean no limit at all.
        conn.exec_driver_sql(f"SET LOCAL lock_timeout = {max(1, int(lock_timeout_ms))}")
        statement_ms = run.settings.get("statement_timeout_ms")
        if statement_ms:
            conn.exec_driver_sql(f"SET LOCAL statement_timeout = {int(statement_ms)}")
        capture = _PgCapture(run, conn)
        env = _environment(run, steps, target)
        try:
            with env:
                # In the outer transaction Alembic's begin_transaction() is a no-op.
                _configure(run, env, conn, transaction_per_migration=False)
                with env.begin_transaction():
                    env.run_migrations()
        except JobFailure:
            raise
        except Exception as exc:  # noqa: BLE001 - a revision raised: say which, after ROLLBACK
            raise _plan_failure(run, exc, lock_timeout_ms) from None
        return capture.observer.sequences_advanced()
    finally:
        if capture is not None:
            capture.remove()
        run.current = None
        if conn.get_transaction() is trans:
            trans.rollback()
        # Also on the driver: a refused commit leaves SQLAlchemy's transaction inactive,
        # and its rollback() then sends nothing. A ROLLBACK when idle is harmless.
        if not conn.invalidated:
            conn.connection.dbapi_connection.rollback()


class _PgCapture:
    """The rolled-back preview's listeners on the target connection.

    Records each statement of the running revision; replaces those that cannot
    run in the outer transaction (or would end it) with `SELECT 1`; after each
    one that ran, reads the locks it took and the tables it rewrote.
    """

    def __init__(self, run: _Run, conn: Connection) -> None:
        self.run, self.conn = run, conn
        self.observer = observe.PgObserver(conn.connection.dbapi_connection)
        self.observer.start()
        run.on_step_start = self.observer.start_step
        self.pending: dict[str, Any] | None = None  # the statement running now
        self.listeners = [
            ("before_cursor_execute", self.before, {"retval": True}),
            ("after_cursor_execute", self.after, {}),
            ("commit", self.refuse_end, {}),
            ("rollback", self.refuse_end, {}),
        ]
        for name, fn, kw in self.listeners:
            sa.event.listen(conn, name, fn, **kw)

    def remove(self) -> None:
        """Take the listeners off the connection."""
        for name, fn, _kw in self.listeners:
            sa.event.remove(self.conn, name, fn)
        self.run.on_step_start = None

    def before(self, _conn, _cursor, statement, parameters, _context, executemany):
        """Record a statement of the running revision; set apart what must not run."""
        run = self.run
        self.pending = None
        if not run.records_now(statement):
            return statement, parameters
        sql = _with_parameters(statement, parameters)
        flag = "autocommit_block" if run.autocommit else observe.no_transaction_flag(sql)
        if flag is None and observe.ends_transaction(sql):
            flag = "transaction_control"  # it would make the preview's changes permanent
        if flag is not None:
            run.add(sql, executed=False, flag=flag)
            empty = [type(p)() for p in parameters] if executemany else type(parameters)()
            return "SELECT 1", empty
        self.pending = run.add(sql, executed=True)
        return statement, parameters

    def after(self, _conn, cursor, _statement, _parameters, _context, _executemany):
        """After a statement ran: the locks it took and the tables it rewrote."""
        if self.pending is not None:
            record, self.pending = self.pending, None
            # The same session, through the driver: not seen by these listeners.
            record["locks"], record["rewrote"] = self.observer.after_statement(
                cursor.connection, record["sql"]
            )

    def refuse_end(self, _conn) -> None:
        """Refuse a commit or rollback issued by revision code."""
        # Only revision code ends a transaction here (Alembic's begin_transaction() is
        # a no-op inside the outer one): a commit would make the preview permanent.
        run = self.run
        if run.current is not None:
            where, found = run.where(run.step)
            raise JobFailure(
                "plan_failed",
                f"{where} ends the transaction itself (commit() or rollback() on its "
                "connection): a rolled-back preview cannot run it without making its "
                "changes permanent; preview it offline",
                revision=_revision_id(run.step),
                **found,
            )


def _plan_failure(run: _Run, exc: BaseException, lock_timeout_ms: int) -> JobFailure:
    """plan_failed (or plan_lock_timeout) for a step that raised while it really ran."""
    step = run.failed[0] if run.failed else None
    where, found = run.where(step, exc) if step is not None else ("the plan", {})
    statement = getattr(exc, "statement", None)
    sqlstate = getattr(getattr(exc, "orig", None), "sqlstate", None)
    extra = {"revision": _revision_id(step) if step else None, "statement": statement, **found}
    if sqlstate == "55P03":
        match = _RELATION.search(statement or "")
        table = f"table {match.group(1)}" if match else "a table"
        return JobFailure(
            "plan_lock_timeout",
            f"{where} waited more than {lock_timeout_ms} ms for a lock on {table} (another "
            f"session holds it); the preview was rolled back. Statement: {statement}",
            **extra,
        )
    message = db_message(exc)
    if sqlstate == "55P04":
        message += (
            " (the preview runs every step in one transaction; a real run commits after each "
            "step, so a value added by an earlier step is usable in a later one)"
        )
    if isinstance(exc, sa.exc.DBAPIError):
        extra["database_message"] = message
    undone = "rolled back" if run.mode == "rolled_back" else "run on a copy that was deleted"
    return JobFailure(
        "plan_failed",
        f"{where} failed in the {run.mode} preview, which was {undone}: "
        f"{type(exc).__name__}: {message}",
        **extra,
    )


# ---------------------------------------------------------------------- copy
def _copy(run: _Run, conn: Connection, url: URL, steps, target: str, tmp_dir: str | None):
    """Run the steps for real on a temporary copy of the SQLite file, then delete it."""
    source = conn.connection.dbapi_connection
    fd, path = tempfile.mkstemp(prefix="retort-plan-", suffix=".db", dir=tmp_dir)
    os.close(fd)
    engine = None
    try:
        dest = sqlite3.connect(path)
        try:
            source.backup(dest)  # a consistent snapshot; the target is only read
        finally:
            dest.close()
        foreign_keys = source.execute("PRAGMA foreign_keys").fetchone()[0]
        engine = targets.make_target_engine(url.set(database=path), 5)
        with engine.connect() as copied:
            if foreign_keys:
                # On the driver, before any BEGIN: inside a transaction SQLite ignores it.
                copied.connection.dbapi_connection.execute("PRAGMA foreign_keys=ON")

            def before(_conn, _cursor, statement, parameters, _context, _executemany):
                # Not BEGIN: the transactional recipe's own statement.
                if run.records_now(statement) and statement.strip() != "BEGIN":
                    run.add(
                        _with_parameters(statement, parameters),
                        executed=True,
                        flag="autocommit_block" if run.autocommit else None,
                    )

            sa.event.listen(copied, "before_cursor_execute", before)
            env = _environment(run, steps, target)
            try:
                with env:
                    # As a real run: one transaction per step, autocommit_block really runs.
                    _configure(run, env, copied, transaction_per_migration=True)
                    with env.begin_transaction():
                        env.run_migrations()
            except Exception as exc:  # noqa: BLE001 - a revision raised: say which
                raise _plan_failure(run, exc, 0) from None
            finally:
                run.current = None
                sa.event.remove(copied, "before_cursor_execute", before)
    finally:
        if engine is not None:
            engine.dispose()
        for leftover in (path, path + "-journal", path + "-wal", path + "-shm"):
            try:
                os.unlink(leftover)
            except FileNotFoundError:
                pass


# --------------------------------------------------------------- the answer
def _annotated(record: dict[str, Any], mode: str) -> dict[str, Any]:
    """Add to a step's note what its flagged statements mean for it."""
    notes = [record["note"]] if record["note"] else []
    flags = {s["flag"] for s in record["statements"]}
    if flags & {"concurrently", "no_transaction"}:
        notes.append(
            "it runs a statement PostgreSQL refuses inside a transaction block outside "
            "op.get_context().autocommit_block(): a real run fails there (each step runs in a "
            "transaction); put that statement in an autocommit_block"
        )
    if mode == "rolled_back" and "autocommit_block" in flags:
        notes.append("its autocommit_block statements were shown, not run")
    if "transaction_control" in flags:
        notes.append("it ends the transaction with a raw statement: shown, not run")
    record["note"] = "; ".join(notes) or None
    return record


def _limitations(mode: str, records: list[dict[str, Any]], sequences: list[str]) -> list[str]:
    """What this mode could not show, in words, for the whole plan."""
    statements = [s for r in records for s in r["statements"]]
    flagged = sorted({s["flag"] for s in statements if s["flag"]})
    out: list[str] = []
    if mode == "offline":
        out.append(
            "offline rendering: nothing ran, so values a revision reads from the database are "
            "unknown (such revisions are marked not rendered) and locks and table rewrites "
            "are not observed"
        )
        if any(not r["rendered"] for r in records):
            out.append("some steps could not be rendered offline: see their notes")
    elif mode == "rolled_back":
        out.append(
            "every step ran in one transaction that was rolled back: a lock an earlier step "
            "took is not shown again for a later one (a real run commits after each step); "
            "how long a real run waits for its locks depends on the sessions active then"
        )
        if flagged:
            out.append(
                "statements flagged "
                + ", ".join(flagged)
                + " were shown but not run (they cannot run inside the preview's transaction, "
                "or would end it): their effects, and anything that depends on them, are "
                "not in the preview"
            )
        if sequences:
            out.append(
                "sequences advanced by the preview keep their new values (nextval is not "
                "undone by ROLLBACK): " + ", ".join(sequences)
            )
    else:
        out.append(
            "ran on a copy of the database file taken when the preview started; locks are "
            "not observed (SQLite locks the whole file)"
        )
    return out


# ----------------------------------------------------------- revision facts
def revisions_info(script: ScriptDirectory, steps: list[Any]) -> list[dict[str, str]]:
    """For each upgrade step's revision (or revision id): whether it has a real downgrade.

    "missing": the module defines no downgrade; "empty": its body is only
    pass, `...` or a docstring; "ok" otherwise.
    """
    out: list[dict[str, str]] = []
    seen: set[str] = set()
    for item in steps:
        if isinstance(item, str):
            rev = item
        elif getattr(item, "is_upgrade", False) and getattr(item, "revision", None) is not None:
            rev = item.revision.revision
        else:
            continue  # a downgrade or a stamp runs no upgrade of its own
        if rev in seen:
            continue
        seen.add(rev)
        out.append({"revision": rev, "downgrade": _downgrade_state(script.get_revision(rev).path)})
    return out


def _downgrade_state(path: str) -> str:
    """Whether a revision file's downgrade() is "ok", "missing" or "empty"."""
    try:
        tree = ast.parse(Path(path).read_bytes(), filename=path)
    except (OSError, SyntaxError, ValueError):
        return "ok"  # it loaded, so Alembic read it: nothing to say about it
    state = "missing"
    for node in tree.body:  # the last definition wins, as in the module
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "downgrade":
            state = "empty" if all(_is_filler(stmt) for stmt in node.body) else "ok"
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.Import, ast.ImportFrom)):
            names = (
                [a.asname or a.name for a in node.names]
                if isinstance(node, (ast.Import, ast.ImportFrom))
                else [
                    t.id
                    for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                    if isinstance(t, ast.Name)
                ]
            )
            if "downgrade" in names:
                state = "ok"
    return state


def _is_filler(stmt: ast.stmt) -> bool:
    """pass, ... or a docstring: a statement that does nothing."""
    return isinstance(stmt, ast.Pass) or (
        isinstance(stmt, ast.Expr)
        and isinstance(stmt.value, ast.Constant)
        and (isinstance(stmt.value.value, str) or stmt.value.value is Ellipsis)
    )
