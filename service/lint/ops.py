"""Describe what a statement does as ops: the dialect-neutral facts the rules read."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

# PostgreSQL lock modes, spelled as pg_locks.mode (and the runner's observed locks).
AE = "AccessExclusiveLock"
SUE = "ShareUpdateExclusiveLock"
SRE = "ShareRowExclusiveLock"
SHARE = "ShareLock"
# Alembic's batch mode rebuilds a SQLite table as _alembic_tmp_<t>: copy, drop, rename.
BATCH_PREFIX = "_alembic_tmp_"


class Kind(StrEnum):
    """What an op does."""

    CREATE_TABLE = "create_table"
    CREATE_INDEX = "create_index"
    DROP_INDEX = "drop_index"
    ADD_COLUMN = "add_column"
    DROP_COLUMN = "drop_column"
    ALTER_TYPE = "alter_type"  # PostgreSQL ALTER COLUMN ... TYPE
    MODIFY_COLUMN = "modify_column"  # MySQL MODIFY / CHANGE (name = old name of a CHANGE)
    SET_NOT_NULL = "set_not_null"
    ADD_CONSTRAINT = "add_constraint"  # detail: foreign_key | check | unique | primary_key
    RENAME_TABLE = "rename_table"  # name = new name
    RENAME_COLUMN = "rename_column"  # column = old, name = new
    DROP_TABLE = "drop_table"
    TRUNCATE = "truncate"
    MYSQL_OPTION = "mysql_option"  # detail: "ALGORITHM=COPY"
    LOCK_TIMEOUT = "lock_timeout"  # detail: milliseconds, or "reset"
    TRANSACTION = "transaction"  # detail: begin | end
    DML = "dml"  # detail: UPDATE | DELETE
    VERSION_TABLE = "version_table"  # the statement maintains Alembic's version table
    OTHER = "other"  # takes a lock (see Op.lock) but no rule looks closer


class Flag(StrEnum):
    """Facts about an op that some rule cares about."""

    CONCURRENT = "concurrent"
    UNIQUE = "unique"
    NOT_NULL = "not_null"
    EXPLICIT_NULL = "explicit_null"  # the definition says NULL out loud (MySQL MODIFY)
    DEFAULT = "default"  # existing rows get a value: DEFAULT, identity, generated, serial
    NOT_VALID = "not_valid"
    USING_INDEX = "using_index"
    USING = "using"  # ALTER COLUMN TYPE ... USING expr
    LOCAL = "local"  # SET LOCAL
    NO_WHERE = "no_where"
    NO_TRANSACTION = "no_transaction"  # PostgreSQL refuses it inside a transaction block


@dataclass(frozen=True, slots=True)
class Op:
    """One action of a statement on one table (or index), with what the rules need."""

    kind: Kind
    table: str | None = None  # lowercase; "schema.table" when the SQL qualifies it
    column: str | None = None
    name: str | None = None  # index or constraint name; new name of a rename
    type: str | None = None  # column type as SQL text
    lock: str | None = None  # PostgreSQL lock mode taken on `table` (pg_locks spelling)
    flags: frozenset[str] = frozenset()
    detail: str | None = None  # kind-specific, see Kind


@dataclass(frozen=True, slots=True)
class Parsed:
    """What one statement does, or why the lint cannot tell."""

    ops: tuple[Op, ...] = ()
    error: str | None = None  # set when the statement was not (fully) parsed
    opaque: str | None = None  # a kind of statement the rules cannot see into ("a DO block")


def bare(name: str) -> str:
    """Return a table name without its schema."""
    return name.rsplit(".", 1)[-1]
