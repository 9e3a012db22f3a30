"""Connections to target databases: URLs, engines, heads and session locks."""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from typing import Any

import sqlalchemy as sa
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import NullPool

from service.errors import InvalidError

DRIVERS = {
    "postgresql": "postgresql+psycopg",
    "postgres": "postgresql+psycopg",
    "postgresql+psycopg": "postgresql+psycopg",
    "mysql": "mysql+pymysql",
    "mariadb": "mariadb+pymysql",
    "mysql+pymysql": "mysql+pymysql",
    "mariadb+pymysql": "mariadb+pymysql",
    "sqlite": "sqlite",
    "sqlite+pysqlite": "sqlite",
}


def normalize_url(raw: str) -> URL:
    """Parse a target URL and pick the driver Retort ships for its dialect."""
    try:
        url = make_url(raw)
    except (ArgumentError, ValueError):
        raise InvalidError(
            "url is not a database URL (e.g. postgresql://user:pass@host/db)",
            {"field": "url"},
        ) from None
    driver = DRIVERS.get(url.drivername)
    if driver is None:
        raise InvalidError(
            f"unsupported database type {url.drivername!r}: use postgresql, mysql, "
            "mariadb or sqlite",
            {"field": "url", "supported": ["postgresql", "mysql", "mariadb", "sqlite"]},
        )
    secret_keys = sorted(k for k in url.query if k.lower() in ("password", "sslpassword"))
    if secret_keys:
        raise InvalidError(
            f"put the password in the URL's user part (user:password@host), not in the query "
            f"string ({', '.join(secret_keys)}): only that part is masked everywhere",
            {"field": "url"},
        )
    url = url.set(drivername=driver)
    if driver == "sqlite" and (not url.database or url.database == ":memory:"):
        raise InvalidError(
            "a SQLite target needs a file path (sqlite:////abs/path.db)", {"field": "url"}
        )
    return url


def dialect_of(url: URL) -> str:
    name = url.get_backend_name()
    return "mysql" if name in ("mysql", "mariadb") else name


def mask_url(url: URL) -> str:
    return url.render_as_string(hide_password=True)


def scrub(text: str, url: URL | None) -> str:
    """Remove a URL's password from any text before it is stored or shown."""
    if url is None or not url.password:
        return text
    password = str(url.password)
    out = text.replace(password, "***")
    quoted = url.render_as_string(hide_password=False)
    return out.replace(quoted, mask_url(url))


def make_target_engine(
    url: URL, connect_timeout: int, job_id: int | None = None, pooled: bool = False
) -> Engine:
    """Create a target engine with a connect timeout, SQLite made transactional.

    Not `pooled`: for one job, its connection closed with it. `pooled`: kept
    by a worker process for the database's next jobs; a connection that sat
    in the pool is pinged before use (the server may have restarted).
    """
    dialect = dialect_of(url)
    connect_args: dict[str, Any] = {}
    if dialect == "postgresql":
        connect_args = {
            "connect_timeout": connect_timeout,
            "application_name": f"retort job {job_id}" if job_id else "retort",
        }
    elif dialect == "mysql":
        connect_args = {"connect_timeout": connect_timeout}
    elif dialect == "sqlite":
        connect_args = {"timeout": connect_timeout}
    if pooled:
        engine = sa.create_engine(
            url,
            pool_size=1,
            max_overflow=1,
            pool_pre_ping=dialect != "sqlite",
            connect_args=connect_args,
            # No statement cache: Alembic builds its version table and
            # operations anew for every run, so a compiled statement is never
            # used again; kept, each cached one is a graph of objects that the
            # cycle collector walks on every full collection.
            query_cache_size=0,
        )
    else:
        engine = sa.create_engine(url, poolclass=NullPool, connect_args=connect_args)
    if dialect == "sqlite":
        # SQLAlchemy's "pysqlite transactional" recipe: without it pysqlite
        # commits DDL on its own and a failed revision leaves a half-built table.
        @sa.event.listens_for(engine, "connect")
        def _connect(dbapi_conn, _record):
            dbapi_conn.isolation_level = None

        @sa.event.listens_for(engine, "begin")
        def _begin(conn):
            conn.exec_driver_sql("BEGIN")

    return engine


def read_heads(conn: Connection, settings: dict[str, Any]) -> list[str]:
    """Read the current heads from the version table without creating anything."""
    ctx = MigrationContext.configure(
        conn,
        opts={
            "version_table": settings.get("version_table") or "alembic_version",
            "version_table_schema": settings.get("version_table_schema"),
        },
    )
    return sorted(ctx.get_current_heads())


def lock_key(url: URL, settings: dict[str, Any]) -> tuple[int, str]:
    """Derive the target-side lock: a bigint for PostgreSQL, a ≤64-char name for MySQL."""
    scope = f"{url.database}:{settings.get('version_table_schema') or ''}:" + (
        settings.get("version_table") or "alembic_version"
    )
    digest = hashlib.sha256(scope.encode()).digest()
    key = int.from_bytes(digest[:8], "big", signed=True)
    return key, "retort:" + digest.hex()[:40]


def try_session_lock(conn: Connection, url: URL, settings: dict[str, Any]) -> bool:
    """Try once to take the session lock on the connection Alembic will use."""
    dialect = dialect_of(url)
    key, name = lock_key(url, settings)
    if dialect == "postgresql":
        got = conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar()
    elif dialect == "mysql":
        got = conn.execute(sa.text("SELECT GET_LOCK(:n, 0)"), {"n": name}).scalar() == 1
    else:
        got = _try_file_lock(conn, url)
    conn.commit()  # never leave a transaction open before Alembic starts (autobegin trap)
    return bool(got)


def _try_file_lock(conn: Connection, url: URL) -> bool:
    """SQLite has no session lock: flock a file beside the database instead.

    Like a session lock it dies with the process, so a killed job frees it.
    """
    fd = conn.info.get("retort_lock_fd")
    if fd is None:
        fd = os.open(f"{url.database}.retort-lock", os.O_RDWR | os.O_CREAT, 0o600)
        conn.info["retort_lock_fd"] = fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def release_session_lock(conn: Connection, url: URL, settings: dict[str, Any]) -> None:
    dialect = dialect_of(url)
    key, name = lock_key(url, settings)
    if dialect == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    elif dialect == "mysql":
        conn.execute(sa.text("SELECT RELEASE_LOCK(:n)"), {"n": name})
    else:
        fd = conn.info.pop("retort_lock_fd", None)
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the flock
    conn.commit()


def apply_session_settings(conn: Connection, url: URL, settings: dict[str, Any]) -> None:
    """Set the project's lock and statement timeouts for this session."""
    dialect = dialect_of(url)
    lock_ms = settings.get("lock_timeout_ms")
    stmt_ms = settings.get("statement_timeout_ms")
    if dialect == "postgresql":
        if lock_ms is not None:
            conn.exec_driver_sql(f"SET lock_timeout = {int(lock_ms)}")
        if stmt_ms is not None:
            conn.exec_driver_sql(f"SET statement_timeout = {int(stmt_ms)}")
    elif dialect == "mysql":
        if lock_ms is not None:
            # Metadata-lock wait for DDL; MySQL counts whole seconds (at least 1).
            conn.exec_driver_sql(f"SET SESSION lock_wait_timeout = {max(1, round(lock_ms / 1000))}")
            conn.exec_driver_sql(
                f"SET SESSION innodb_lock_wait_timeout = {max(1, round(lock_ms / 1000))}"
            )
        if stmt_ms is not None:
            if conn.dialect.is_mariadb:
                conn.exec_driver_sql(f"SET SESSION max_statement_time = {stmt_ms / 1000:.3f}")
            else:
                conn.exec_driver_sql(f"SET SESSION max_execution_time = {int(stmt_ms)}")
    conn.commit()


def connect_with_retries(
    engine: Engine, attempts: int, backoff_s: float, on_retry=None
) -> Connection:
    """Connect, retrying with exponential backoff; raise the last error after `attempts`."""
    delay = backoff_s
    for attempt in range(1, attempts + 1):
        try:
            return engine.connect()
        except sa.exc.OperationalError as exc:
            if attempt == attempts:
                raise
            if on_retry:
                on_retry(attempt, exc)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def interrupt(conn: Connection, url: URL) -> None:
    """Stop the statement running on `conn`, from another thread (the lease was lost)."""
    dbapi_conn = conn.connection.dbapi_connection
    dialect = dialect_of(url)
    if dialect == "sqlite":
        dbapi_conn.interrupt()
    elif dialect == "postgresql":
        dbapi_conn.cancel()
    else:
        # MySQL cancels a statement only from another session.
        killer = sa.create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 5})
        try:
            with killer.connect() as other:
                other.exec_driver_sql(f"KILL QUERY {int(dbapi_conn.thread_id())}")
        finally:
            killer.dispose()
