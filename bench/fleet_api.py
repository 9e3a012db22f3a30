"""Fleet way (b): Alembic's Python API in one process, serially, one ScriptDirectory.

    python bench/fleet_api.py SCRIPT_ROOT URLS_FILE

Prints {"seconds": ..., "load_ms": ...} on stdout: the time from before the
ScriptDirectory is loaded to the last database upgraded (imports excluded, as
Retort's start-up is excluded from way (c)). Each database gets what Retort
gives it: its own connection, SQLite made transactional (SQLAlchemy's
pysqlite recipe) and one transaction per revision.
"""

from __future__ import annotations

import json
import sys
import time

import sqlalchemy as sa
from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.script import ScriptDirectory


def engine_for(url: str) -> sa.Engine:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    if url.startswith("sqlite"):

        @sa.event.listens_for(engine, "connect")
        def _connect(dbapi_conn, _record):
            dbapi_conn.isolation_level = None

        @sa.event.listens_for(engine, "begin")
        def _begin(conn):
            conn.exec_driver_sql("BEGIN")

    return engine


def upgrade(script: ScriptDirectory, url: str, config: Config | None = None) -> None:
    """One database from where it is to head, as Retort runs it."""
    engine = engine_for(url)
    with engine.connect() as conn:
        env = EnvironmentContext(
            config or Config(),
            script,
            fn=lambda rev, _ctx: script._upgrade_revs("head", rev),
            destination_rev="head",
        )
        with env:
            env.configure(connection=conn, transaction_per_migration=True)
            with env.begin_transaction():
                env.run_migrations()
    engine.dispose()


def main() -> None:
    root, urls_file = sys.argv[1], sys.argv[2]
    urls = [u for u in open(urls_file).read().split() if u]
    started = time.perf_counter()
    script = ScriptDirectory(root, version_locations=[f"{root}/versions"])
    script.revision_map.heads  # noqa: B018 - load every revision file once
    loaded = time.perf_counter()
    config = Config()
    for url in urls:
        upgrade(script, url, config)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "load_ms": (loaded - started) * 1000}))


if __name__ == "__main__":
    main()
