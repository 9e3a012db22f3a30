"""Read PostgreSQL statements with pglast (libpg_query: PostgreSQL's own parser).

What libpg_query rejects, PostgreSQL rejects, so there is no fallback. sqlglot
is not used here: it misreads `ALTER TABLE t RENAME a TO b` (Alembic's column
rename) as a table rename and leaves USING INDEX, VALIDATE CONSTRAINT and
CONCURRENTLY forms opaque.

The tree is read as libpg_query's JSON (parse_sql_json), not as pglast's Python
AST: building the AST objects costs five to seven times the parse itself, and
the runner lints every upgrade of a fleet. In that JSON a node is a one-key
dict {"NodeType": {fields}}, and fields that are false, zero or empty are left
out.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

from pglast.parser import ParseError, parse_sql_json

from service.lint.ops import AE, SHARE, SRE, SUE, Flag, Kind, Op, Parsed

Node = dict


def parse_postgresql(text: str) -> Parsed:
    """Parse PostgreSQL text (one or more statements) into ops."""
    try:
        tree = json.loads(parse_sql_json(text))
    except ParseError as exc:
        return Parsed(error=f"PostgreSQL's parser rejects it: {exc}")
    ops: list[Op] = []
    for raw in tree.get("stmts", ()):
        kind, stmt = _unwrap(raw["stmt"])
        if kind in _OPAQUE:
            return Parsed(opaque=_OPAQUE[kind])
        handler = _HANDLERS.get(kind)
        if handler is not None:
            ops.extend(handler(stmt))
    return Parsed(ops=tuple(ops))


def _unwrap(node: Node) -> tuple[str, Node]:
    ((kind, body),) = node.items()
    return kind, body


def _rel(rv: Node | None) -> str | None:
    """Return a RangeVar's table name, schema-qualified when the SQL qualifies it."""
    if not rv:
        return None
    name = f"{rv['schemaname']}.{rv['relname']}" if rv.get("schemaname") else rv["relname"]
    return name.lower()


def _strings(items: list[Node]) -> list[str]:
    return [item["String"]["sval"] for item in items if "String" in item]


def _const(node: Node | None):
    """Return the Python value of an A_Const node (0, "" and False are left out in JSON)."""
    const = (node or {}).get("A_Const", {})
    for key, default in (("ival", 0), ("sval", ""), ("boolval", False), ("fval", "0")):
        if key in const:
            return const[key].get(key, default)
    return None


def _walk(node) -> Iterator[tuple[str, Node]]:
    """Yield (kind, fields) for every node under `node`."""
    if isinstance(node, dict):
        if len(node) == 1:
            ((key, value),) = node.items()
            if key[:1].isupper() and isinstance(value, dict):
                yield key, value
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


# Functions whose default makes ADD COLUMN evaluate them per row (a rewrite).
# now()/current_timestamp are STABLE: one value per statement, no rewrite.
VOLATILE_FUNCTIONS = frozenset(
    "random clock_timestamp gen_random_uuid uuid_generate_v1 uuid_generate_v1mc "
    "uuid_generate_v4 uuidv4 uuidv7 nextval timeofday txid_current gen_random_bytes".split()
)
_SERIAL_TYPES = frozenset("serial serial4 bigserial serial8 smallserial serial2".split())
_TYPE_NAMES = {
    "int2": "smallint",
    "int4": "integer",
    "int8": "bigint",
    "float4": "real",
    "float8": "double precision",
    "bool": "boolean",
    "bpchar": "char",
}


def _type(type_name: Node) -> str:
    """Render a TypeName as SQL: 'bigint', 'varchar(20)', 'integer[]'."""
    base = _strings(type_name.get("names", []))[-1]
    text = _TYPE_NAMES.get(base, base)
    mods = [_const(m) for m in type_name.get("typmods", ())]
    # interval's typmods are a field bitmask, not something to show.
    if mods and base != "interval" and all(isinstance(m, int) for m in mods):
        text += f"({', '.join(map(str, mods))})"
    return text + "[]" * len(type_name.get("arrayBounds", ()))


def _column(table: str | None, coldef: Node) -> Op:
    flags: set[str] = set()
    volatile = None
    base = _strings(coldef["typeName"].get("names", []))[-1].lower()
    if base in _SERIAL_TYPES:
        flags.add(Flag.DEFAULT)
        volatile = f"{base} (nextval)"
    for con in coldef.get("constraints", ()):
        con = con["Constraint"]
        contype = con["contype"]
        if contype == "CONSTR_NOTNULL":
            flags.add(Flag.NOT_NULL)
        elif contype in ("CONSTR_PRIMARY", "CONSTR_UNIQUE"):
            flags |= {Flag.UNIQUE, Flag.NOT_NULL} if contype == "CONSTR_PRIMARY" else {Flag.UNIQUE}
        elif contype == "CONSTR_DEFAULT":
            flags.add(Flag.DEFAULT)
            for kind, node in _walk(con.get("raw_expr")):
                name = _strings(node.get("funcname", []))[-1:] if kind == "FuncCall" else []
                if name and name[0].lower() in VOLATILE_FUNCTIONS:
                    volatile = f"{name[0].lower()}()"
                    break
        elif contype == "CONSTR_IDENTITY":
            flags.add(Flag.DEFAULT)
            volatile = "an identity column"
        elif contype == "CONSTR_GENERATED":
            flags.add(Flag.DEFAULT)
            # PostgreSQL 18 adds VIRTUAL generated columns, computed on read: no rewrite.
            if con.get("generated_kind", "s") != "v":
                volatile = "GENERATED ... STORED"
    return Op(
        Kind.ADD_COLUMN,
        table,
        coldef.get("colname"),
        type=_type(coldef["typeName"]),
        lock=AE,
        flags=frozenset(flags),
        detail=volatile,
    )


_CONSTRAINT_KINDS = {
    "CONSTR_FOREIGN": "foreign_key",
    "CONSTR_CHECK": "check",
    "CONSTR_UNIQUE": "unique",
    "CONSTR_PRIMARY": "primary_key",
}
# ALTER TABLE subcommands that take less than ACCESS EXCLUSIVE (PostgreSQL docs, alter_table).
_WEAKER_LOCKS = {
    **dict.fromkeys(
        "AT_SetStatistics AT_SetOptions AT_ResetOptions AT_SetRelOptions AT_ResetRelOptions "
        "AT_ClusterOn AT_DropCluster AT_ValidateConstraint AT_AttachPartition "
        "AT_DetachPartitionFinalize".split(),
        SUE,
    ),
    **dict.fromkeys(
        "AT_EnableTrig AT_EnableAlwaysTrig AT_EnableReplicaTrig AT_EnableTrigAll "
        "AT_EnableTrigUser AT_DisableTrig AT_DisableTrigAll AT_DisableTrigUser".split(),
        SRE,
    ),
}


def _alter_cmd(table: str | None, cmd: Node) -> Op:
    sub = cmd["subtype"]
    definition = cmd.get("def") or {}
    if sub == "AT_AddColumn":
        return _column(table, definition["ColumnDef"])
    if sub == "AT_DropColumn":
        return Op(Kind.DROP_COLUMN, table, cmd.get("name"), lock=AE)
    if sub == "AT_AlterColumnType":
        coldef = definition["ColumnDef"]
        flags = frozenset({Flag.USING} if coldef.get("raw_default") else ())
        return Op(
            Kind.ALTER_TYPE,
            table,
            cmd.get("name"),
            type=_type(coldef["typeName"]),
            lock=AE,
            flags=flags,
        )
    if sub == "AT_SetNotNull":
        return Op(Kind.SET_NOT_NULL, table, cmd.get("name"), lock=AE)
    if sub == "AT_AddConstraint" and "Constraint" in definition:
        con = definition["Constraint"]
        kind = _CONSTRAINT_KINDS.get(con["contype"])
        flags = {Flag.NOT_VALID} if con.get("skip_validation") else set()
        if con.get("indexname"):
            flags.add(Flag.USING_INDEX)
        lock = SRE if kind == "foreign_key" else AE
        return Op(
            Kind.ADD_CONSTRAINT,
            table,
            name=con.get("conname"),
            lock=lock,
            flags=frozenset(flags),
            detail=kind,
        )
    if sub == "AT_DetachPartition" and definition.get("PartitionCmd", {}).get("concurrent"):
        return Op(
            Kind.OTHER,
            table,
            lock=SUE,
            flags=frozenset({Flag.NO_TRANSACTION}),
            detail="DETACH PARTITION ... CONCURRENTLY",
        )
    return Op(Kind.OTHER, table, lock=_WEAKER_LOCKS.get(sub, AE))


def _alter_table(stmt: Node) -> Iterator[Op]:
    if stmt.get("objtype") != "OBJECT_TABLE":
        return
    table = _rel(stmt.get("relation"))
    for cmd in stmt.get("cmds", ()):
        yield _alter_cmd(table, cmd["AlterTableCmd"])


def _index(stmt: Node) -> Iterator[Op]:
    concurrent = stmt.get("concurrent", False)
    flags = {Flag.UNIQUE} if stmt.get("unique") else set()
    if concurrent:
        flags |= {Flag.CONCURRENT, Flag.NO_TRANSACTION}
    yield Op(
        Kind.CREATE_INDEX,
        _rel(stmt.get("relation")),
        name=(stmt.get("idxname") or "").lower() or None,
        lock=SUE if concurrent else SHARE,
        flags=frozenset(flags),
        detail="CREATE INDEX CONCURRENTLY" if concurrent else None,
    )


def _drop(stmt: Node) -> Iterator[Op]:
    remove = stmt.get("removeType")
    concurrent = stmt.get("concurrent", False)
    for obj in stmt.get("objects", ()):
        name = ".".join(_strings(obj.get("List", {}).get("items", []))).lower()
        if remove == "OBJECT_TABLE":
            yield Op(Kind.DROP_TABLE, name, lock=AE)
        elif remove == "OBJECT_INDEX":
            flags = frozenset({Flag.CONCURRENT, Flag.NO_TRANSACTION} if concurrent else ())
            yield Op(
                Kind.DROP_INDEX,
                name=name,
                lock=None if concurrent else AE,
                flags=flags,
                detail="DROP INDEX CONCURRENTLY",
            )


def _rename(stmt: Node) -> Iterator[Op]:
    table = _rel(stmt.get("relation"))
    what = stmt.get("renameType")
    if what == "OBJECT_TABLE":
        yield Op(Kind.RENAME_TABLE, table, name=stmt["newname"].lower(), lock=AE)
    elif what == "OBJECT_COLUMN" and stmt.get("relationType") == "OBJECT_TABLE":
        yield Op(Kind.RENAME_COLUMN, table, stmt.get("subname"), name=stmt["newname"], lock=AE)
    elif what == "OBJECT_TABCONSTRAINT":
        yield Op(Kind.OTHER, table, lock=AE)


def _reindex(stmt: Node) -> Iterator[Op]:
    concurrent = any(p["DefElem"]["defname"] == "concurrently" for p in stmt.get("params", ()))
    # REINDEX SCHEMA/DATABASE/SYSTEM are refused in a transaction block, concurrently or not.
    whole = stmt.get("kind") not in ("REINDEX_OBJECT_INDEX", "REINDEX_OBJECT_TABLE")
    yield Op(
        Kind.OTHER,
        name=_rel(stmt.get("relation")) or stmt.get("name"),
        lock=None if concurrent else AE,
        flags=frozenset({Flag.NO_TRANSACTION} if concurrent or whole else ()),
        detail="REINDEX ... CONCURRENTLY" if concurrent else "REINDEX SCHEMA/DATABASE/SYSTEM",
    )


def _create(stmt: Node) -> Iterator[Op]:
    table = _rel(stmt.get("relation") or stmt.get("into", {}).get("rel"))
    columns = {e["ColumnDef"].get("colname") for e in stmt.get("tableElts", ()) if "ColumnDef" in e}
    if columns == {"version_num"}:
        yield Op(Kind.VERSION_TABLE, table)
    yield Op(Kind.CREATE_TABLE, table)


def timeout_ms(value) -> int:
    """Convert a lock_timeout setting (5000, '5s', '500', '1min') to milliseconds."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|min|h|d)?\s*", str(value), re.IGNORECASE)
    if not match:
        return 0
    scale = {"ms": 1, "s": 1000, "min": 60_000, "h": 3_600_000, "d": 86_400_000}
    return int(float(match[1]) * scale[(match[2] or "ms").lower()])


def _set(stmt: Node) -> Iterator[Op]:
    kind = stmt.get("kind")
    if kind == "VAR_RESET_ALL":
        yield Op(Kind.LOCK_TIMEOUT, detail="reset")
    elif (stmt.get("name") or "").lower() == "lock_timeout":
        args = stmt.get("args", ())
        value = str(timeout_ms(_const(args[0]))) if kind == "VAR_SET_VALUE" and args else "reset"
        local = frozenset({Flag.LOCAL} if stmt.get("is_local") else ())
        yield Op(Kind.LOCK_TIMEOUT, detail=value, flags=local)


def _select(stmt: Node) -> Iterator[Op]:
    # SELECT set_config('lock_timeout', '5s', is_local): another way to set it.
    for target in stmt.get("targetList", ()):
        call = target["ResTarget"].get("val", {}).get("FuncCall", {})
        args = [_const(a) for a in call.get("args", ())]
        if _strings(call.get("funcname", []))[-1:] == ["set_config"] and len(args) == 3:
            if args[0] == "lock_timeout":
                local = frozenset({Flag.LOCAL} if args[2] else ())
                yield Op(Kind.LOCK_TIMEOUT, detail=str(timeout_ms(args[1])), flags=local)


def _dml(verb: str):
    def handler(stmt: Node) -> Iterator[Op]:
        table = _rel(stmt.get("relation"))
        for kind, node in _walk(stmt):
            names = [node.get("name")] if kind == "ResTarget" else []
            if kind == "ColumnRef":
                names = _strings(node.get("fields", []))
            if "version_num" in names:
                yield Op(Kind.VERSION_TABLE, table)
                return
        if verb != "INSERT":
            flags = frozenset() if stmt.get("whereClause") else frozenset({Flag.NO_WHERE})
            yield Op(Kind.DML, table, flags=flags, detail=verb)

    return handler


def _transaction(stmt: Node) -> Iterator[Op]:
    kind = stmt.get("kind")
    if kind in ("TRANS_STMT_BEGIN", "TRANS_STMT_START"):
        yield Op(Kind.TRANSACTION, detail="begin")
    elif kind in ("TRANS_STMT_COMMIT", "TRANS_STMT_ROLLBACK", "TRANS_STMT_PREPARE"):
        yield Op(Kind.TRANSACTION, detail="end")


def _vacuum(stmt: Node) -> Iterator[Op]:
    yield Op(Kind.OTHER, flags=frozenset({Flag.NO_TRANSACTION}), detail="VACUUM")
    if any(o["DefElem"]["defname"] == "full" for o in stmt.get("options", ())):
        for rel in stmt.get("rels", ()):
            yield Op(Kind.OTHER, _rel(rel["VacuumRelation"].get("relation")), lock=AE)


_LOCK_MODES = {8: AE, 7: "ExclusiveLock", 6: SRE, 5: SHARE, 4: SUE}

_HANDLERS = {
    "AlterTableStmt": _alter_table,
    "IndexStmt": _index,
    "DropStmt": _drop,
    "RenameStmt": _rename,
    "ReindexStmt": _reindex,
    "CreateStmt": _create,
    "CreateTableAsStmt": _create,
    "VariableSetStmt": _set,
    "SelectStmt": _select,
    "UpdateStmt": _dml("UPDATE"),
    "DeleteStmt": _dml("DELETE"),
    "InsertStmt": _dml("INSERT"),
    "TransactionStmt": _transaction,
    "VacuumStmt": _vacuum,
    "TruncateStmt": lambda s: [
        Op(Kind.TRUNCATE, _rel(r["RangeVar"]), lock=AE) for r in s.get("relations", ())
    ],
    "ClusterStmt": lambda s: [Op(Kind.OTHER, _rel(s.get("relation")), lock=AE)],
    "LockStmt": lambda s: [
        Op(Kind.OTHER, _rel(r["RangeVar"]), lock=_LOCK_MODES.get(s.get("mode", 8)))
        for r in s.get("relations", ())
    ],
}
_OPAQUE = {
    "DoStmt": "a DO block",
    "CreateFunctionStmt": "CREATE FUNCTION/PROCEDURE",
    "CallStmt": "CALL",
    "RuleStmt": "CREATE RULE",
}
