"""Register every lint check: its stable code, severity, default action and advice.

The codes are an API: project policies, allow-lists and stored job reports name
them, so a code is never renamed or reused. docs/lint.md has one section per
code, headed by the code itself (its anchor).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum


class Severity(StrEnum):
    """How bad a finding is, independent of what the project does about it."""

    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


class Action(StrEnum):
    """What a project's policy does with a code's findings."""

    BLOCK = "block"
    WARN = "warn"
    OFF = "off"


PG = ("postgresql",)
PG_MY = ("postgresql", "mysql")
MY = ("mysql",)
ALL = ("postgresql", "mysql", "sqlite")


@dataclass(frozen=True, slots=True)
class CodeInfo:
    """One check: what it is called, how severe it is and what to do about it."""

    code: str
    severity: str
    default_action: str
    title: str
    advice: str
    dialects: tuple[str, ...] = ALL

    @property
    def anchor(self) -> str:
        """Return the check's section in the documentation."""
        return f"docs/lint.md#{self.code}"


@dataclass(slots=True)
class Finding:
    """One problem the lint found, tied to the revision and statement that cause it."""

    code: str
    severity: str
    revision: str | None
    statement: str | None
    statement_index: int | None
    message: str
    advice: str
    table: str | None = None
    observed: dict | None = None

    def as_dict(self) -> dict:
        """Return the finding as plain JSON-able data."""
        return asdict(self)


def _info(
    code: str,
    severity: Severity,
    title: str,
    advice: str,
    dialects: tuple[str, ...] = ALL,
    action: Action = Action.WARN,
) -> CodeInfo:
    return CodeInfo(code, str(severity), str(action), title, advice, dialects)


_E, _W, _I = Severity.ERROR, Severity.WARNING, Severity.INFO

_REGISTRY = [
    _info(
        "index_not_concurrent",
        _W,
        "Index built without CONCURRENTLY on an existing table",
        "Build it with op.create_index(..., postgresql_concurrently=True) inside "
        "`with op.get_context().autocommit_block():`. A failed concurrent build leaves an "
        "INVALID index: drop it and retry.",
        PG,
    ),
    _info(
        "concurrently_in_transaction",
        _E,
        "Statement PostgreSQL refuses inside a transaction block",
        "Run it inside `with op.get_context().autocommit_block():`.",
        PG,
        Action.BLOCK,
    ),
    _info(
        "foreign_key_without_not_valid",
        _W,
        "Foreign key validated while it is added",
        "Add it with op.create_foreign_key(..., postgresql_not_valid=True), then validate it "
        "in a later statement: op.execute('ALTER TABLE <table> VALIDATE CONSTRAINT <name>') "
        "takes SHARE UPDATE EXCLUSIVE, so reads and writes continue during the scan.",
        PG,
    ),
    _info(
        "check_without_not_valid",
        _W,
        "CHECK constraint validated while it is added",
        "Add it with op.create_check_constraint(..., postgresql_not_valid=True), then "
        "op.execute('ALTER TABLE <table> VALIDATE CONSTRAINT <name>') in a later statement.",
        PG,
    ),
    _info(
        "set_not_null",
        _W,
        "SET NOT NULL scans the table under ACCESS EXCLUSIVE",
        "On PostgreSQL 12+: op.create_check_constraint('ck_<table>_<col>_nn', '<table>', "
        "'<col> IS NOT NULL', postgresql_not_valid=True); then VALIDATE CONSTRAINT; then "
        "op.alter_column(..., nullable=False), which skips the scan because the valid CHECK "
        "proves it; then drop the CHECK.",
        PG,
    ),
    _info(
        "not_null_without_default",
        _E,
        "NOT NULL column added without a default",
        "Give the column a server_default (on PostgreSQL 11+ a constant default costs no "
        "rewrite), or add it nullable, backfill it, then make it NOT NULL.",
    ),
    _info(
        "volatile_default",
        _W,
        "Column added with a volatile default: the table is rewritten",
        "Add the column without a default (or with a constant one), backfill it in batches, "
        "then set the default for new rows with op.alter_column(..., server_default=...).",
        PG,
    ),
    _info(
        "column_type_changed",
        _W,
        "Column type changed",
        "Prefer expand and contract: add a column of the new type, backfill it, move readers "
        "and writers, drop the old one. On PostgreSQL, VARCHAR(n) to a larger n, VARCHAR to "
        "TEXT and NUMERIC(p,s) to NUMERIC are binary-coercible and do not rewrite.",
    ),
    _info(
        "unique_added_inline",
        _W,
        "UNIQUE or PRIMARY KEY built while the table is locked",
        "PostgreSQL: op.create_index('<name>', '<table>', [...], unique=True, "
        "postgresql_concurrently=True) in an autocommit_block, then op.execute('ALTER TABLE "
        "<table> ADD CONSTRAINT <name> UNIQUE USING INDEX <name>'). MySQL: check for "
        "duplicates first; the build fails at its end if there are any.",
        PG_MY,
    ),
    _info(
        "table_dropped",
        _E,
        "Table dropped: its data is lost",
        "Ship the code that stops using the table first and keep a backup; allow this code "
        "for the revision when the loss is intended.",
        action=Action.BLOCK,
    ),
    _info(
        "column_dropped",
        _E,
        "Column dropped: its data is lost",
        "Stop reading and writing the column in a release first (remove it from the model), "
        "then drop it; allow this code for the revision when the loss is intended.",
        action=Action.BLOCK,
    ),
    _info(
        "table_renamed",
        _W,
        "Table renamed: running code still uses the old name",
        "Create the new table (or a view under the old name) and migrate in steps, or allow "
        "this code when no old code runs during the deploy.",
    ),
    _info(
        "column_renamed",
        _W,
        "Column renamed: running code still uses the old name",
        "Add the new column, write both, backfill, move readers, then drop the old one; or "
        "allow this code when no old code runs during the deploy.",
    ),
    _info(
        "missing_lock_timeout",
        _W,
        "ACCESS EXCLUSIVE lock taken without a lock_timeout",
        'Set one before the first locking statement, e.g. op.execute("SET lock_timeout = '
        "'5s'\") at the start of upgrade() or in env.py, or set the project's lock timeout in "
        "Retort. While a statement waits for ACCESS EXCLUSIVE, every query behind it waits too.",
        PG,
    ),
    _info(
        "mysql_algorithm_copy",
        _W,
        "ALTER TABLE forces a copying or write-blocking algorithm",
        "Drop the ALGORITHM=COPY / LOCK= clause so MySQL picks INSTANT or INPLACE, or ask for "
        "ALGORITHM=INPLACE, LOCK=NONE so MySQL refuses instead of blocking writes.",
        MY,
    ),
    _info(
        "mysql_modify_drops_not_null",
        _W,
        "MODIFY restates the column as NULL",
        "Pass existing_nullable=False (and existing_server_default, existing_comment) to "
        "op.alter_column(...): MySQL's MODIFY replaces the whole column definition.",
        MY,
    ),
    _info(
        "irreversible_downgrade",
        _W,
        "Revision cannot be downgraded",
        "Write a downgrade() that reverses upgrade(), or raise an error in it that says why "
        "the revision cannot be reversed.",
    ),
    _info(
        "unparsed_statement",
        _W,
        "Statement the lint could not parse",
        "Review the statement by hand; allow this code for the revision once it is checked.",
    ),
    _info(
        "raw_sql_unanalysed",
        _I,
        "Hand-written SQL the lint cannot reason about",
        "Review the op.execute() SQL by hand (locks, rewrites, rows touched); prefer an "
        "Alembic operation where one exists.",
    ),
    _info(
        "table_rewrite",
        _W,
        "Statement rewrote an existing table",
        "The table stays ACCESS EXCLUSIVE locked for the whole rewrite: schedule it, or change "
        "the migration so it does not rewrite.",
        PG,
    ),
    # Not raised by lint(): the worker adds it when a project refuses to migrate a
    # database whose newest drift check failed (settings.drift.refuse_when_drifted).
    _info(
        "database_drifted",
        _E,
        "Database schema drifted from what its revision builds",
        "See `retort drift DB`: reconcile the schema, or approve the job.",
        action=Action.BLOCK,
    ),
]

CODES: dict[str, CodeInfo] = {info.code: info for info in _REGISTRY}
