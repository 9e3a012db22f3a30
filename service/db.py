"""Retort's own state database: engine, sessions, the declarative base and clock."""

from __future__ import annotations

import datetime as dt
import select
import time
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import JSON, Connection, MetaData, create_engine, event, func, literal_column
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.pool import NullPool

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict: JSON, list: JSON}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def iso(value: dt.datetime | None) -> str | None:
    """Render a stored timestamp as UTC ISO 8601 (SQLite returns naive datetimes)."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


# A pooled state connection idle for longer than this is pinged before use
# (the API's and the workers' pools: see _check_on_checkout).
PING_IDLE_AFTER_S = 10.0


def make_engine(
    url: str,
    *,
    pooled: bool = True,
    ping_idle_after_s: float | None = None,
    pool_size: int = 5,
) -> Engine:
    """Create the state engine; SQLite gets WAL, a busy timeout and BEGIN IMMEDIATE.

    Pooled connections are pinged at each checkout (a round trip), unless
    `ping_idle_after_s` is given: then only those idle for longer are, and the
    others are checked without a round trip (see _check_on_checkout).
    `pool_size` connections are kept; up to 10 more are opened under load and
    closed again when returned (so a pool smaller than the number of threads
    that use it at once opens and closes connections all the time).
    """
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            connect_args={"timeout": 60, "check_same_thread": False},
            poolclass=NullPool,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn, _record):
            # Take over transaction control from pysqlite so every transaction
            # is BEGIN IMMEDIATE: writers queue on the busy timeout instead of
            # failing when a read transaction tries to upgrade to a write.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    if not pooled:
        return create_engine(url, poolclass=NullPool)
    if ping_idle_after_s is None:
        return create_engine(url, pool_pre_ping=True)
    engine = create_engine(url, pool_size=pool_size)
    _check_on_checkout(engine, ping_idle_after_s)
    return engine


def _check_on_checkout(engine: Engine, ping_idle_after_s: float) -> None:
    """Hand out only live connections, with a round trip only after a long idle time.

    A server that restarts (or ends a session) sends a termination notice and
    closes the socket, so an idle connection it ended has input waiting: one
    non-blocking poll of the socket finds it. A connection idle for longer than
    `ping_idle_after_s` is pinged as well, for what a poll cannot see (a
    network path that dropped it silently). Raising DisconnectionError makes
    the pool discard the connection and check out another one.
    """

    @event.listens_for(engine, "checkin")
    def _checkin(_dbapi_conn, record):
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_conn, record, _proxy):
        idle_since = record.info.pop("idle_since", None)
        if idle_since is None:  # a new connection
            return
        fileno = getattr(dbapi_conn, "fileno", None)
        if fileno is None or time.monotonic() - idle_since > ping_idle_after_s:
            try:
                alive = engine.dialect.do_ping(dbapi_conn)
            except engine.dialect.loaded_dbapi.Error:
                alive = False
        else:
            alive = not select.select([fileno()], [], [], 0)[0]
        if not alive:
            raise DisconnectionError("the state database ended this connection")


def make_sessionmaker(engine: Engine, info: dict | None = None) -> sessionmaker[Session]:
    """Sessions of one engine, that record no audit event (service.sessions: those that do)."""
    return sessionmaker(engine, expire_on_commit=False, info=dict(info or {}))


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """Run a unit of work in one transaction: commit on success, roll back on error."""
    with factory() as session, session.begin():
        yield session


@contextmanager
def autocommit(engine: Engine) -> Iterator[Connection]:
    """Lend a connection on which each statement stands alone: a read, or one write.

    On PostgreSQL the connection is in autocommit, so a statement is its own
    snapshot and commits by itself, and the BEGIN and COMMIT (or ROLLBACK)
    round trips of a transaction are saved. Statements that must agree with
    each other use transaction(). SQLite runs them in one transaction,
    committed at the end, as ever (it has no round trips to save).
    """
    if engine.dialect.name != "postgresql":
        with engine.begin() as conn:
            yield conn
        return
    with engine.connect() as conn:
        yield conn.execution_options(isolation_level="AUTOCOMMIT")


def epoch_now(dialect_name: str):
    """Return a SQL expression for the database's clock in epoch seconds.

    Leases compare against the state database's clock, not the worker's, so
    many machines with drifting clocks still agree on when a lease expired.
    """
    if dialect_name == "postgresql":
        return func.extract("epoch", func.clock_timestamp())
    if dialect_name == "sqlite":
        return literal_column("((julianday('now') - 2440587.5) * 86400.0)")
    return func.unix_timestamp(func.now(6))
