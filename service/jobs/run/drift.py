"""In the runner: does the live schema match what the bundle builds at the database's heads?

The bundle's upgrade from base to the live database's heads runs on a
throwaway scratch database (on a scratch server for PostgreSQL and MySQL, a
temporary file for SQLite); the scratch schema is reflected and Alembic's
autogenerate compares it with the live connection. The differences are the
operations that would bring the LIVE database to what the bundle builds.

Runs inside the sandboxed runner only (the build runs the project's revision
code). Imports nothing of Retort's state side.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
import textwrap
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from alembic.autogenerate import produce_migrations, render_python_code
from alembic.config import Config as AlembicConfig
from alembic.operations import ops
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import URL, Connection, Engine

from service import targets
from service.jobs.run.drift_normalize import Normalizer, describe
from service.jobs.run.failure import JobFailure, db_message, locate

SCRATCH_PREFIX = "retort_drift_"
SCRATCH_SETTING = {
    "postgresql": "RETORT_DRIFT_SCRATCH_URL_POSTGRESQL",
    "mysql": "RETORT_DRIFT_SCRATCH_URL_MYSQL",
}
_CONNECT_TIMEOUT_S = 10
_ADMIN_TIMEOUT_S = 120.0  # MySQL's CREATE/DROP DATABASE; a build's own statements are not bounded


def check_drift(
    conn: Connection,
    url: URL,
    script: ScriptDirectory,
    *,
    heads: list[str],
    settings: dict[str, Any],
    scratch_url: URL | None,
    tmp_dir: str | None = None,
    bundle_dir: str | None = None,
) -> dict[str, Any]:
    """Compare the live schema behind `conn` with the one `script` builds at `heads`.

    `conn` is open and not in a transaction; it is left that way. `bundle_dir`
    (default: the script directory) is where a failing revision's file is named from.
    """
    dialect = targets.dialect_of(url)
    version_table = settings.get("version_table") or "alembic_version"
    _check_heads(script, heads)
    try:
        with _scratch(conn, url, dialect, scratch_url, tmp_dir) as (engine, where):
            _build(engine, script, heads, settings, bundle_dir or script.dir)
            built = _reflect(engine, version_table)
        normalizer = Normalizer(conn.dialect)
        upgrade, ctx = _compare(conn, built, settings, normalizer)
        differences = describe(upgrade, normalizer)
        operations = _render(upgrade, ctx)
    finally:
        # The reflection's reads autobegan a transaction; a lost connection has none.
        with contextlib.suppress(sa.exc.SQLAlchemyError):
            targets.rollback(conn)
    return {
        "drifted": bool(differences),
        "heads": sorted(heads),
        "dialect": dialect,
        "scratch": where,
        "differences": differences,
        "operations": operations,
        "ignored": [f"the version table {version_table} (Alembic's own)", *normalizer.ignored()],
    }


def _check_heads(script: ScriptDirectory, heads: list[str]) -> None:
    for head in heads:
        try:
            script.get_revision(head)
        except Exception:  # noqa: BLE001 - Alembic's several "not found" errors
            raise JobFailure(
                "unknown_current_revision",
                f"the database is at {head}, which this bundle does not contain; upload a "
                "bundle that includes it",
                revision=head,
            ) from None


# ------------------------------------------------------------------ scratch
@contextlib.contextmanager
def _scratch(
    conn: Connection, url: URL, dialect: str, scratch_url: URL | None, tmp_dir: str | None
) -> Iterator[tuple[Engine, str]]:
    """A fresh empty database for the build, removed afterwards whatever happens."""
    if dialect == "sqlite":
        fd, path = tempfile.mkstemp(prefix=SCRATCH_PREFIX, suffix=".db", dir=tmp_dir)
        os.close(fd)
        engine = targets.make_target_engine(URL.create("sqlite", database=path), _CONNECT_TIMEOUT_S)
        try:
            yield engine, "sqlite temporary file"
        finally:
            engine.dispose()
            for suffix in ("", "-journal", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path + suffix)
        return

    server = _server_url(url, dialect, scratch_url)
    port = server.port or targets.DEFAULT_PORTS[dialect]
    where = f"{dialect} server {server.host or 'localhost'}:{port}"
    name = SCRATCH_PREFIX + secrets.token_hex(8)
    # A bounded wait for MySQL's CREATE/DROP (a metadata lock); PostgreSQL's are quick.
    wait = _ADMIN_TIMEOUT_S if dialect == "mysql" else None
    admin = targets.make_target_engine(server, _CONNECT_TIMEOUT_S, read_timeout_s=wait)
    admin = admin.execution_options(isolation_level="AUTOCOMMIT")
    statement = _create_statement(conn, dialect, name)
    try:
        with admin.connect() as c:
            c.exec_driver_sql(statement)
    except sa.exc.DBAPIError as exc:
        admin.dispose()
        raise JobFailure(
            "drift_scratch_unavailable",
            f"the drift check could not create a scratch database on the {where} "
            f"({db_message(exc)}). Set {SCRATCH_SETTING[dialect]} to a server where it may "
            "create (and drop) databases",
        ) from None
    engine = targets.make_target_engine(server.set(database=name), _CONNECT_TIMEOUT_S)
    try:
        yield engine, where
    except BaseException as exc:
        left = _drop(engine, admin, dialect, name, where)
        if left and isinstance(exc, JobFailure):
            exc.error["scratch_left"] = left
        raise
    left = _drop(engine, admin, dialect, name, where)
    if left:
        raise JobFailure("drift_scratch_left", left, scratch_database=name)


def _server_url(url: URL, dialect: str, scratch_url: URL | None) -> URL:
    """The server the scratch database goes on: the operator's, else the target's own."""
    if scratch_url is None:
        return url
    named = targets.DRIVERS.get(scratch_url.drivername, scratch_url.drivername)
    if targets.dialect_of(scratch_url.set(drivername=named)) != dialect:
        raise JobFailure(
            "drift_scratch_unavailable",
            f"{SCRATCH_SETTING[dialect]} names a {scratch_url.get_backend_name()} server, "
            f"not a {dialect} one",
        )
    # The target's driver: the one this runner's SQLAlchemy has (1.4: psycopg2).
    return scratch_url.set(drivername=url.drivername)


def _create_statement(conn: Connection, dialect: str, name: str) -> str:
    """The CREATE DATABASE for the scratch database."""
    if dialect == "postgresql":
        return f'CREATE DATABASE "{name}"'
    # The live database's character set and collation: columns that spell
    # theirs out where live leaves them implicit would otherwise differ.
    charset, collation = conn.exec_driver_sql(
        "SELECT @@character_set_database, @@collation_database"
    ).one()
    targets.rollback(conn)  # no transaction left open on live during the build
    return f"CREATE DATABASE `{name}` CHARACTER SET {charset} COLLATE {collation}"


def _drop(engine: Engine, admin: Engine, dialect: str, name: str, where: str) -> str | None:
    """Drop the scratch database; what went wrong, if it stayed."""
    engine.dispose()
    try:
        with admin.connect() as c:
            if dialect == "postgresql":
                # FORCE (PostgreSQL 13+) ends sessions a revision's code may have left open.
                force = " WITH (FORCE)" if c.dialect.server_version_info >= (13,) else ""
                c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"{force}')
            else:
                c.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
        return None
    except sa.exc.DBAPIError as exc:
        return f"the scratch database {name} on the {where} could not be dropped: " + (
            f"{db_message(exc)}; drop it by hand"
        )
    finally:
        admin.dispose()


# -------------------------------------------------------------------- build
def _build(
    engine: Engine,
    script: ScriptDirectory,
    heads: list[str],
    settings: dict[str, Any],
    bundle_dir: str,
) -> None:
    """Run the bundle's upgrade from base to `heads` on the scratch database, as migrate.py does."""
    if not heads:
        return
    planned: list[Any] = []
    applied: list[Any] = []

    def steps(rev, _context):
        planned.extend(script._upgrade_revs(tuple(heads), rev))
        return planned

    naming = settings.get("naming_convention")
    env = EnvironmentContext(AlembicConfig(), script, fn=steps, destination_rev=tuple(heads))
    with engine.connect() as c:
        try:
            with env:
                env.configure(
                    connection=c,
                    transaction_per_migration=True,
                    on_version_apply=lambda ctx, step, heads, run_args: applied.append(step),
                    # The version table stays in the scratch database's own schema:
                    # on MySQL a version_table_schema is another database, maybe live's.
                    version_table=settings.get("version_table") or "alembic_version",
                    target_metadata=sa.MetaData(naming_convention=naming)
                    if naming
                    else sa.MetaData(),
                )
                with env.begin_transaction():
                    env.run_migrations()
        except MemoryError:
            raise  # the runner reports its memory limit
        except Exception as exc:  # noqa: BLE001 - a revision raised on the scratch database
            failed = planned[len(applied)] if len(planned) > len(applied) else None
            revision = getattr(getattr(failed, "revision", None), "revision", None)
            located = locate(exc, bundle_dir)
            at = f" ({located['file']}, line {located['line']})" if located else ""
            named = f"revision {revision}{at}" if revision else f"the bundle{at}"
            raise JobFailure(
                "drift_build_failed",
                f"{named} failed while the bundle was built on the scratch database, so the "
                f"schema it builds is not known: {type(exc).__name__}: {db_message(exc)}",
                revision=revision,
                statement=getattr(exc, "statement", None),
                **located,
            ) from None


def _reflect(engine: Engine, version_table: str) -> sa.MetaData:
    """The scratch schema, reflected the way autogenerate reflects the live one."""
    built = sa.MetaData()
    with engine.connect() as c:
        # Alembic's per-dialect column hook (e.g. PostgreSQL SERIAL defaults
        # left out) runs on the live side; run it here too, so both sides match.
        impl = MigrationContext.configure(c).impl
        sa.event.listen(built, "column_reflect", impl.autogen_column_reflect)
        built.reflect(bind=c, only=lambda name, _md: name != version_table)
    return built


# ------------------------------------------------------------------ compare
def _compare(
    conn: Connection, built: sa.MetaData, settings: dict[str, Any], normalizer: Normalizer
) -> tuple[ops.UpgradeOps, MigrationContext]:
    """Autogenerate's operations from live to `built`, spellings normalized away."""
    version_table = settings.get("version_table") or "alembic_version"
    version_schema = settings.get("version_table_schema")
    default_schema = conn.dialect.default_schema_name

    def include_name(name, type_, parent_names) -> bool:
        in_default = version_schema in (None, default_schema)
        return not (type_ == "table" and name == version_table and in_default)

    ctx = MigrationContext.configure(
        conn,
        opts={
            "target_metadata": built,
            "version_table": version_table,
            "version_table_schema": version_schema,
            "include_name": include_name,
            "compare_type": lambda _c, _ic, _mc, live, ours: normalizer.types_differ(live, ours),
            # Server defaults are compared below: Alembic 1.20's callback path fails on
            # an Identity column ('Identity' has no 'arg'), and its PostgreSQL comparison
            # evaluates both defaults on the live server (nextval() there would
            # advance a live sequence).
            "compare_server_default": False,
        },
    )
    upgrade = produce_migrations(ctx, built).upgrade_ops
    assert upgrade is not None
    _compare_defaults(conn, ctx, built, upgrade, normalizer)
    for table_ops in [o for o in upgrade.ops if isinstance(o, ops.ModifyTableOps)]:
        normalizer.cancel_fk_pairs(table_ops)
        if table_ops.is_empty():
            upgrade.ops.remove(table_ops)
    return upgrade, ctx


def _compare_defaults(
    conn: Connection,
    ctx: MigrationContext,
    built: sa.MetaData,
    upgrade: ops.UpgradeOps,
    normalizer: Normalizer,
) -> None:
    """Add to `upgrade` the server defaults of columns both sides have that differ."""
    names = sorted(set(sa.inspect(conn).get_table_names()) & set(built.tables))
    live = sa.MetaData()
    sa.event.listen(live, "column_reflect", ctx.impl.autogen_column_reflect)
    live.reflect(bind=conn, only=names)
    by_table = {o.table_name: o for o in upgrade.ops if isinstance(o, ops.ModifyTableOps)}
    for name in names:
        ours = built.tables[name].c
        for column in live.tables[name].c:
            if column.name not in ours:
                continue
            wanted = ours[column.name].server_default
            if not normalizer.defaults_differ(column.server_default, wanted):
                continue
            if name not in by_table:
                by_table[name] = ops.ModifyTableOps(name, [])
                upgrade.ops.append(by_table[name])
            alters = [o for o in by_table[name].ops if isinstance(o, ops.AlterColumnOp)]
            alter = next((o for o in alters if o.column_name == column.name), None)
            if alter is None:
                alter = ops.AlterColumnOp(
                    name,
                    column.name,
                    existing_type=column.type,
                    existing_nullable=column.nullable,
                    existing_comment=column.comment,
                )
                by_table[name].ops.append(alter)
            alter.existing_server_default = column.server_default
            alter.modify_server_default = wanted


def _render(upgrade: ops.UpgradeOps, ctx: MigrationContext) -> str:
    """The op calls that would reconcile, as Alembic's autogenerate writes them."""
    if not upgrade.ops:
        return ""
    # Alembic indents every line but the first for a revision's body: undo that.
    return textwrap.dedent("    " + render_python_code(upgrade, migration_context=ctx)) + "\n"
