"""In the runner: what a preview observes on the live target.

For a rolled-back PostgreSQL preview: the locks a statement took (pg_locks),
the tables it rewrote (pg_class.relfilenode), the sequences the preview
advanced (pg_sequences), and which statements cannot run inside a transaction
at all. Those reads go through the raw DBAPI connection, so they never reach
SQLAlchemy's events (and the captured SQL). For the lint: which tables exist
and their estimated rows (live_tables). Imports nothing of Retort's state
side: it runs next to tenant code in the sandboxed runner.
"""

from __future__ import annotations

import re
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from service import targets

# Schemas of the server's own catalogs and of temporary objects: never reported.
_SYSTEM_SCHEMAS = """
    n.nspname NOT IN ('pg_catalog', 'information_schema')
    AND n.nspname NOT LIKE 'pg\\_toast%'
    AND n.nspname NOT LIKE 'pg\\_temp\\_%'
"""

_RELATIONS = f"""
SELECT c.oid, n.nspname, c.relname, c.relkind, c.relfilenode
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE {_SYSTEM_SCHEMAS}
"""

_LOCKS = """
SELECT relation, mode FROM pg_catalog.pg_locks
WHERE pid = pg_catalog.pg_backend_pid() AND locktype = 'relation' AND granted
"""

_SEQUENCES = "SELECT schemaname, sequencename, last_value FROM pg_catalog.pg_sequences"

# Tables whose storage a rewrite replaces: plain, materialized, partitioned.
_TABLE_KINDS = ("r", "m", "p")

# Statements after which a table's relfilenode may have changed: only these are
# followed by a re-read of pg_class, to keep the preview cheap.
_MAY_REWRITE = re.compile(r"^(ALTER|CLUSTER|VACUUM|TRUNCATE|REFRESH|DO|CALL)\b", re.IGNORECASE)

# PostgreSQL refuses these inside a transaction block ("cannot run inside a
# transaction block"): a preview shows them without running them.
_CONCURRENTLY = re.compile(
    r"^(CREATE\s+(UNIQUE\s+)?INDEX|DROP\s+INDEX|REINDEX\b.*?)\s+CONCURRENTLY\b"
    r"|^ALTER\s+TABLE\b.*\bDETACH\s+PARTITION\b.*\bCONCURRENTLY\b",
    re.IGNORECASE | re.DOTALL,
)
_NO_TRANSACTION = re.compile(
    r"^(VACUUM|CREATE\s+DATABASE|DROP\s+DATABASE|ALTER\s+SYSTEM|CREATE\s+TABLESPACE"
    r"|DROP\s+TABLESPACE|REINDEX\s+(\(.*?\)\s*)?(DATABASE|SYSTEM))\b",
    re.IGNORECASE | re.DOTALL,
)
# Statements that would end the preview's outer transaction (and so persist
# what ran before them). SAVEPOINT, RELEASE and ROLLBACK TO stay: SQLAlchemy's
# nested transactions use them and they leave the outer transaction open.
_ENDS_TRANSACTION = re.compile(
    r"^(COMMIT|END|ABORT|PREPARE\s+TRANSACTION"
    r"|ROLLBACK(?!\s+((TRANSACTION|WORK)\s+)?TO\b))\b",
    re.IGNORECASE,
)
_LEADING_COMMENTS = re.compile(r"^(\s+|--[^\n]*(\n|$)|/\*.*?\*/)*", re.DOTALL)


def head(sql: str) -> str:
    """The statement without its leading whitespace and comments."""
    return _LEADING_COMMENTS.sub("", sql, count=1)


def no_transaction_flag(sql: str) -> str | None:
    """'concurrently' or 'no_transaction' for a statement PostgreSQL refuses in a transaction."""
    text = head(sql)
    if _CONCURRENTLY.match(text):
        return "concurrently"
    if _NO_TRANSACTION.match(text):
        return "no_transaction"
    return None


def ends_transaction(sql: str) -> bool:
    """Whether a statement would commit or roll back the preview's outer transaction."""
    return bool(_ENDS_TRANSACTION.match(head(sql)))


def _rows(dbapi_conn: Any, sql: str, params: Any = None) -> list[tuple]:
    """Rows of a query run on the driver's connection (no SQLAlchemy events)."""
    cur = dbapi_conn.cursor()
    try:
        cur.execute(sql, params)
        return list(cur.fetchall())
    finally:
        cur.close()


class PgObserver:
    """Locks, rewrites and sequences of one rolled-back preview, read on its own session.

    All reads run inside the preview's transaction, so they see what its
    statements did before the final ROLLBACK undoes it.
    """

    def __init__(self, dbapi_conn: Any) -> None:
        self.dbapi_conn = dbapi_conn
        self.names: dict[int, str] = {}  # oid -> "schema.name" of relations that existed
        self.filenodes: dict[int, int] = {}  # table oid -> relfilenode, as last seen
        self.held: set[tuple[int, str]] = set()  # (relation oid, mode) the session holds
        self.sequences_at_start: dict[str, Any] = {}

    def start(self) -> None:
        """At the preview's start: the sequences' values."""
        self.sequences_at_start = self._sequences()

    def start_step(self) -> None:
        """At each step's start: the relations that exist now (a real run committed the
        previous steps: their tables are ordinary tables for this one)."""
        self.names, self.filenodes = {}, {}
        # Locks Alembic took between steps (reading and updating its version table) are
        # not a statement's: count them as held already.
        self.held = self._locks()
        for oid, schema, name, kind, filenode in _rows(self.dbapi_conn, _RELATIONS):
            self.names[int(oid)] = f"{schema}.{name}"
            if kind in _TABLE_KINDS:
                self.filenodes[int(oid)] = int(filenode)

    def after_statement(self, dbapi_conn: Any, sql: str) -> tuple[list[dict], list[str]]:
        """The locks the session newly took during a statement, and the tables it rewrote.

        Locks on relations the statement created are left out (nobody else can
        wait on them), and so are those the session already held: PostgreSQL
        keeps a lock to the end of the transaction.
        """
        now = self._locks(dbapi_conn)
        new, self.held = now - self.held, now
        locks = sorted(
            ({"relation": self.names[oid], "mode": mode} for oid, mode in new if oid in self.names),
            key=lambda lock: (lock["relation"], lock["mode"]),
        )
        rewrote: list[str] = []
        if self.filenodes and _MAY_REWRITE.match(head(sql)):
            rows = _rows(
                dbapi_conn,
                "SELECT oid, relfilenode FROM pg_catalog.pg_class WHERE oid = ANY(%s)",
                (list(self.filenodes),),
            )
            for oid, filenode in rows:
                oid, filenode = int(oid), int(filenode)
                # A partitioned parent has no storage (relfilenode 0): never a rewrite.
                if filenode and filenode != self.filenodes[oid]:
                    rewrote.append(self.names[oid])
                self.filenodes[oid] = filenode
        return locks, sorted(rewrote)

    def sequences_advanced(self) -> list[str]:
        """Sequences whose value moved since the start: nextval is not undone by ROLLBACK."""
        now = self._sequences()
        return sorted(
            name
            for name, value in self.sequences_at_start.items()
            if name in now and now[name] != value
        )

    def _locks(self, dbapi_conn: Any = None) -> set[tuple[int, str]]:
        rows = _rows(dbapi_conn or self.dbapi_conn, _LOCKS)
        return {(int(oid), str(mode)) for oid, mode in rows}

    def _sequences(self) -> dict[str, Any]:
        # last_value is NULL for a sequence never used (or one the role may not read).
        return {f"{s}.{n}": v for s, n, v in _rows(self.dbapi_conn, _SEQUENCES)}


# ------------------------------------------------------ tables on the target
def live_tables(
    conn: Connection, dialect: str, names: set[str], version_table: str
) -> dict[str, int | None]:
    """Which of these tables exist on the target, with their estimated rows (None: unknown).

    Keys are "schema.table" and the bare "table" (PostgreSQL: the one on the
    search path). SQLite counts rows up to 1001 (more: 1001). The version table
    is left out. The connection's transaction is ended if this call began it.
    """
    wanted = {_unquote(n) for n in names if n}
    bare = {n.rpartition(".")[2] for n in wanted} - {version_table}
    if not bare:
        return {}
    began = not conn.in_transaction()
    try:
        if dialect == "postgresql":
            found = _pg_tables(conn, bare)
        elif dialect == "mysql":
            found = _mysql_tables(conn, bare)
        else:
            found = _sqlite_tables(conn, bare)
    finally:
        if began:
            targets.rollback(conn)
    return found


def _unquote(name: str) -> str:
    """A table name without its identifier quotes."""
    return ".".join(part.strip('"`[]') for part in name.split("."))


def _pg_tables(conn: Connection, names: set[str]) -> dict[str, int | None]:
    """PostgreSQL: the planner's estimate (pg_class.reltuples), in every user schema."""
    rows = conn.execute(
        sa.text(
            "SELECT n.nspname, c.relname, c.reltuples, pg_catalog.pg_table_is_visible(c.oid) "
            "FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('r', 'p', 'm', 'f') AND c.relname = ANY(:names) "
            "AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
            "AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'"
        ),
        {"names": sorted(names)},
    )
    found: dict[str, int | None] = {}
    for schema, name, reltuples, visible in rows:
        # -1: never vacuumed or analyzed (PostgreSQL 14+): unknown, not empty.
        estimate = None if reltuples is None or reltuples < 0 else int(round(reltuples))
        found[f"{schema}.{name}"] = estimate
        if visible:
            found[name] = estimate
    return found


def _mysql_tables(conn: Connection, names: set[str]) -> dict[str, int | None]:
    """MySQL/MariaDB: information_schema's estimate, in the connection's database."""
    rows = conn.execute(
        sa.text(
            "SELECT table_schema, table_name, table_rows FROM information_schema.tables "
            "WHERE table_schema = DATABASE() AND table_type = 'BASE TABLE' "
            "AND table_name IN :names"
        ).bindparams(sa.bindparam("names", expanding=True)),
        {"names": sorted(names)},
    )
    found: dict[str, int | None] = {}
    for schema, name, table_rows in rows:
        estimate = None if table_rows is None else int(table_rows)
        found[f"{schema}.{name}"] = found[name] = estimate
    return found


def _sqlite_tables(conn: Connection, names: set[str]) -> dict[str, int | None]:
    """SQLite: no statistics to read, so a count that stops at 1001 rows."""
    existing = [
        row[0]
        for row in conn.execute(
            sa.text(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name IN :names"
            ).bindparams(sa.bindparam("names", expanding=True)),
            {"names": sorted(names)},
        )
    ]
    if not existing:
        return {}
    quote = conn.dialect.identifier_preparer.quote
    # One query for all: each count stops at 1001 rows, so a big table costs nothing.
    union = " UNION ALL ".join(
        f"SELECT {i}, count(*) FROM (SELECT 1 FROM {quote(name)} LIMIT 1001)"
        for i, name in enumerate(existing)
    )
    found: dict[str, int | None] = {}
    for i, count in conn.exec_driver_sql(union):
        found[existing[i]] = found[f"main.{existing[i]}"] = int(count)
    return found
