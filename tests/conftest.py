"""Real backends for every test run: throwaway databases, real Retort processes.

A backend that is not reachable fails the run (never skips): the README's test
command starts the installed servers first and says what is missing.
"""

from __future__ import annotations

import itertools
import os
import sys
import uuid
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa

from tests.helpers import Retort, free_port

PG_ADMIN = os.environ.get("RETORT_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
MY_ADMIN = os.environ.get("RETORT_TEST_MYSQL", "mysql+pymysql://root@127.0.0.1:3306/")
REDIS = os.environ.get("RETORT_TEST_REDIS", "redis://127.0.0.1:6379/0")

RUN_ID = uuid.uuid4().hex[:8]
_counter = itertools.count(1)


def _require(name: str, check) -> None:
    try:
        check()
    except Exception as exc:  # noqa: BLE001
        pytest.fail(
            f"{name} is not reachable ({type(exc).__name__}: {exc}). The test suite needs it: "
            "run ./scripts/test, which starts installed servers, or see README.md.",
            pytrace=False,
        )


class Databases:
    """Create uniquely named databases on the real servers; drop them at the end."""

    def __init__(self) -> None:
        self.pg = sa.create_engine(
            PG_ADMIN, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool
        )
        self.my = sa.create_engine(
            MY_ADMIN, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool
        )
        self.created: list[tuple[str, str]] = []

    def new(self, dialect: str, tmp: Path | None = None) -> str:
        name = f"rt_{RUN_ID}_{next(_counter)}"
        if dialect == "postgresql":
            with self.pg.connect() as c:
                c.exec_driver_sql(f'CREATE DATABASE "{name}"')
            self.created.append(("postgresql", name))
            return self.pg.url.set(database=name).render_as_string(hide_password=False)
        if dialect == "mysql":
            with self.my.connect() as c:
                c.exec_driver_sql(f"CREATE DATABASE `{name}`")
            self.created.append(("mysql", name))
            return self.my.url.set(database=name).render_as_string(hide_password=False)
        if dialect == "sqlite":
            assert tmp is not None
            return f"sqlite:///{tmp / (name + '.db')}"
        raise ValueError(dialect)

    def drop_all(self) -> None:
        for dialect, name in reversed(self.created):
            try:
                if dialect == "postgresql":
                    with self.pg.connect() as c:
                        c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                else:
                    with self.my.connect() as c:
                        c.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
            except Exception as exc:  # noqa: BLE001
                print(f"could not drop {dialect} database {name}: {exc}", file=sys.stderr)
        self.pg.dispose()
        self.my.dispose()


@pytest.fixture(scope="session")
def backends():
    """Fail the run at once when PostgreSQL, MariaDB or Redis is missing."""

    def ping_sql(url: str):
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as c:
                c.exec_driver_sql("SELECT 1")
        finally:
            engine.dispose()

    def ping_redis():
        with redis.Redis.from_url(REDIS) as r:
            r.ping()

    _require("PostgreSQL at " + PG_ADMIN, lambda: ping_sql(PG_ADMIN))
    _require("MariaDB/MySQL at " + MY_ADMIN, lambda: ping_sql(MY_ADMIN))
    _require("Redis at " + REDIS, ping_redis)
    dbs = Databases()
    yield dbs
    dbs.drop_all()


@pytest.fixture
def new_db(backends, tmp_path):
    """new_db(dialect) -> URL of a fresh, empty target database."""
    return lambda dialect: backends.new(dialect, tmp_path)


# Where tests may register SQLite targets: pytest's base temporary folder, so
# every tmp_path qualifies (set before any other session fixture runs).
SQLITE_ROOTS: list[str] = []


@pytest.fixture(scope="session", autouse=True)
def _sqlite_roots(tmp_path_factory):
    SQLITE_ROOTS[:] = [str(tmp_path_factory.getbasetemp())]


def _base_env(data_dir: Path) -> dict[str, str]:
    assert SQLITE_ROOTS, "the _sqlite_roots fixture has not run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETORT_")}
    env.update(
        {
            "RETORT_DATA_DIR": str(data_dir),
            "RETORT_SQLITE_ROOTS": os.pathsep.join(SQLITE_ROOTS),
            "RETORT_ADMIN_TOKEN": "test-admin-" + RUN_ID,
            "RETORT_AUDIT_KEY": "test-audit-key-" + RUN_ID,
            "RETORT_CONNECT_ATTEMPTS": "2",
            "RETORT_CONNECT_BACKOFF_S": "0.1",
            "RETORT_CONNECT_TIMEOUT_S": "2",
            "RETORT_LEASE_TTL_S": "6",
            "RETORT_LOCK_WAIT_TIMEOUT_S": "120",
            "RETORT_SWEEP_INTERVAL_S": "1",
            "RETORT_AUDIT_CHECKPOINT_INTERVAL_S": "2",
            "RETORT_DRIFT_SWEEP_INTERVAL_S": "1",
            "RETORT_LINT_RENDER_TIMEOUT_S": "2",
            "RETORT_REDISPATCH_AFTER_S": "3",
            "RETORT_WEBHOOK_BACKOFF_S": "0.5",
            "RETORT_WEBHOOK_BACKOFF_MAX_S": "2",
            "RETORT_WEBHOOK_TIMEOUT_S": "2",
            "RETORT_WEBHOOK_ALLOW_NETWORKS": "127.0.0.0/8,::1/128",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


@pytest.fixture(scope="session")
def prod(backends, tmp_path_factory):
    """Production layout: PostgreSQL state, Redis broker, gunicorn, two worker processes."""
    data_dir = tmp_path_factory.mktemp("prod")
    state = backends.new("postgresql")
    port = free_port()
    env = _base_env(data_dir)
    env.update(
        {
            "RETORT_DATABASE_URL": state,
            "RETORT_BROKER_URL": REDIS,
            "RETORT_QUEUE": f"retort-test-{RUN_ID}",
            "RETORT_PORT": str(port),
        }
    )
    from cryptography.fernet import Fernet

    env["RETORT_SECRET_KEY"] = Fernet.generate_key().decode()
    server = Retort(env, port, env["RETORT_ADMIN_TOKEN"], data_dir)
    try:
        subprocess_run([sys.executable, "-m", "service.cli", "db", "upgrade"], env)
        server.spawn("api", [sys.executable, "-m", "service.cli", "api", "--port", str(port)])
        server.start_worker("w1")
        server.start_worker("w2")
        server.spawn("webhooks", [sys.executable, "-m", "service.cli", "webhooks"])
        server.spawn("beat", [sys.executable, "-m", "service.cli", "beat"])
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def embedded(backends, tmp_path_factory):
    """The embedded default, started exactly as the README says: `retort serve`."""
    data_dir = tmp_path_factory.mktemp("embedded")
    port = free_port()
    env = _base_env(data_dir)
    env.pop("RETORT_ADMIN_TOKEN")
    server = Retort(env, port, "", data_dir)
    try:
        server.spawn(
            "serve",
            [
                sys.executable,
                "-m",
                "service.cli",
                "serve",
                "--port",
                str(port),
                "--data-dir",
                str(data_dir),
            ],
        )
        server.wait_ready()
        server.token = (data_dir / "admin-token").read_text().strip()
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["prod", "embedded"])
def retort(request):
    """Each end-to-end test runs against both layouts."""
    return request.getfixturevalue(request.param)


def subprocess_run(args: list[str], env: dict[str, str]) -> None:
    import subprocess

    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    if out.returncode:
        raise RuntimeError(f"{args} failed:\n{out.stdout}\n{out.stderr}")
