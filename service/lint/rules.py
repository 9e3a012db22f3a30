"""The lint's checks, one function per check (or per form of it).

An op check is a function of (run, statement, op) returning a Finding or None,
registered with @_check for its code and the op kinds it reads; the code's
dialects (codes.py) decide where it runs, and plan.py walks the plan calling
them. The statement- and plan-level checks (unparsed or opaque statements,
observed rewrites, the lock_timeout, downgrades) come last.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from service.lint.codes import Finding, Severity
from service.lint.ops import BATCH_PREFIX, Flag, Kind, Op, Parsed, bare

if TYPE_CHECKING:  # plan.py calls the checks; they only read the run's state
    from service.lint.plan import RevisionInfo, Run, Statement

# Findings that already say the statement rewrites its table.
_EXPLAINS_REWRITE = frozenset({"volatile_default", "column_type_changed"})

Check = Callable[["Run", "Statement", Op], "Finding | None"]
# Op kind -> (code, check), in registration order.
CHECKS: dict[Kind, list[tuple[str, Check]]] = {}


def _check(code: str, *kinds: Kind) -> Callable[[Check], Check]:
    """Register a check of `code` for ops of `kinds` (run in registration order)."""

    def register(check: Check) -> Check:
        for kind in kinds:
            CHECKS.setdefault(kind, []).append((code, check))
        return check

    return register


def _observed_rewrite(stmt: Statement) -> tuple[bool, dict | None]:
    """Return (a rewrite is possible, the observation to cite)."""
    if stmt.rewrote is None:
        return True, None
    return bool(stmt.rewrote), ({"rewrote": list(stmt.rewrote)} if stmt.rewrote else None)


@_check("index_not_concurrent", Kind.CREATE_INDEX)
def _index_not_concurrent(run: Run, stmt: Statement, op: Op) -> Finding | None:
    target = run.live_target(op.table)
    if target is None or Flag.CONCURRENT in op.flags:
        return None
    unique = "UNIQUE " if Flag.UNIQUE in op.flags else ""
    return run.finding(
        "index_not_concurrent",
        stmt,
        f"CREATE {unique}INDEX {op.name or ''} on {target.about()} without CONCURRENTLY: "
        f"PostgreSQL holds a SHARE lock on {target.name}, blocking INSERT, UPDATE and DELETE "
        "until the build finishes.",
        table=target.name,
    )


@_check("concurrently_in_transaction", Kind.CREATE_INDEX, Kind.DROP_INDEX, Kind.OTHER)
def _no_transaction(run: Run, stmt: Statement, op: Op) -> Finding | None:
    if Flag.NO_TRANSACTION not in op.flags or not stmt.in_transaction:
        return None
    return run.finding(
        "concurrently_in_transaction",
        stmt,
        f"{op.detail} cannot run inside a transaction block: PostgreSQL refuses it and the "
        "revision fails.",
        table=op.table,
    )


def _not_valid(run: Run, stmt: Statement, op: Op, code: str, lock: str) -> Finding | None:
    target = run.live_target(op.table)
    if target is None or Flag.NOT_VALID in op.flags:
        return None
    what = (op.detail or "").replace("_", " ").upper()
    return run.finding(
        code,
        stmt,
        f"ADD CONSTRAINT {op.name or ''} {what} on {target.about()} without NOT VALID: "
        f"PostgreSQL checks every existing row while holding {lock.format(table=target.name)}.",
        table=target.name,
    )


@_check("foreign_key_without_not_valid", Kind.ADD_CONSTRAINT)
def _foreign_key_without_not_valid(run: Run, stmt: Statement, op: Op) -> Finding | None:
    if op.detail != "foreign_key":
        return None
    lock = "SHARE ROW EXCLUSIVE on {table} and on the referenced table, blocking their writes"
    return _not_valid(run, stmt, op, "foreign_key_without_not_valid", lock)


@_check("check_without_not_valid", Kind.ADD_CONSTRAINT)
def _check_without_not_valid(run: Run, stmt: Statement, op: Op) -> Finding | None:
    if op.detail != "check":
        return None
    lock = "ACCESS EXCLUSIVE on {table}, blocking reads and writes"
    return _not_valid(run, stmt, op, "check_without_not_valid", lock)


@_check("set_not_null", Kind.SET_NOT_NULL)
def _set_not_null(run: Run, stmt: Statement, op: Op) -> Finding | None:
    target = run.live_target(op.table)
    if target is None:
        return None
    return run.finding(
        "set_not_null",
        stmt,
        f"ALTER COLUMN {op.column} SET NOT NULL on {target.about()}: PostgreSQL scans every "
        "row under ACCESS EXCLUSIVE (reads and writes wait) unless a valid CHECK "
        f"({op.column} IS NOT NULL) already proves it.",
        table=target.name,
    )


@_check("not_null_without_default", Kind.ADD_COLUMN)
def _not_null_without_default(run: Run, stmt: Statement, op: Op) -> Finding | None:
    if Flag.NOT_NULL not in op.flags or Flag.DEFAULT in op.flags or not op.table:
        return None
    target = run.schema.get(op.table)
    added = f"ADD COLUMN {op.column} {op.type or ''} NOT NULL without a DEFAULT"
    if run.dialect == "sqlite":  # refused whatever the table holds
        if not target.exists:
            return None
        message = f"{added} on {target.name}: SQLite refuses it on any table."
    elif not target.live:
        return None
    elif run.dialect == "mysql":
        message = (
            f"{added} on {target.about()}: MySQL fills the existing rows with the type's "
            "implicit default (0, '', or a zero date, which the default sql_mode rejects)."
        )
    elif target.rows is not None and target.rows > 0 and not target.assumed:
        message = (
            f"{added} on {target.name}: it will fail, because {target.name} has about "
            f"{target.rows:,} rows and they have no value for the column."
        )
    else:
        message = f"{added} on {target.about()}: it fails if {target.name} holds any row."
    return run.finding("not_null_without_default", stmt, message, table=target.name)


@_check("volatile_default", Kind.ADD_COLUMN)
def _volatile_default(run: Run, stmt: Statement, op: Op) -> Finding | None:
    target = run.live_target(op.table)
    possible, observed = _observed_rewrite(stmt)
    if target is None or not op.detail or not possible:
        return None
    return run.finding(
        "volatile_default",
        stmt,
        f"ADD COLUMN {op.column} with {op.detail} on {target.about()}: PostgreSQL computes "
        "it for every existing row, rewriting the table under ACCESS EXCLUSIVE.",
        table=target.name,
        observed=observed,
    )


def _widening(type_text: str) -> str | None:
    """Return when a PostgreSQL change to `type_text` avoids a rewrite, if it can."""
    base, _, mods = type_text.lower().partition("(")
    base = base.strip()
    if base == "text":
        return "no rewrite if the column is VARCHAR or TEXT now"
    if base in ("varchar", "character varying"):
        if mods:
            return f"no rewrite if the column is VARCHAR of at most {mods.rstrip(')')} now"
        return "no rewrite if the column is VARCHAR(n) or TEXT now"
    if base in ("numeric", "decimal") and not mods:
        return "no rewrite if the column is NUMERIC(p,s) now"
    return None


@_check("column_type_changed", Kind.ALTER_TYPE)
def _column_type_changed(run: Run, stmt: Statement, op: Op) -> Finding | None:
    target = run.live_target(op.table)
    possible, observed = _observed_rewrite(stmt)
    if target is None or not possible:
        return None
    change = f"ALTER COLUMN {op.column} TYPE {op.type} on {target.about()}"
    widening = None if Flag.USING in op.flags else _widening(op.type or "")
    if observed:
        message = f"{change}: observed rewriting {', '.join(stmt.rewrote or ())}."
    elif widening:
        message = (
            f"{change}: possibly a safe widening ({widening}); the lint does not know the old "
            "type, and any other change rewrites the table under ACCESS EXCLUSIVE."
        )
        return run.finding(
            "column_type_changed", stmt, message, table=target.name, severity=Severity.INFO
        )
    else:
        using = " with a USING expression" if Flag.USING in op.flags else ""
        message = (
            f"{change}{using}: PostgreSQL rewrites the table and its indexes under ACCESS "
            "EXCLUSIVE unless the old type is binary-coercible (integer to bigint is not)."
        )
    return run.finding("column_type_changed", stmt, message, table=target.name, observed=observed)


@_check("column_renamed", Kind.MODIFY_COLUMN)
def _mysql_change_rename(run: Run, stmt: Statement, op: Op) -> Finding | None:
    target = run.live_target(op.table)
    if target is None or not op.name or op.name.lower() == (op.column or "").lower():
        return None
    return run.finding(
        "column_renamed",
        stmt,
        f"CHANGE {op.name} {op.column} renames a column of {target.about()}: running code "
        f"that uses {op.name} fails. The definition is restated as {op.type}; if that "
        "differs from the current type, MySQL also copies the table.",
        table=target.name,
    )


@_check("column_type_changed", Kind.MODIFY_COLUMN)
def _mysql_modify(run: Run, stmt: Statement, op: Op) -> Finding | None:
    target = run.live_target(op.table)
    if target is None or (op.name and op.name.lower() != (op.column or "").lower()):
        return None  # a CHANGE that renames: column_renamed says it
    return run.finding(
        "column_type_changed",
        stmt,
        f"MODIFY {op.column} {op.type} on {target.about()}: the lint does not know the old "
        "type; if it differs, MySQL copies the table (ALGORITHM=COPY), blocking writes.",
        table=target.name,
    )


@_check("mysql_modify_drops_not_null", Kind.MODIFY_COLUMN)
def _modify_drops_not_null(run: Run, stmt: Statement, op: Op) -> Finding | None:
    if Flag.EXPLICIT_NULL not in op.flags:
        return None
    verb = f"CHANGE {op.name} {op.column}" if op.name else f"MODIFY {op.column}"
    return run.finding(
        "mysql_modify_drops_not_null",
        stmt,
        f"{verb} {op.type} NULL on {op.table}: if {op.column} is NOT NULL now, this makes it "
        "nullable. Alembic renders NULL when alter_column() gets type_ without "
        "existing_nullable.",
        table=op.table,
    )


@_check("unique_added_inline", Kind.ADD_CONSTRAINT, Kind.ADD_COLUMN)
def _unique_added_inline(run: Run, stmt: Statement, op: Op) -> Finding | None:
    target = run.live_target(op.table)
    if op.kind == Kind.ADD_COLUMN:
        inline = Flag.UNIQUE in op.flags
        what = f"ADD COLUMN {op.column} with UNIQUE/PRIMARY KEY"
    else:
        inline = op.detail in ("unique", "primary_key") and Flag.USING_INDEX not in op.flags
        what = f"ADD CONSTRAINT {op.name or ''} {(op.detail or '').replace('_', ' ').upper()}"
    if target is None or not inline:
        return None
    if run.dialect == "mysql":
        effect = (
            "MySQL builds the index in place (a PRIMARY KEY rebuilds the table) and fails at "
            "the end of the build if existing rows hold duplicates."
        )
    else:
        effect = (
            f"PostgreSQL builds the index while holding ACCESS EXCLUSIVE on {target.name}, "
            "blocking reads and writes for the whole build."
        )
    return run.finding(
        "unique_added_inline", stmt, f"{what} on {target.about()}: {effect}", table=target.name
    )


@_check("table_dropped", Kind.DROP_TABLE)
def _table_dropped(run: Run, stmt: Statement, op: Op) -> Finding | None:
    target = run.live_target(op.table)
    if target is None or run.schema.is_batch_drop(target.name):
        return None
    return run.finding(
        "table_dropped",
        stmt,
        f"DROP TABLE {target.about()}: its rows are lost; a downgrade cannot bring them back.",
        table=target.name,
    )


@_check("column_dropped", Kind.DROP_COLUMN)
def _column_dropped(run: Run, stmt: Statement, op: Op) -> Finding | None:
    target = run.live_target(op.table)
    if target is None or run.schema.column_added(op.table, op.column):
        return None
    return run.finding(
        "column_dropped",
        stmt,
        f"DROP COLUMN {op.column} of {target.about()}: its data is lost, and running code that "
        "still selects it fails.",
        table=target.name,
    )


@_check("table_renamed", Kind.RENAME_TABLE)
def _table_renamed(run: Run, stmt: Statement, op: Op) -> Finding | None:
    target = run.live_target(op.table)
    if target is None or bare(target.name).startswith(BATCH_PREFIX):
        return None
    return run.finding(
        "table_renamed",
        stmt,
        f"Table {target.about()} renamed to {op.name}: running code that uses {target.name} "
        "fails until it is redeployed.",
        table=target.name,
    )


@_check("column_renamed", Kind.RENAME_COLUMN)
def _column_renamed(run: Run, stmt: Statement, op: Op) -> Finding | None:
    target = run.live_target(op.table)
    if target is None or run.schema.column_added(op.table, op.column):
        return None
    return run.finding(
        "column_renamed",
        stmt,
        f"Column {op.column} of {target.about()} renamed to {op.name}: running code that uses "
        f"{op.column} fails until it is redeployed.",
        table=target.name,
    )


_MYSQL_OPTION_EFFECTS = {
    "ALGORITHM=COPY": "MySQL copies the whole table, blocking writes until it is done",
    "LOCK=SHARED": "writes are blocked for the whole ALTER",
    "LOCK=EXCLUSIVE": "reads and writes are blocked for the whole ALTER",
}


@_check("mysql_algorithm_copy", Kind.MYSQL_OPTION)
def _mysql_algorithm_copy(run: Run, stmt: Statement, op: Op) -> Finding | None:
    target = run.live_target(op.table)
    if target is None:
        return None
    return run.finding(
        "mysql_algorithm_copy",
        stmt,
        f"{op.detail} on {target.about()}: {_MYSQL_OPTION_EFFECTS[op.detail or '']}.",
        table=target.name,
    )


@_check("raw_sql_unanalysed", Kind.DML)
def _dml_without_where(run: Run, stmt: Statement, op: Op) -> Finding | None:
    target = run.live_target(op.table)
    if not stmt.raw or target is None or Flag.NO_WHERE not in op.flags:
        return None
    return run.finding(
        "raw_sql_unanalysed",
        stmt,
        f"Hand-written {op.detail} without WHERE touches every row of {target.about()} in one "
        "statement, holding their row locks until the transaction ends.",
        table=target.name,
    )


def unreadable(run: Run, stmt: Statement, parsed: Parsed) -> Finding | None:
    """Say so when a statement cannot be analysed: never silently fine."""
    if stmt.raw and parsed.opaque:
        message = (
            f"Hand-written SQL ({parsed.opaque}): the lint cannot see what it locks, rewrites "
            "or deletes."
        )
        return run.finding("raw_sql_unanalysed", stmt, message)
    if parsed.error:
        return run.finding("unparsed_statement", stmt, f"Not analysed: {parsed.error}.")
    return None


def table_rewrite(
    run: Run, stmt: Statement, rewritten: list[str], found: list[Finding]
) -> Finding | None:
    """Report an observed rewrite of existing tables that no other finding explains."""
    if run.dialect != "postgresql" or not rewritten:
        return None
    if any(f.code in _EXPLAINS_REWRITE for f in found):
        return None
    message = (
        f"Observed: this statement rewrote {', '.join(rewritten)} (new relfilenode), holding "
        "ACCESS EXCLUSIVE for the whole rewrite."
    )
    observed = {"rewrote": list(stmt.rewrote or ())}
    return run.finding("table_rewrite", stmt, message, table=rewritten[0], observed=observed)


def lock_timeout(run: Run) -> tuple[Statement, Finding] | None:
    """Report the first statement that locks existing data with no lock_timeout."""
    if not run.unguarded:
        return None
    stmt, relation, observed = run.unguarded[0]
    count = len(run.unguarded)
    others = f"; {count - 1} later statement(s) of the plan do too" if count > 1 else ""
    how = "was observed taking" if observed else "takes"
    message = (
        f"This statement {how} an ACCESS EXCLUSIVE lock on {relation} with no lock_timeout "
        f"set{others}. While it waits for the lock, every query on {relation} queues behind it."
    )
    table = relation if run.live_target(relation) else None
    return stmt, run.finding("missing_lock_timeout", stmt, message, table=table, observed=observed)


def irreversible_downgrades(run: Run, revisions: list[RevisionInfo]) -> list[Finding]:
    """Report each revision whose downgrade() is missing or does nothing."""
    found = []
    for info in revisions:
        if info.downgrade in ("missing", "empty"):
            what = "has no" if info.downgrade == "missing" else "has an empty"
            message = (
                f"Revision {info.revision} {what} downgrade(): `alembic downgrade` past it would "
                "not undo its upgrade."
            )
            found.append(
                run.finding("irreversible_downgrade", None, message, revision=info.revision)
            )
    return found
