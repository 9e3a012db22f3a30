"""Walk a job's plan statement by statement, keeping what it has changed so far.

The rules read a table's state at the point of the plan a statement runs: a
table created earlier in the plan holds no data worth protecting (squawk#349's
complaint about linters that flag an index on a table made in the same
migration), a renamed one keeps its rows under its new name, and a SQLite batch
rebuild's DROP TABLE is a copy, not a loss. lint() and tables_referenced() are
the entry points; the checks themselves are in rules.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from service.lint import rules
from service.lint.codes import CODES, Finding
from service.lint.ops import AE, BATCH_PREFIX, Flag, Kind, Op, bare
from service.lint.parse import parse

DIALECTS = ("postgresql", "mysql", "sqlite")
_ALIASES = {"mariadb": "mysql"}  # SQLAlchemy's name for MariaDB; sqlglot reads it as MySQL
_MAX_STATEMENT_CHARS = 2000  # a finding quotes its statement; DO blocks can be huge


@dataclass
class Statement:
    """One statement of the plan, with what the runner observed while running it."""

    sql: str
    revision: str | None
    index: int = 0
    raw: bool = False
    in_transaction: bool = True
    locks: list[dict] | None = None
    rewrote: list[str] | None = None


@dataclass
class RevisionInfo:
    """A revision of the plan and whether its downgrade() does anything ("ok")."""

    revision: str
    downgrade: str


@dataclass
class LiveState:
    """Tables on the target before the job (lowercase name -> estimated rows)."""

    tables: dict[str, int | None] = field(default_factory=dict)
    known: bool = True
    lock_timeout_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Target:
    """What the lint knows about one table at one point of the plan."""

    name: str
    exists: bool
    created: bool = False  # created earlier in this plan: holds no data worth protecting
    rows: int | None = None
    assumed: bool = False  # the live state could not be read: assumed to exist

    @property
    def live(self) -> bool:
        """Return whether the table holds data from before the job."""
        return self.exists and not self.created

    def about(self) -> str:
        """Describe the table with what is known of its size."""
        if self.assumed:
            return f"{self.name} (assumed to exist: the live state could not be read)"
        if self.rows is None or self.rows < 0:
            return f"{self.name} (row count unknown)"
        if self.rows == 0:
            return f"{self.name} (estimated empty)"
        return f"{self.name} (about {self.rows:,} rows)"


class Schema:
    """The target's tables as the plan has them so far: live state plus the plan's changes."""

    def __init__(self, live: LiveState, version_table: str) -> None:
        self._live = live
        self._exact = {k.lower(): v for k, v in live.tables.items()}
        self._bare: dict[str, int | None] = {}
        for name, rows in self._exact.items():
            self._bare.setdefault(bare(name), rows)
        # Keyed by bare name: plans rarely use one table name in two schemas.
        self._plan: dict[str, Target] = {}
        self.columns_added: set[tuple[str, str]] = set()
        self.indexes_created: set[str] = set()
        self.version_tables = {bare(version_table.lower())}

    def get(self, name: str) -> Target:
        """Return what is known of table `name` at this point of the plan."""
        key = bare(name)
        if key in self._plan:
            return replace(self._plan[key], name=name)
        if not self._live.known:
            return Target(name, True, assumed=True)
        if name in self._exact:
            return Target(name, True, rows=self._exact[name])
        if key in self._bare:
            return Target(name, True, rows=self._bare[key])
        return Target(name, False)

    def is_batch_drop(self, table: str) -> bool:
        """Return whether dropping `table` is a batch rebuild (its copy was just made)."""
        copy = self._plan.get(BATCH_PREFIX + bare(table))
        return copy is not None and copy.created

    def apply(self, op: Op) -> None:
        """Record what `op` changes for the statements after it."""
        table = op.table or ""
        if op.kind == Kind.CREATE_TABLE:
            self._plan[bare(table)] = Target(table, True, created=True)
        elif op.kind == Kind.DROP_TABLE:
            if self.is_batch_drop(table):  # the copy now holds the live rows
                self._plan[BATCH_PREFIX + bare(table)] = self.get(table)
            self._plan[bare(table)] = Target(table, False)
        elif op.kind == Kind.RENAME_TABLE and op.name:
            self._plan[bare(op.name)] = self.get(table)
            self._plan[bare(table)] = Target(table, False)
        elif op.kind == Kind.ADD_COLUMN and op.column:
            self.columns_added.add((bare(table), op.column.lower()))
        elif op.kind == Kind.RENAME_COLUMN and self.column_added(table, op.column):
            self.columns_added.add((bare(table), (op.name or "").lower()))
        elif op.kind == Kind.CREATE_INDEX and op.name:
            self.indexes_created.add(bare(op.name))

    def column_added(self, table: str | None, column: str | None) -> bool:
        """Return whether the plan added `column` to `table` earlier."""
        return (bare(table or ""), (column or "").lower()) in self.columns_added


class Run:
    """One lint run: the plan's schema so far, the lock_timeout in force, unguarded locks."""

    def __init__(self, dialect: str, live: LiveState, version_table: str) -> None:
        self.dialect = dialect
        self.live = live
        self.schema = Schema(live, version_table)
        self.session_timeout = live.lock_timeout_ms or 0
        self.local_timeout: int | None = None  # SET LOCAL: until the transaction ends
        # Statements that take ACCESS EXCLUSIVE on existing data with no lock_timeout:
        # (statement, relation, observation).
        self.unguarded: list[tuple[Statement, str, dict | None]] = []

    def finding(
        self, code: str, stmt: Statement | None, message: str, *, revision: str | None = None, **kw
    ) -> Finding:
        """Build a finding of `code`, with the registry's severity and advice by default."""
        info = CODES[code]
        sql = stmt.sql if stmt else None
        if sql and len(sql) > _MAX_STATEMENT_CHARS:
            sql = sql[:_MAX_STATEMENT_CHARS] + " …"
        return Finding(
            code=code,
            severity=str(kw.pop("severity", info.severity)),
            revision=stmt.revision if stmt else revision,
            statement=sql,
            statement_index=stmt.index if stmt else None,
            message=message,
            advice=kw.pop("advice", info.advice),
            **kw,
        )

    def live_target(self, table: str | None) -> Target | None:
        """Return the table if it holds data from before the job, else None."""
        target = self.schema.get(table) if table else None
        return target if target is not None and target.live else None

    def apply(self, stmt: Statement, op: Op) -> None:
        """Record what `op` changes: the schema, or the lock_timeout in force."""
        if op.kind == Kind.LOCK_TIMEOUT:
            if op.detail == "reset":
                ms = self.live.lock_timeout_ms or 0
            else:
                ms = int(op.detail or 0)
            if Flag.LOCAL not in op.flags:
                self.session_timeout, self.local_timeout = ms, None
            elif stmt.in_transaction:  # SET LOCAL outside a transaction does nothing
                self.local_timeout = ms
        elif op.kind == Kind.TRANSACTION and op.detail == "end":
            self.local_timeout = None
        else:
            self.schema.apply(op)

    def maintains_version_table(self, ops: tuple[Op, ...]) -> bool:
        """Return whether a statement is Alembic's own bookkeeping (learning its table)."""
        versions = self.schema.version_tables
        versions.update(bare(op.table) for op in ops if op.kind == Kind.VERSION_TABLE and op.table)
        tables = [bare(op.table) for op in ops if op.table]
        return bool(tables) and all(t in versions for t in tables)

    def live_relations(self, names: list[str], ops: tuple[Op, ...]) -> list[str]:
        """Keep the observed relations that are tables holding data from before the job."""
        named = {bare(op.table) for op in ops if op.table}
        kept = []
        for name in names:
            target = self.schema.get(name.lower())
            # Unreadable live state: trust only the tables the statement itself names, so
            # the new indexes and TOAST tables of a CREATE TABLE do not count.
            if target.live and (not target.assumed or bare(name.lower()) in named):
                kept.append(name)
        return kept

    def locks_existing(self, op: Op) -> bool:
        """Return whether an op takes ACCESS EXCLUSIVE on something older than the job."""
        if op.lock != AE:
            return False
        if op.table:
            return self.live_target(op.table) is not None
        return bool(op.name) and bare(op.name or "") not in self.schema.indexes_created

    def note_lock(self, stmt: Statement, relations: list[str], observed: dict | None) -> None:
        """Count `stmt` as unguarded if it locks `relations` with no lock_timeout in force."""
        timeout = self.session_timeout
        if stmt.in_transaction and self.local_timeout is not None:
            timeout = self.local_timeout
        if relations and not timeout and not any(u[0] is stmt for u in self.unguarded):
            self.unguarded.append((stmt, relations[0], observed))


def _check_statement(run: Run, stmt: Statement) -> list[Finding]:
    """Return the findings of one statement and record what it changes."""
    parsed = parse(run.dialect, stmt.sql)
    if unreadable := rules.unreadable(run, stmt, parsed):
        return [unreadable]
    if parsed.opaque or run.maintains_version_table(parsed.ops):
        return []
    rewritten = run.live_relations(stmt.rewrote or [], parsed.ops)
    if stmt.locks is not None:  # observed beats inferred
        locked = [lk.get("relation", "") for lk in stmt.locks if lk.get("mode") == AE]
        run.note_lock(stmt, run.live_relations(locked, parsed.ops), {"locks": stmt.locks})
    found = []
    for op in parsed.ops:
        if stmt.locks is None and run.locks_existing(op):
            run.note_lock(stmt, [op.table or op.name or ""], None)
        for code, check in rules.CHECKS.get(op.kind, ()):
            if run.dialect in CODES[code].dialects and (finding := check(run, stmt, op)):
                found.append(finding)
        run.apply(stmt, op)
    if rewrite := rules.table_rewrite(run, stmt, rewritten, found):
        found.append(rewrite)
    return found


def _dialect(dialect: str) -> str:
    name = _ALIASES.get(dialect.lower(), dialect.lower())
    if name not in DIALECTS:
        raise ValueError(f"unknown dialect {dialect!r}: expected one of {', '.join(DIALECTS)}")
    return name


def lint(
    dialect: str,
    statements: list[Statement],
    revisions: list[RevisionInfo],
    live: LiveState,
    *,
    version_table: str = "alembic_version",
) -> list[Finding]:
    """Check a plan against the live state: findings in statement order, then revisions'."""
    run = Run(_dialect(dialect), live, version_table)
    per_statement = [_check_statement(run, stmt) for stmt in statements]
    if run.dialect == "postgresql" and (hit := rules.lock_timeout(run)):
        stmt, finding = hit
        per_statement[next(i for i, s in enumerate(statements) if s is stmt)].append(finding)
    findings = [f for found in per_statement for f in found]
    return findings + rules.irreversible_downgrades(run, revisions)


def tables_referenced(
    dialect: str, statements: list[Statement], *, version_table: str = "alembic_version"
) -> set[str]:
    """Return the tables the live state must cover: those touched and not made by the plan."""
    name = _dialect(dialect)
    created: set[str] = set()
    versions = {bare(version_table.lower())}
    referenced: set[str] = set()
    for stmt in statements:
        ops = parse(name, stmt.sql).ops
        versions.update(bare(op.table) for op in ops if op.kind == Kind.VERSION_TABLE and op.table)
        observed = [lk.get("relation", "") for lk in stmt.locks or () if lk.get("mode") == AE]
        for table in observed + list(stmt.rewrote or ()):
            if bare(table.lower()) not in created | versions:
                referenced.add(table.lower())
        for op in ops:
            if op.kind == Kind.CREATE_TABLE and op.table:
                created.add(bare(op.table))
            elif op.table and bare(op.table) not in created | versions:
                referenced.add(op.table)
            if op.kind == Kind.RENAME_TABLE and op.name and bare(op.table or "") in created:
                created.add(bare(op.name))
    return referenced
