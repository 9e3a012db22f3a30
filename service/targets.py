"""Connections to target databases: URLs, engines, heads and session locks."""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import os
import socket
import time
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import NullPool, QueuePool

from service.errors import InvalidError

if TYPE_CHECKING:
    from service.config import Config

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


# Query options a target URL may not carry: the drivers let them override the
# host, port or database the URL shows (so the checks below would look at the
# wrong server), or make the connecting process read files of Retort's host.
REFUSED_OPTIONS = {
    "postgresql": ("host", "hostaddr", "port", "dbname", "service", "servicefile", "passfile"),
    "mysql": (
        "host",
        "port",
        "db",
        "database",
        "unix_socket",
        "read_default_file",
        "read_default_group",
        "local_infile",
    ),
    "sqlite": ("uri",),
}
DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306}


def check_target(url: URL, config: Config) -> None:
    """Refuse a target that is Retort itself or the host: 422 with a stable code.

    Refused: Retort's own state database (same dialect family, host, port and
    database; the same file for SQLite, after resolving links), anything in
    its data directory but the targets/ folder, and a SQLite path outside
    `config.sqlite_roots`. Nothing here depends on whether a file exists, so
    the answer tells nothing about the host's files. Hostnames are compared,
    not resolved (a name the API looked up could point elsewhere by the time
    a job runs): the state database's password is what keeps a tenant out of
    it, this check keeps an honest mistake and the obvious attempt out.
    """
    dialect = dialect_of(url)
    refused = sorted(k for k in url.query if k.lower() in REFUSED_OPTIONS[dialect])
    if refused:
        raise InvalidError(
            f"a target URL may not set {', '.join(refused)} in its query string: put the host, "
            "port and database in the URL itself (user:password@host:port/database)",
            {"field": "url", "options": refused},
            code="url_option_not_allowed",
        )
    if dialect == "sqlite":
        _check_sqlite_path(url.database or "", config)
    elif _same_server(url, make_url(config.database_url)):
        raise InvalidError(
            "this URL names Retort's own state database: a target must be another database",
            {"field": "url"},
            code="target_is_retort",
        )


def _same_server(target: URL, state: URL) -> bool:
    family = dialect_of(target)
    if state.get_backend_name() not in ("postgresql", "mysql", "mariadb"):
        return False
    if dialect_of(state) != family:
        return False
    if (target.port or DEFAULT_PORTS[family]) != (state.port or DEFAULT_PORTS[family]):
        return False
    ours, theirs = _database_name(target), _database_name(state)
    if family == "mysql":  # case-insensitive where the server's file system is
        ours, theirs = ours.casefold(), theirs.casefold()
    return ours == theirs and _same_host(target.host, state.host)


def _database_name(url: URL) -> str:
    if dialect_of(url) == "postgresql":  # libpq's default database is the user's name
        return url.database or url.username or ""
    return url.database or ""


def _same_host(target: str | None, state: str | None) -> bool:
    """Whether two URL hosts name one server: every name of this machine counts as one."""
    a, b = _host_key(target), _host_key(state)
    if a == b:
        return True
    try:  # an address literal against the state's (trusted) name
        return str(ipaddress.ip_address(a)) in _addresses(b)
    except ValueError:
        return False


def _host_key(host: str | None) -> str:
    if not host or host.startswith("/"):  # no host, or a socket folder: this machine
        return "localhost"
    host = host.strip("[]").rstrip(".").lower()
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return "localhost" if host in _local_names() else host
    if ip.is_loopback or ip.is_unspecified or _is_own_address(str(ip)):
        return "localhost"
    return str(ip)


@functools.cache
def _local_names() -> frozenset[str]:
    name = socket.gethostname().lower()
    return frozenset({"localhost", "localhost.localdomain", "ip6-localhost", name})


def _is_own_address(ip: str) -> bool:
    """True for an address of one of this machine's interfaces (only those can be bound)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.bind((ip, 0))
        return True
    except OSError:
        return False


@functools.lru_cache(maxsize=8)
def _addresses(host: str) -> frozenset[str]:
    """The addresses of the state database's host name (looked up once; an operator's name)."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return frozenset()
    return frozenset(str(ipaddress.ip_address(str(info[4][0]).split("%")[0])) for info in infos)


def _check_sqlite_path(path: str, config: Config) -> None:
    roots = [os.path.realpath(r) for r in config.sqlite_roots]
    data_dir = os.path.realpath(config.data_dir)
    own_targets = os.path.join(data_dir, "targets")
    if config.sqlite_roots:
        allowed = f"allowed: under {', '.join(config.sqlite_roots)}"
    else:
        allowed = "no folder is allowed"
    how = (
        f"({allowed}; an operator adds a folder to RETORT_SQLITE_ROOTS, "
        f"separated by {os.pathsep!r})"
    )
    details = {"field": "url", "sqlite_roots": list(config.sqlite_roots)}
    if not os.path.isabs(path):
        raise InvalidError(
            f"a SQLite target needs an absolute path (sqlite:////abs/path.db) {how}",
            details,
            code="sqlite_path_not_allowed",
        )
    real = os.path.realpath(path)
    state = make_url(config.database_url)
    if state.get_backend_name() == "sqlite" and state.database:
        state_file = os.path.realpath(state.database)
        # Its -wal, -shm and -journal files as well.
        if real == state_file or real.startswith(state_file + "-") or _same_file(real, state_file):
            raise InvalidError(
                "this path is Retort's own state database: a target must be another database",
                {"field": "url"},
                code="target_is_retort",
            )
    if (real == data_dir or _inside(real, data_dir)) and not _inside(real, own_targets):
        raise InvalidError(
            f"this path is in Retort's data directory, which holds its secrets and state; "
            f"only its targets/ folder may hold targets {how}",
            details,
            code="target_is_retort",
        )
    if not any(_inside(real, root) for root in roots):
        raise InvalidError(
            f"this SQLite path is outside the folders SQLite targets may use {how}",
            details,
            code="sqlite_path_not_allowed",
        )


def _inside(path: str, folder: str) -> bool:
    """Whether `path` lies strictly below `folder` (both real paths)."""
    return path.startswith(folder.rstrip(os.sep) + os.sep) and path != folder


def _same_file(a: str, b: str) -> bool:
    """A hard link to the state file is that file (False when either does not exist)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


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


# A migration's statement may run for hours (an index on a big table): without
# a project statement_timeout_ms, a MySQL read waits this long for an answer.
MIGRATION_READ_TIMEOUT_S = 6 * 3600.0


def migration_read_timeout_s(settings: dict[str, Any], connect_timeout: int) -> float:
    """How long a migration's MySQL read may wait: the project's statement timeout and a margin."""
    stmt_ms = settings.get("statement_timeout_ms")
    if stmt_ms is None:
        return MIGRATION_READ_TIMEOUT_S
    return stmt_ms / 1000 + max(60.0, 2.0 * connect_timeout)


def make_target_engine(
    url: URL,
    connect_timeout: int,
    job_id: int | None = None,
    pooled: bool = False,
    *,
    read_timeout_s: float | None = None,
) -> Engine:
    """Create a target engine whose every wait on the server is bounded; SQLite made transactional.

    Not `pooled`: for one job, its connection closed with it. `pooled`: kept
    by a worker process for the database's next jobs; a connection that sat
    in the pool is pinged before use (the server may have restarted).

    Connecting (and, for MySQL, the server's greeting and the login) takes at
    most `connect_timeout` seconds. A server that stops answering TCP is
    dropped by keepalives after about six times that (see _keepalive).
    `read_timeout_s` bounds a statement's answer: None (a migration) gives
    MySQL reads MIGRATION_READ_TIMEOUT_S and leaves PostgreSQL to the
    project's statement_timeout; a number (a short read, such as the API's
    look at the heads) is MySQL's read timeout and PostgreSQL's statement_timeout.
    """
    dialect = dialect_of(url)
    idle, interval, count = _keepalive(connect_timeout)
    connect_args: dict[str, Any] = {}
    if dialect == "postgresql":
        connect_args = {
            "connect_timeout": connect_timeout,
            "application_name": f"retort job {job_id}" if job_id else "retort",
            "keepalives": 1,
            "keepalives_idle": idle,
            "keepalives_interval": interval,
            "keepalives_count": count,
            # Sent data left unacknowledged this long ends the connection.
            "tcp_user_timeout": (idle + interval * count) * 1000,
        }
    elif dialect == "mysql":
        # PyMySQL waits for ever by default; the greeting and login are reads
        # too, so connect with connect_timeout and lengthen it once logged in.
        connect_args = {
            "connect_timeout": connect_timeout,
            "read_timeout": connect_timeout,
            "write_timeout": idle + interval * count,  # a peer that stopped reading
        }
    elif dialect == "sqlite":
        connect_args = {"timeout": connect_timeout}
    if pooled:
        engine = sa.create_engine(
            url,
            poolclass=QueuePool,  # SQLAlchemy 1.4 (a project's environment) picks NullPool
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
    if dialect == "postgresql" and read_timeout_s is not None:
        statement_ms = max(1, int(read_timeout_s * 1000))

        @sa.event.listens_for(engine, "connect")
        def _pg_connect(dbapi_conn, _record):
            # A SET, not a startup `options` parameter, which PgBouncer refuses.
            dbapi_conn.autocommit = True
            dbapi_conn.execute(f"SET statement_timeout = {statement_ms}")
            dbapi_conn.autocommit = False

    if dialect == "mysql":
        read_timeout = MIGRATION_READ_TIMEOUT_S if read_timeout_s is None else read_timeout_s

        @sa.event.listens_for(engine, "connect")
        def _mysql_connect(dbapi_conn, _record):
            # Runs after SQLAlchemy's first queries on the connection (still
            # under connect_timeout). PyMySQL re-reads _read_timeout before
            # every read and sets SO_KEEPALIVE itself; a contract test pins both.
            dbapi_conn._read_timeout = read_timeout
            _set_keepalive(dbapi_conn._sock, idle, interval, count)

    if dialect == "sqlite" and read_timeout_s is not None:
        # A short read of a tenant's file (the heads): its statements are bounded too.
        # SQLite's busy timeout bounds only a wait for a lock; a view or a recursive
        # query the project put in place of its version table could run for ever.
        limit_s = read_timeout_s

        @sa.event.listens_for(engine, "connect")
        def _sqlite_bounded(dbapi_conn, _record):
            deadline = time.monotonic() + limit_s
            # Non-zero: SQLite interrupts the statement ("interrupted").
            dbapi_conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
            dbapi_conn.execute("PRAGMA query_only = ON")
            dbapi_conn.execute("PRAGMA trusted_schema = OFF")

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


def _keepalive(connect_timeout: int) -> tuple[int, int, int]:
    """TCP keepalive (idle s, interval s, probes): a silent peer is gone after ~6 x connect_timeout.

    A live server acknowledges the probes however long its statement runs, so
    only a dead host or network path ends the connection this way.
    """
    interval = max(1, int(connect_timeout))
    return 2 * interval, interval, 4


def _set_keepalive(sock: socket.socket, idle: int, interval: int, count: int) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", idle),
        ("TCP_KEEPINTVL", interval),
        ("TCP_KEEPCNT", count),
        ("TCP_USER_TIMEOUT", (idle + interval * count) * 1000),
    ):
        if hasattr(socket, name) and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


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
    """Try once to take the session lock on the connection Alembic will use.

    SQLite has no session lock: the worker holds an flock in Retort's data
    directory for the job instead (service/jobs/run/target_files.py).
    """
    dialect = dialect_of(url)
    key, name = lock_key(url, settings)
    if dialect == "postgresql":
        got = conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar()
    elif dialect == "mysql":
        got = conn.execute(sa.text("SELECT GET_LOCK(:n, 0)"), {"n": name}).scalar() == 1
    else:
        raise ValueError("SQLite targets are locked by the worker (SqliteLock), not a session")
    commit(conn)  # never leave a transaction open before Alembic starts (autobegin trap)
    return bool(got)


def commit(conn: Connection) -> None:
    """End the connection's transaction: SQLAlchemy 2's commit, or 1.4's (a project's env).

    A 1.4 connection in its default (not `future`) mode has no commit(): its
    statements autocommit outside an explicit transaction, and one begun is
    committed through the Transaction object.
    """
    if hasattr(conn, "commit"):
        conn.commit()
    elif (trans := conn.get_transaction()) is not None:
        trans.commit()


def rollback(conn: Connection) -> None:
    if hasattr(conn, "rollback"):
        conn.rollback()
    elif (trans := conn.get_transaction()) is not None:
        trans.rollback()


def release_session_lock(conn: Connection, url: URL, settings: dict[str, Any]) -> None:
    dialect = dialect_of(url)
    key, name = lock_key(url, settings)
    if dialect == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    elif dialect == "mysql":
        conn.execute(sa.text("SELECT RELEASE_LOCK(:n)"), {"n": name})
    commit(conn)


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
    commit(conn)


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


def end_session(url: URL, session_id: int, connect_timeout: int) -> None:
    """End a target session from another one (its runner was killed): its locks go at once.

    PostgreSQL `pg_terminate_backend`, MySQL/MariaDB `KILL`; SQLite has no
    server session (the killed process held the file). Bounded like every
    target connection.
    """
    dialect = dialect_of(url)
    if dialect not in ("postgresql", "mysql"):
        return
    killer = make_target_engine(url, connect_timeout, read_timeout_s=10)
    try:
        with killer.connect() as other:
            if dialect == "postgresql":
                other.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": session_id})
            else:
                other.exec_driver_sql(f"KILL {int(session_id)}")
    finally:
        killer.dispose()
