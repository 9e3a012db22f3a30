"""Parse one SQL statement into ops, for PostgreSQL, MySQL or SQLite; never raise.

PostgreSQL goes through pglast (parse_pg.py). MySQL and SQLite go through
sqlglot, which reads them well but falls back to an opaque Command on syntax it
does not know: that counts as unparsed. Results are cached per (dialect, sql):
a fleet's upgrades repeat the same statements, and Parsed is immutable.
"""

from __future__ import annotations

import functools
import re

import sqlglot
from sqlglot import exp

from service.lint.ops import Flag, Kind, Op, Parsed
from service.lint.parse_pg import parse_postgresql

# Retort appends the bound parameters to captured statements as a comment.
_PARAMETERS_COMMENT = re.compile(r"\s*--\s*parameters:.*\Z", re.DOTALL)
# pyformat placeholders (psycopg, pymysql): neither parser reads them.
_PLACEHOLDER = re.compile(r"%\(\w+\)s|%s")
_RENAME_TABLE = re.compile(r"^\s*RENAME\s+TABLE\s+(.+)$", re.IGNORECASE | re.DOTALL)
_RENAME_PAIR = re.compile(r"^\s*([\w.`]+)\s+TO\s+([\w.`]+)\s*$", re.IGNORECASE)


@functools.lru_cache(maxsize=4096)
def parse(dialect: str, sql: str) -> Parsed:
    """Parse one statement of `dialect` into ops; never raises on bad SQL."""
    text = _PARAMETERS_COMMENT.sub("", sql).strip().rstrip(";").strip()
    if not text:
        return Parsed()
    try:
        if dialect == "postgresql":
            return parse_postgresql(_PLACEHOLDER.sub("$1", text))
        return _parse_sqlglot(dialect, _PLACEHOLDER.sub("?", text))
    except Exception as exc:  # a parse tree shaped as no reader expects: report, never crash
        return Parsed(error=f"the lint could not read it ({type(exc).__name__}: {exc})")


def _parse_sqlglot(dialect: str, text: str) -> Parsed:
    if dialect == "mysql" and (renamed := _mysql_rename_table(text)) is not None:
        return Parsed(ops=tuple(renamed))
    try:
        expressions = sqlglot.parse(text, read=dialect, error_level=sqlglot.ErrorLevel.RAISE)
    except Exception as exc:  # sqlglot raises more than ParseError on odd input; never crash
        return Parsed(error=f"sqlglot ({dialect}) cannot parse it: {_first_line(exc)}")
    ops: list[Op] = []
    for expression in expressions:
        if expression is None:
            continue
        if isinstance(expression, exp.Command):
            keyword = str(expression.this).upper()
            return Parsed(
                error=f"sqlglot ({dialect}) reads it only as an opaque command ({keyword} ...)",
                opaque=f"a statement sqlglot reads only as an opaque command ({keyword} ...)",
            )
        if isinstance(expression, exp.Create) and str(expression.kind).upper() in _SG_OPAQUE:
            return Parsed(opaque=f"CREATE {str(expression.kind).upper()}")
        handler = _SG_HANDLERS.get(type(expression))
        if handler is not None:
            ops.extend(handler(expression, dialect))
    return Parsed(ops=tuple(ops))


_SG_OPAQUE = frozenset({"FUNCTION", "PROCEDURE", "TRIGGER", "EVENT"})


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _sg_table(table: exp.Expression | None) -> str | None:
    if not isinstance(table, exp.Table):
        return None
    return ".".join(p for p in (table.db, table.name) if p).lower() or None


def _mysql_rename_table(text: str) -> list[Op] | None:
    # MySQL's RENAME TABLE a TO b[, c TO d]: sqlglot has no node for it.
    match = _RENAME_TABLE.match(text)
    pairs = [_RENAME_PAIR.match(p) for p in match[1].split(",")] if match else [None]
    if not all(pairs):
        return None
    return [
        Op(Kind.RENAME_TABLE, p[1].replace("`", "").lower(), name=p[2].replace("`", "").lower())
        for p in pairs
    ]


def _sg_column(kind: Kind, table: str | None, coldef: exp.ColumnDef, dialect: str, **kw) -> Op:
    flags: set[str] = set()
    for con in coldef.constraints:
        c = con.kind
        if isinstance(c, exp.NotNullColumnConstraint):
            flags.add(Flag.EXPLICIT_NULL if c.args.get("allow_null") else Flag.NOT_NULL)
        elif isinstance(c, exp.PrimaryKeyColumnConstraint | exp.UniqueColumnConstraint):
            flags.add(Flag.UNIQUE)
        elif isinstance(
            c,
            exp.DefaultColumnConstraint
            | exp.AutoIncrementColumnConstraint
            | exp.ComputedColumnConstraint
            | exp.GeneratedAsIdentityColumnConstraint,
        ):
            flags.add(Flag.DEFAULT)
    dtype = coldef.args.get("kind")
    # sqlglot's SQLite output maps VARCHAR(20) to TEXT(20): show SQLite types generically.
    shown = None if dtype is None else dtype.sql(dialect="mysql" if dialect == "mysql" else None)
    return Op(
        kind,
        table,
        coldef.name,
        type=shown,
        flags=frozenset(flags),
        **kw,
    )


_SG_CONSTRAINTS = {
    exp.PrimaryKey: "primary_key",
    exp.PrimaryKeyColumnConstraint: "primary_key",
    exp.UniqueColumnConstraint: "unique",
    exp.ForeignKey: "foreign_key",
    exp.CheckColumnConstraint: "check",
}


def _sg_add_constraint(table: str | None, action: exp.AddConstraint):
    for item in action.expressions:
        name = item.name.lower() if isinstance(item, exp.Constraint) else None
        kinds = item.expressions if isinstance(item, exp.Constraint) else [item]
        for k in kinds:
            if isinstance(k, exp.IndexColumnConstraint):
                yield Op(Kind.CREATE_INDEX, table, name=k.name.lower() or None)
            elif type(k) in _SG_CONSTRAINTS:
                yield Op(Kind.ADD_CONSTRAINT, table, name=name, detail=_SG_CONSTRAINTS[type(k)])


def _sg_alter_action(table: str | None, action: exp.Expression, dialect: str):
    if isinstance(action, exp.ColumnDef):
        yield _sg_column(Kind.ADD_COLUMN, table, action, dialect)
    elif isinstance(action, exp.ModifyColumn):
        old = action.args.get("rename_from")
        yield _sg_column(
            Kind.MODIFY_COLUMN, table, action.this, dialect, name=old.name if old else None
        )
    elif isinstance(action, exp.Drop) and str(action.args.get("kind")).upper() == "COLUMN":
        for column in action.expressions or action.args.get("tables") or ():
            yield Op(Kind.DROP_COLUMN, table, column.name)
    elif isinstance(action, exp.AlterRename):
        yield Op(Kind.RENAME_TABLE, table, name=_sg_table(action.this))
    elif isinstance(action, exp.RenameColumn):
        yield Op(Kind.RENAME_COLUMN, table, action.this.name, name=action.args["to"].name)
    elif isinstance(action, exp.AddConstraint):
        yield from _sg_add_constraint(table, action)
    else:
        yield Op(Kind.OTHER, table)


def _sg_alter(alter: exp.Alter, dialect: str):
    if str(alter.args.get("kind")).upper() != "TABLE":
        return
    table = _sg_table(alter.this)
    for action in alter.args.get("actions") or ():
        yield from _sg_alter_action(table, action, dialect)
    for option in alter.args.get("options") or ():
        value = option.name.upper()
        if (isinstance(option, exp.AlgorithmProperty) and value == "COPY") or (
            isinstance(option, exp.LockProperty) and value in ("SHARED", "EXCLUSIVE")
        ):
            prefix = "ALGORITHM" if isinstance(option, exp.AlgorithmProperty) else "LOCK"
            yield Op(Kind.MYSQL_OPTION, table, detail=f"{prefix}={value}")


def _sg_create(create: exp.Create, dialect: str):
    kind = str(create.kind).upper()
    if kind == "TABLE":
        schema = create.this
        table = _sg_table(schema.this if isinstance(schema, exp.Schema) else schema)
        columns = {c.name for c in schema.expressions if isinstance(c, exp.ColumnDef)}
        if columns == {"version_num"}:
            yield Op(Kind.VERSION_TABLE, table)
        yield Op(Kind.CREATE_TABLE, table)
    elif kind == "INDEX":
        index = create.this
        flags = frozenset({Flag.UNIQUE} if create.args.get("unique") else ())
        yield Op(
            Kind.CREATE_INDEX, _sg_table(index.args.get("table")), name=index.name, flags=flags
        )


def _sg_drop(drop: exp.Drop, dialect: str):
    kind = str(drop.kind).upper()
    for item in drop.expressions or drop.args.get("tables") or ():
        if kind == "TABLE":
            yield Op(Kind.DROP_TABLE, _sg_table(item))
        elif kind == "INDEX":
            on = drop.args.get("cluster")
            yield Op(Kind.DROP_INDEX, _sg_table(on.this) if on else None, name=item.name)


def _sg_dml(statement: exp.Expression, dialect: str):
    target = statement.this
    table = _sg_table(target.this if isinstance(target, exp.Schema) else target)
    names = {i.name for i in statement.find_all(exp.Identifier)}
    if "version_num" in names:
        yield Op(Kind.VERSION_TABLE, table)
    elif not isinstance(statement, exp.Insert):
        verb = "UPDATE" if isinstance(statement, exp.Update) else "DELETE"
        flags = frozenset() if statement.args.get("where") else frozenset({Flag.NO_WHERE})
        yield Op(Kind.DML, table, flags=flags, detail=verb)


_SG_HANDLERS = {
    exp.Alter: _sg_alter,
    exp.Create: _sg_create,
    exp.Drop: _sg_drop,
    exp.Update: _sg_dml,
    exp.Delete: _sg_dml,
    exp.Insert: _sg_dml,
    exp.TruncateTable: lambda s, d: [Op(Kind.TRUNCATE, _sg_table(t)) for t in s.expressions],
    exp.Transaction: lambda s, d: [Op(Kind.TRANSACTION, detail="begin")],
    exp.Commit: lambda s, d: [Op(Kind.TRANSACTION, detail="end")],
    exp.Rollback: lambda s, d: [Op(Kind.TRANSACTION, detail="end")],
}
