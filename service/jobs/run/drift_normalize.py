"""Pure: the differences of two reflected schemas that are only spellings; the rest in words.

The drift check compares the live schema with a scratch copy built by the
bundle, both reflected by SQLAlchemy. Built by the same DDL on the same kind of
server the two reflect alike; what still differs harmlessly (a table rebuilt by
SQLite batch mode, a scratch server of another version, a column altered by
hand with an equivalent spelling) is settled here, and every rule that settled
something is counted so the answer can say what it ignored. No I/O.
"""

from __future__ import annotations

import re
from collections import Counter
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from alembic.operations import ops

# Why each rule exists, as the drift answer's `ignored` list words it.
RULES = {
    "type_spelling": "column types spelled differently but the same (case, spacing, "
    "INT/INTEGER, BOOL/BOOLEAN, DECIMAL/NUMERIC)",
    "display_width": "MySQL integer display widths (INT(11) and INT)",
    "tinyint_boolean": "MySQL TINYINT(1) and BOOLEAN",
    "default_spelling": "server defaults spelled differently but the same (quotes around a "
    "number, PostgreSQL ::casts, parentheses, now()/CURRENT_TIMESTAMP, case)",
    "fk_options": "foreign key ON DELETE/ON UPDATE written as the default action "
    "(NO ACTION, MySQL's RESTRICT) on one side and left out on the other",
}

_QUOTED = re.compile(r"'(?:[^']|'')*'")
_INTEGERS = r"tinyint|smallint|mediumint|int|integer|bigint"
_SYNONYMS = (
    (re.compile(r"\bint\b"), "integer"),
    (re.compile(r"\bbool\b"), "boolean"),
    (re.compile(r"\bdecimal\b"), "numeric"),
    (re.compile(r"\bcharacter varying\b"), "varchar"),
    (re.compile(r"\btimestamp without time zone\b"), "timestamp"),
    (re.compile(r"\bdouble precision\b"), "double"),
)
# A PostgreSQL cast as its reflection writes it: '0'::integer, 'x'::character varying.
_PG_CAST = re.compile(
    r"::(?:\"[^\"]+\"|[a-z_][a-z0-9_.]*)"
    r"(?: (?:varying|precision|with time zone|without time zone))*"
    r"(?:\(\d+(?:,\s*\d+)?\))?(?:\[\])?",
    re.IGNORECASE,
)
_NOW = re.compile(r"\bnow\(\)|\bcurrent_timestamp\(\)|\bcurrent_timestamp\b(?!\()")
_NUMBER = re.compile(r"'(-?\d+(?:\.\d+)?)'")
_IDENTITY_OPTIONS = (
    "always",
    "on_null",
    "start",
    "increment",
    "minvalue",
    "maxvalue",
    "cycle",
    "cache",
)


class Normalizer:
    """Canonical spellings of types and defaults, counting each rule that made two equal."""

    def __init__(self, dialect: sa.engine.Dialect) -> None:
        self.dialect = dialect
        self.counts: Counter[str] = Counter()

    # --------------------------------------------------------------- types
    def type_text(self, type_: sa.types.TypeEngine) -> str:
        """The type as the dialect writes it; an Enum with its values (a name alone hides them)."""
        try:
            text = str(type_.compile(dialect=self.dialect))
        except Exception:  # noqa: BLE001 - a type the dialect cannot write: compare its repr
            text = repr(type_)
        enums = getattr(type_, "enums", None)
        if isinstance(type_, sa.Enum) and enums and "(" not in text:
            text += "(" + ",".join(_quote(e) for e in enums) + ")"
        return text

    def canonical_type(self, text: str) -> tuple[str, set[str]]:
        """(canonical spelling, rules it needed) of a compiled type."""
        used: set[str] = set()
        s = _lower_outside_quotes(" ".join(text.split()))
        s = re.sub(r"\s*([(),])\s*", r"\1", s)
        if "tinyint(1)" in s:
            used.add("tinyint_boolean")
        s = re.sub(r"\btinyint\(1\)|\bbool(?:ean)?\b", "boolean", s)
        new = re.sub(rf"\b({_INTEGERS})\(\d+\)", r"\1", s)
        if new != s:
            used.add("display_width")
            s = new
        for pattern, replacement in _SYNONYMS:
            s = pattern.sub(replacement, s)
        return s, used

    def types_differ(self, live: sa.types.TypeEngine, built: sa.types.TypeEngine) -> bool:
        """Whether two reflected types differ once spelled alike; counts what was settled."""
        a, b = self.type_text(live), self.type_text(built)
        if a == b:
            return False
        (ca, ua), (cb, ub) = self.canonical_type(a), self.canonical_type(b)
        if ca != cb:
            return True
        rules = (ua | ub) or {"type_spelling"}
        self.counts.update(rules)
        return False

    # ------------------------------------------------------------ defaults
    def defaults_differ(self, live: Any, built: Any) -> bool:
        """Whether two reflected server defaults (clause, Computed, Identity) differ."""
        a, b = default_text(live), default_text(built)
        if a == b:
            return False
        if _generated(live) or _generated(built):
            return True  # default_text already spelled both alike
        if canonical_default(a) != canonical_default(b):
            return True
        self.counts["default_spelling"] += 1
        return False

    # --------------------------------------------------------- op pairs
    def cancel_fk_pairs(self, table_ops: ops.ModifyTableOps) -> None:
        """Drop a table's remove_fk/add_fk pairs that differ only in a default action."""
        drops = [o for o in table_ops.ops if _is_fk_drop(o)]
        adds = [o for o in table_ops.ops if isinstance(o, ops.CreateForeignKeyOp)]
        for drop in drops:
            key = _fk_key(drop.to_constraint(), self.dialect.name)
            match = next(
                (a for a in adds if _fk_key(a.to_constraint(), self.dialect.name) == key), None
            )
            if match is not None:
                adds.remove(match)
                table_ops.ops.remove(drop)
                table_ops.ops.remove(match)
                self.counts["fk_options"] += 1

    def ignored(self) -> list[str]:
        """What the rules settled, in words, with how often."""
        return [f"{RULES[rule]}: {n}" for rule, n in sorted(self.counts.items())]


def default_text(default: Any) -> str | None:
    """A reflected server default as text: a clause's own, a Computed's or an Identity's shape."""
    if default is None:
        return None
    if isinstance(default, sa.Computed):
        expression = canonical_default(str(default.sqltext))
        return f"GENERATED AS ({expression}) persisted={default.persisted}"
    if isinstance(default, sa.Identity):
        shown = ", ".join(f"{k}={getattr(default, k, None)}" for k in _IDENTITY_OPTIONS)
        return f"IDENTITY({shown})"
    arg = getattr(default, "arg", default)
    return str(getattr(arg, "text", arg))


def _generated(default: Any) -> bool:
    return isinstance(default, (sa.Computed, sa.Identity))


def canonical_default(text: str | None) -> str | None:
    """A server default's canonical spelling (None for no default or DEFAULT NULL)."""
    if text is None:
        return None
    s = " ".join(text.split())
    s = _PG_CAST.sub("", s)
    s = _strip_parens(s)
    s = _lower_outside_quotes(s)
    s = _NOW.sub("current_timestamp", s)
    s = _NUMBER.sub(r"\1", s) if _NUMBER.fullmatch(s) else s
    if re.fullmatch(r"-?\d+(?:\.\d+)?", s):  # 0.00 and 0 on a NUMERIC(10, 2)
        s = format(Decimal(s).normalize(), "f")
    s = re.sub(r"\s*([(),])\s*", r"\1", s)
    return None if s in ("", "null") else s


def _strip_parens(s: str) -> str:
    """Remove parentheses around the whole expression (MySQL 8 and SQLite add them)."""
    while s.startswith("(") and s.endswith(")") and _balanced(s[1:-1]):
        s = s[1:-1].strip()
    return s


def _balanced(s: str) -> bool:
    depth = 0
    for ch in _QUOTED.sub("''", s):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


def _lower_outside_quotes(s: str) -> str:
    """Lower-case keywords and names, never a quoted literal ('Active' is not 'active')."""
    out, last = [], 0
    for m in _QUOTED.finditer(s):
        out.append(s[last : m.start()].lower())
        out.append(m.group(0))
        last = m.end()
    out.append(s[last:].lower())
    return "".join(out)


def _quote(value: Any) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _is_fk_drop(op: Any) -> bool:
    return isinstance(op, ops.DropConstraintOp) and op.constraint_type == "foreignkey"


def _fk_key(fk: sa.ForeignKeyConstraint, dialect: str) -> tuple:
    """What an FK means: its columns, what it points at, its actions (defaults as None)."""
    defaults = {"no action", "restrict"} if dialect == "mysql" else {"no action"}

    def action(value: str | None) -> str | None:
        return None if value is None or value.lower() in defaults else value.lower()

    return (
        tuple(fk.column_keys),
        tuple(e.target_fullname for e in fk.elements),
        action(fk.ondelete),
        action(fk.onupdate),
        bool(fk.deferrable),
        (fk.initially or "").lower(),
    )


# ----------------------------------------------------------- in words
LIVE_ONLY = "live has it, the bundle does not"
BUNDLE_ONLY = "the bundle builds it, live lacks it"


def describe(upgrade: ops.UpgradeOps, normalizer: Normalizer) -> list[dict[str, Any]]:
    """Each difference as {kind, table, name, detail}, in words a person reads."""
    out: list[dict[str, Any]] = []
    for op in upgrade.ops:
        if isinstance(op, ops.CreateTableOp):
            out.append(_difference("add_table", op.table_name, None, BUNDLE_ONLY))
        elif isinstance(op, ops.DropTableOp):
            out.append(_difference("remove_table", op.table_name, None, LIVE_ONLY))
        elif isinstance(op, ops.ModifyTableOps):
            for sub in op.ops:
                out.extend(_describe_table_op(sub, op.table_name, normalizer))
    return out


def _difference(kind: str, table: str | None, name: str | None, detail: str) -> dict[str, Any]:
    return {"kind": kind, "table": table, "name": name, "detail": detail}


def _describe_table_op(op: Any, table: str, normalizer: Normalizer) -> list[dict[str, Any]]:
    """The differences one operation on `table` stands for (an ALTER COLUMN may carry several)."""
    if isinstance(op, ops.AlterColumnOp):
        return [
            _difference(kind, table, op.column_name, f"{was} -> {now} (live -> bundle)")
            for kind, was, now in _column_changes(op, normalizer)
        ]
    if isinstance(op, ops.AddColumnOp):
        detail = f"{BUNDLE_ONLY} ({normalizer.type_text(op.column.type)})"
        return [_difference("add_column", table, op.column.name, detail)]
    if isinstance(op, ops.DropColumnOp):
        return [_difference("remove_column", table, op.column_name, LIVE_ONLY)]
    # Alembic's own names: add_index, remove_fk, add_constraint, add_table_comment...
    kind = str(op.to_diff_tuple()[0])
    side = BUNDLE_ONLY if kind.startswith("add_") else LIVE_ONLY
    if isinstance(op, (ops.CreateIndexOp, ops.DropIndexOp)):
        index = op.to_index()
        columns = ", ".join(str(getattr(e, "name", e)) for e in index.expressions)
        shape = f"{'unique ' if index.unique else ''}index on ({columns})"
        return [_difference(kind, table, op.index_name, f"{shape}: {side}")]
    if isinstance(op, (ops.AddConstraintOp, ops.DropConstraintOp)):
        shape = _constraint(op.to_constraint())
        return [_difference(kind, table, op.constraint_name, f"{shape}: {side}")]
    return [_difference(kind, table, None, "differs")]


def _column_changes(op: ops.AlterColumnOp, normalizer: Normalizer):
    """(kind, live, bundle) for each change an AlterColumnOp carries."""
    spell = normalizer.type_text
    if op.modify_type is not None:
        yield "modify_type", spell(op.existing_type), spell(op.modify_type)
    if op.modify_nullable is not None:
        yield "modify_nullable", _null(op.existing_nullable), _null(op.modify_nullable)
    if op.modify_server_default is not False:
        yield (
            "modify_default",
            _default(op.existing_server_default),
            _default(op.modify_server_default),
        )
    if op.modify_comment is not False:
        yield "modify_comment", repr(op.existing_comment), repr(op.modify_comment)


def _null(nullable: bool | None) -> str:
    return "NULL" if nullable else "NOT NULL"


def _default(default: Any) -> str:
    text = default_text(default)
    return "no default" if text is None else text


def _constraint(constraint: sa.Constraint) -> str:
    if isinstance(constraint, sa.ForeignKeyConstraint):
        target = ", ".join(e.target_fullname for e in constraint.elements)
        return f"foreign key ({', '.join(constraint.column_keys)}) -> {target}"
    columns = ", ".join(c.name for c in getattr(constraint, "columns", []))
    kind = {sa.UniqueConstraint: "unique", sa.CheckConstraint: "check"}.get(type(constraint), "")
    return f"{kind} constraint ({columns})".strip()
