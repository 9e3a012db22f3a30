"""Unit tests of the lint's checks, on statements as Alembic renders them.

Each check has a case where it fires and one where the safe form (or an exempt
table) does not. No database: the live state is built by hand.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from service.lint import (
    CODES,
    LiveState,
    RevisionInfo,
    Statement,
    lint,
    tables_referenced,
)
from service.lint.parse import parse

# The target before the job: t is big, u is empty, s's size is unknown.
LIVE = LiveState(tables={"public.t": 12_000, "public.u": 0, "s": None})
NEW_TABLE = "CREATE TABLE n (id INTEGER NOT NULL, a INTEGER, PRIMARY KEY (id))"


def plan(*sqls: str, revision: str = "r1", **fields) -> list[Statement]:
    """Build a plan of statements of one revision, indexed in order."""
    return [Statement(sql, revision, index=i, **fields) for i, sql in enumerate(sqls)]


def run(dialect: str, *sqls: str, live: LiveState = LIVE, revisions=(), **fields):
    """Lint a plan with a lock_timeout set, so only the check under test speaks."""
    if dialect == "postgresql" and live.lock_timeout_ms is None:
        live = LiveState(live.tables, live.known, lock_timeout_ms=5000)
    return lint(dialect, plan(*sqls, **fields), list(revisions), live)


def codes(findings) -> list[str]:
    return [f.code for f in findings]


def only(findings, code: str):
    """Return the single finding of `code`."""
    matching = [f for f in findings if f.code == code]
    assert len(matching) == 1, codes(findings)
    return matching[0]


# index_not_concurrent


def test_index_without_concurrently_on_a_big_table_is_found():
    finding = only(run("postgresql", "CREATE INDEX ix_t_a ON t (a)"), "index_not_concurrent")
    assert finding.severity == "warning"
    assert finding.table == "t"
    assert "ix_t_a" in finding.message and "12,000 rows" in finding.message
    assert finding.revision == "r1" and finding.statement_index == 0
    assert finding.statement == "CREATE INDEX ix_t_a ON t (a)"


def test_unique_index_without_concurrently_is_found():
    finding = only(run("postgresql", "CREATE UNIQUE INDEX uq_t_a ON t (a)"), "index_not_concurrent")
    assert "UNIQUE INDEX uq_t_a" in finding.message


def test_concurrent_index_outside_a_transaction_is_not_found():
    findings = run("postgresql", "CREATE INDEX CONCURRENTLY ix_t_a ON t (a)", in_transaction=False)
    assert findings == []


def test_index_on_a_table_created_in_the_same_plan_is_exempt():
    findings = run("postgresql", NEW_TABLE, "CREATE INDEX ix_n_a ON n (a)")
    assert findings == []


def test_index_on_a_table_that_does_not_exist_yet_is_not_found():
    assert run("postgresql", "CREATE INDEX ix_x_a ON x (a)") == []


def test_unknown_live_state_assumes_the_table_exists_and_says_so():
    live = LiveState(known=False, lock_timeout_ms=1000)
    finding = only(
        run("postgresql", "CREATE INDEX ix_x_a ON x (a)", live=live), "index_not_concurrent"
    )
    assert "assumed to exist" in finding.message


def test_live_tables_match_with_or_without_schema():
    live = LiveState(tables={"t": 5}, lock_timeout_ms=1000)
    assert codes(run("postgresql", "CREATE INDEX ix ON public.t (a)", live=live)) == [
        "index_not_concurrent"
    ]


# concurrently_in_transaction


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE INDEX CONCURRENTLY ix_t_a ON t (a)",
        "DROP INDEX CONCURRENTLY ix_t_a",
        "REINDEX INDEX CONCURRENTLY ix_t_a",
        "REINDEX SCHEMA public",
        "ALTER TABLE t DETACH PARTITION t_2020 CONCURRENTLY",
        "VACUUM t",
    ],
)
def test_concurrently_inside_a_transaction_is_found(sql):
    finding = only(run("postgresql", sql), "concurrently_in_transaction")
    assert finding.severity == "error"
    assert "autocommit_block" in finding.advice


def test_concurrently_in_an_autocommit_block_is_not_found():
    assert run("postgresql", "DROP INDEX CONCURRENTLY ix_t_a", in_transaction=False) == []


# foreign_key_without_not_valid, check_without_not_valid

FK = "ALTER TABLE t ADD CONSTRAINT fk_t_u FOREIGN KEY(u_id) REFERENCES u (id)"
CK = "ALTER TABLE t ADD CONSTRAINT ck_t_a CHECK (a > 0)"


def test_foreign_key_validated_on_add_is_found():
    finding = only(run("postgresql", FK), "foreign_key_without_not_valid")
    assert "fk_t_u" in finding.message and "SHARE ROW EXCLUSIVE" in finding.message


def test_foreign_key_not_valid_then_validated_is_not_found():
    findings = run("postgresql", FK + " NOT VALID", "ALTER TABLE t VALIDATE CONSTRAINT fk_t_u")
    assert findings == []


def test_foreign_key_on_a_table_created_in_the_plan_is_exempt():
    sql = "ALTER TABLE n ADD CONSTRAINT fk_n_u FOREIGN KEY(a) REFERENCES u (id)"
    assert run("postgresql", NEW_TABLE, sql) == []


def test_check_validated_on_add_is_found():
    finding = only(run("postgresql", CK), "check_without_not_valid")
    assert "ACCESS EXCLUSIVE" in finding.message


def test_check_not_valid_is_not_found():
    assert run("postgresql", CK + " NOT VALID") == []


# set_not_null


def test_set_not_null_on_an_existing_table_is_found():
    finding = only(run("postgresql", "ALTER TABLE t ALTER COLUMN c SET NOT NULL"), "set_not_null")
    assert "CHECK" in finding.advice and "12,000" in finding.message


def test_set_not_null_on_a_new_table_is_not_found():
    assert run("postgresql", NEW_TABLE, "ALTER TABLE n ALTER COLUMN a SET NOT NULL") == []


# not_null_without_default


def test_not_null_column_without_default_on_rows_will_fail():
    findings = run("postgresql", "ALTER TABLE t ADD COLUMN c INTEGER NOT NULL")
    finding = only(findings, "not_null_without_default")
    assert finding.severity == "error"
    assert "will fail" in finding.message and "12,000" in finding.message


def test_not_null_column_without_default_on_an_empty_table_is_found_without_will_fail():
    finding = only(
        run("postgresql", "ALTER TABLE u ADD COLUMN c INTEGER NOT NULL"), "not_null_without_default"
    )
    assert "will fail" not in finding.message and "estimated empty" in finding.message


@pytest.mark.parametrize(
    "sql",
    [
        "ALTER TABLE t ADD COLUMN x INTEGER DEFAULT '0' NOT NULL",
        "ALTER TABLE t ADD COLUMN x INTEGER",
        "ALTER TABLE n ADD COLUMN x INTEGER NOT NULL",
    ],
)
def test_not_null_with_default_nullable_or_new_table_is_not_found(sql):
    assert "not_null_without_default" not in codes(run("postgresql", NEW_TABLE, sql))


def test_mysql_not_null_without_default_fills_implicit_defaults():
    finding = only(
        run("mysql", "ALTER TABLE t ADD COLUMN c INTEGER NOT NULL"), "not_null_without_default"
    )
    assert "implicit default" in finding.message


@pytest.mark.parametrize(
    "sql",
    [
        "ALTER TABLE t ADD COLUMN x INTEGER NOT NULL DEFAULT '0'",
        "ALTER TABLE t ADD COLUMN id INTEGER NOT NULL AUTO_INCREMENT, ADD PRIMARY KEY (id)",
    ],
)
def test_mysql_not_null_with_a_value_for_existing_rows_is_not_found(sql):
    assert "not_null_without_default" not in codes(run("mysql", sql))


def test_sqlite_refuses_not_null_without_default_even_on_a_new_table():
    findings = run("sqlite", NEW_TABLE, "ALTER TABLE n ADD COLUMN c INTEGER NOT NULL")
    assert "SQLite refuses" in only(findings, "not_null_without_default").message


def test_sqlite_not_null_with_default_is_not_found():
    assert run("sqlite", "ALTER TABLE t ADD COLUMN c INTEGER DEFAULT '1' NOT NULL") == []


# volatile_default


@pytest.mark.parametrize(
    "column, shown",
    [
        ("x UUID DEFAULT gen_random_uuid()", "gen_random_uuid()"),
        ("x UUID DEFAULT uuid_generate_v4()", "uuid_generate_v4()"),
        ("x FLOAT DEFAULT random()", "random()"),
        ("x TIMESTAMP WITH TIME ZONE DEFAULT clock_timestamp()", "clock_timestamp()"),
        ("x INTEGER DEFAULT nextval('t_x_seq'::regclass)", "nextval()"),
        ("x SERIAL NOT NULL", "serial"),
        ("x INTEGER GENERATED BY DEFAULT AS IDENTITY", "identity"),
        ("x INTEGER GENERATED ALWAYS AS (a + 1) STORED", "STORED"),
    ],
)
def test_volatile_default_on_an_existing_table_is_found(column, shown):
    findings = run("postgresql", f"ALTER TABLE t ADD COLUMN {column}")
    finding = only(findings, "volatile_default")
    assert shown in finding.message and "rewriting" in finding.message
    assert "not_null_without_default" not in codes(findings)


@pytest.mark.parametrize(
    "column",
    [
        "x TIMESTAMP WITHOUT TIME ZONE DEFAULT now() NOT NULL",
        "x TIMESTAMP WITH TIME ZONE DEFAULT CURRENT_TIMESTAMP",
        "x INTEGER DEFAULT '0' NOT NULL",
    ],
)
def test_stable_or_constant_default_is_not_volatile(column):
    assert run("postgresql", f"ALTER TABLE t ADD COLUMN {column}") == []


def test_volatile_default_on_a_new_table_is_not_found():
    sql = "ALTER TABLE n ADD COLUMN x UUID DEFAULT gen_random_uuid()"
    assert run("postgresql", NEW_TABLE, sql) == []


def test_volatile_default_observed_without_rewrite_is_not_found():
    sql = "ALTER TABLE t ADD COLUMN x UUID DEFAULT gen_random_uuid()"
    assert run("postgresql", sql, rewrote=[]) == []


# column_type_changed

TO_BIGINT = "ALTER TABLE t ALTER COLUMN c TYPE BIGINT"


def test_int_to_bigint_is_a_rewrite_not_a_widening():
    finding = only(run("postgresql", TO_BIGINT), "column_type_changed")
    assert finding.severity == "warning" and "bigint" in finding.message
    assert finding.observed is None


@pytest.mark.parametrize("new_type", ["TEXT", "VARCHAR(255)", "VARCHAR", "NUMERIC"])
def test_possibly_safe_widenings_are_info(new_type):
    sql = f"ALTER TABLE t ALTER COLUMN c TYPE {new_type}"
    finding = only(run("postgresql", sql), "column_type_changed")
    assert finding.severity == "info" and "possibly a safe widening" in finding.message


@pytest.mark.parametrize(
    "sql",
    [
        "ALTER TABLE t ALTER COLUMN c TYPE NUMERIC(10, 2)",
        "ALTER TABLE t ALTER COLUMN c TYPE VARCHAR(20) USING c::varchar(20)",
    ],
)
def test_other_type_changes_are_warnings(sql):
    assert only(run("postgresql", sql), "column_type_changed").severity == "warning"


def test_type_change_observed_without_rewrite_is_not_found():
    assert run("postgresql", TO_BIGINT, rewrote=[]) == []


def test_type_change_observed_rewriting_cites_the_observation():
    findings = run("postgresql", "ALTER TABLE t ALTER COLUMN c TYPE TEXT", rewrote=["public.t"])
    finding = only(findings, "column_type_changed")
    assert finding.severity == "warning"
    assert finding.observed == {"rewrote": ["public.t"]}
    assert "table_rewrite" not in codes(findings)


def test_type_change_on_a_new_table_is_not_found():
    assert run("postgresql", NEW_TABLE, "ALTER TABLE n ALTER COLUMN a TYPE BIGINT") == []


def test_mysql_modify_says_the_old_type_is_unknown():
    findings = run("mysql", "ALTER TABLE t MODIFY c BIGINT NOT NULL")
    assert "old type" in only(findings, "column_type_changed").message


def test_mysql_change_keeping_the_name_is_a_type_change_not_a_rename():
    findings = run("mysql", "ALTER TABLE t CHANGE c c BIGINT NOT NULL")
    assert codes(findings) == ["column_type_changed"]


def test_mysql_modify_on_a_new_table_is_not_found():
    assert run("mysql", NEW_TABLE, "ALTER TABLE n MODIFY a BIGINT NOT NULL") == []


def test_sqlite_batch_rebuild_is_not_a_type_change_drop_or_rename():
    findings = run(
        "sqlite",
        # As Alembic's batch_alter_table emits them (captured from a real run).
        "\nCREATE TABLE _alembic_tmp_t (\n\tid INTEGER, \n\ta BIGINT NOT NULL, \n\t"
        "PRIMARY KEY (id)\n)",
        "INSERT INTO _alembic_tmp_t (id, a) SELECT t.id, t.a \nFROM t",
        "\nDROP TABLE t",
        "ALTER TABLE _alembic_tmp_t RENAME TO t",
        "CREATE INDEX ix_t_a ON t (a)",
        "ALTER TABLE t DROP COLUMN b",
    )
    # After the rebuild t still holds its live rows: dropping a column is still found.
    assert codes(findings) == ["column_dropped"]
    assert "12,000" in findings[0].message


# unique_added_inline


@pytest.mark.parametrize(
    "sql",
    [
        "ALTER TABLE t ADD CONSTRAINT uq_t_a UNIQUE (a)",
        "ALTER TABLE t ADD CONSTRAINT pk_t PRIMARY KEY (a)",
        "ALTER TABLE t ADD COLUMN x INTEGER UNIQUE",
    ],
)
def test_unique_or_primary_key_built_under_lock_is_found(sql):
    assert "ACCESS EXCLUSIVE" in only(run("postgresql", sql), "unique_added_inline").message


def test_unique_using_an_index_built_concurrently_is_not_found():
    findings = run(
        "postgresql",
        "CREATE UNIQUE INDEX CONCURRENTLY uq_t_a ON t (a)",
        "ALTER TABLE t ADD CONSTRAINT uq_t_a UNIQUE USING INDEX uq_t_a",
        in_transaction=False,
    )
    assert findings == []


def test_unique_on_a_new_table_is_not_found():
    assert run("postgresql", NEW_TABLE, "ALTER TABLE n ADD CONSTRAINT uq UNIQUE (a)") == []


def test_mysql_unique_constraint_warns_about_duplicates():
    findings = run("mysql", "ALTER TABLE t ADD CONSTRAINT uq_t_a UNIQUE (a)")
    assert "duplicates" in only(findings, "unique_added_inline").message


def test_mysql_plain_index_is_not_found():
    assert run("mysql", "CREATE INDEX ix_t_a ON t (a)") == []


# table_dropped, column_dropped


@pytest.mark.parametrize("dialect", ["postgresql", "mysql", "sqlite"])
def test_dropping_an_existing_table_is_found(dialect):
    finding = only(run(dialect, "DROP TABLE t"), "table_dropped")
    assert finding.severity == "error" and finding.table == "t"


@pytest.mark.parametrize("dialect", ["postgresql", "mysql", "sqlite"])
def test_dropping_a_table_created_in_the_plan_is_exempt(dialect):
    assert run(dialect, NEW_TABLE, "DROP TABLE n") == []


def test_dropping_a_table_that_does_not_exist_is_not_found():
    assert run("postgresql", "DROP TABLE IF EXISTS gone") == []


@pytest.mark.parametrize("dialect", ["postgresql", "mysql", "sqlite"])
def test_dropping_an_existing_column_is_found(dialect):
    finding = only(run(dialect, "ALTER TABLE t DROP COLUMN x"), "column_dropped")
    assert "x" in finding.message and finding.severity == "error"


def test_dropping_a_column_added_in_the_plan_is_exempt():
    findings = run(
        "postgresql", "ALTER TABLE t ADD COLUMN x INTEGER", "ALTER TABLE t DROP COLUMN x"
    )
    assert findings == []


def test_a_renamed_table_keeps_its_rows():
    findings = run("postgresql", "ALTER TABLE t RENAME TO t2", "DROP TABLE t2")
    assert codes(findings) == ["table_renamed", "table_dropped"]
    assert "12,000" in findings[1].message


# table_renamed, column_renamed


def test_postgresql_column_rename_is_a_column_rename():
    # sqlglot reads this as a table rename; pglast (PostgreSQL's parser) does not.
    finding = only(run("postgresql", "ALTER TABLE t RENAME c TO d"), "column_renamed")
    assert "c" in finding.message and "d" in finding.message
    assert "table_renamed" not in codes(run("postgresql", "ALTER TABLE t RENAME c TO d"))


@pytest.mark.parametrize(
    "dialect, sql",
    [
        ("postgresql", "ALTER TABLE t RENAME TO t_old"),
        ("mysql", "ALTER TABLE t RENAME TO t_old"),
        ("mysql", "RENAME TABLE t TO t_old"),
        ("sqlite", "ALTER TABLE t RENAME TO t_old"),
    ],
)
def test_table_rename_is_found(dialect, sql):
    assert "t_old" in only(run(dialect, sql), "table_renamed").message


@pytest.mark.parametrize(
    "dialect, sql",
    [
        ("mysql", "ALTER TABLE t CHANGE c d INTEGER NOT NULL"),
        ("mysql", "ALTER TABLE t RENAME COLUMN c TO d"),
        ("sqlite", "ALTER TABLE t RENAME COLUMN c TO d"),
    ],
)
def test_column_rename_is_found(dialect, sql):
    findings = run(dialect, sql)
    only(findings, "column_renamed")
    assert "column_type_changed" not in codes(findings)


def test_renames_in_a_new_table_are_exempt():
    findings = run(
        "postgresql", NEW_TABLE, "ALTER TABLE n RENAME a TO b", "ALTER TABLE n RENAME TO m"
    )
    assert findings == []


# missing_lock_timeout


def lint_without_timeout(*sqls: str, **fields):
    return lint("postgresql", plan(*sqls, **fields), [], LIVE)


def test_access_exclusive_without_lock_timeout_is_found_once_per_plan():
    findings = lint_without_timeout(
        "ALTER TABLE t ADD COLUMN x INTEGER",
        "ALTER TABLE t ADD COLUMN y INTEGER",
        "DROP INDEX ix_t_a",
    )
    finding = only(findings, "missing_lock_timeout")
    assert finding.statement_index == 0 and finding.table == "t"
    assert "2 later statement(s)" in finding.message


@pytest.mark.parametrize(
    "first",
    ["SET lock_timeout = '5s'", "SET LOCAL lock_timeout = 5000", "SET lock_timeout TO 2000"],
)
def test_lock_timeout_set_earlier_in_the_plan_is_not_found(first):
    assert lint_without_timeout(first, "ALTER TABLE t ADD COLUMN x INTEGER") == []


def test_lock_timeout_set_with_set_config_is_not_found():
    set_config = "SELECT set_config('lock_timeout', '3s', false)"
    assert lint_without_timeout(set_config, "LOCK TABLE t IN ACCESS EXCLUSIVE MODE", raw=True) == []


def test_lock_table_without_lock_timeout_is_found():
    only(lint_without_timeout("LOCK TABLE t", raw=True), "missing_lock_timeout")


def test_session_lock_timeout_is_not_found():
    live = LiveState(LIVE.tables, lock_timeout_ms=3000)
    assert lint("postgresql", plan("ALTER TABLE t ADD COLUMN x INTEGER"), [], live) == []


def test_lock_timeout_set_to_zero_or_ended_with_the_transaction_is_found():
    assert codes(lint_without_timeout("SET lock_timeout = 0", "TRUNCATE t")) == [
        "missing_lock_timeout"
    ]
    findings = lint_without_timeout(
        "SET LOCAL lock_timeout = '1s'", "COMMIT", "BEGIN", "ALTER TABLE t ADD COLUMN x INTEGER"
    )
    assert only(findings, "missing_lock_timeout").statement_index == 3


def test_locks_on_tables_created_in_the_plan_or_weaker_locks_are_not_found():
    findings = lint_without_timeout(
        NEW_TABLE,
        "ALTER TABLE n ADD COLUMN x INTEGER",
        "CREATE INDEX CONCURRENTLY ix_t_a ON t (a)",
        "ALTER TABLE t VALIDATE CONSTRAINT ck_t_a",
        in_transaction=False,
    )
    assert findings == []


def test_observed_locks_decide_over_the_statement_kind():
    locks = [{"relation": "public.t", "mode": "AccessExclusiveLock"}]
    finding = only(
        lint_without_timeout("ALTER TABLE t ADD COLUMN x INTEGER", locks=locks),
        "missing_lock_timeout",
    )
    assert finding.observed == {"locks": locks} and "observed" in finding.message
    weaker = [{"relation": "public.t", "mode": "ShareUpdateExclusiveLock"}]
    assert lint_without_timeout("ALTER TABLE t ADD COLUMN x INTEGER", locks=weaker) == []


def test_mysql_has_no_lock_timeout_check():
    assert lint("mysql", plan("ALTER TABLE t ADD COLUMN x INTEGER"), [], LIVE) == []


# mysql_algorithm_copy, mysql_modify_drops_not_null


@pytest.mark.parametrize(
    "sql",
    [
        "ALTER TABLE t ADD COLUMN x INT, ALGORITHM=COPY",
        "ALTER TABLE t ADD COLUMN x INT, LOCK=SHARED",
        "ALTER TABLE t ADD INDEX ix_t_x (x), LOCK=EXCLUSIVE",
    ],
)
def test_mysql_copy_algorithm_or_blocking_lock_is_found(sql):
    only(run("mysql", sql), "mysql_algorithm_copy")


def test_mysql_inplace_without_lock_is_not_found():
    assert run("mysql", "ALTER TABLE t ADD COLUMN x INT, ALGORITHM=INPLACE, LOCK=NONE") == []


def test_mysql_modify_to_null_is_found():
    finding = only(
        run("mysql", "ALTER TABLE t MODIFY c BIGINT NULL"), "mysql_modify_drops_not_null"
    )
    assert "existing_nullable=False" in finding.advice


def test_mysql_modify_keeping_not_null_is_not_found():
    findings = run("mysql", "ALTER TABLE t MODIFY c BIGINT NOT NULL")
    assert "mysql_modify_drops_not_null" not in codes(findings)


# irreversible_downgrade


def test_missing_and_empty_downgrades_are_found_after_statement_findings():
    revisions = [
        RevisionInfo("r1", "ok"),
        RevisionInfo("r2", "missing"),
        RevisionInfo("r3", "empty"),
    ]
    findings = run("postgresql", "DROP TABLE t", revisions=revisions)
    assert codes(findings) == ["table_dropped", "irreversible_downgrade", "irreversible_downgrade"]
    assert [f.revision for f in findings[1:]] == ["r2", "r3"]
    assert findings[1].statement is None and findings[1].statement_index is None


def test_revision_with_a_downgrade_is_not_found():
    assert run("postgresql", revisions=[RevisionInfo("r1", "ok")]) == []


# unparsed_statement, raw_sql_unanalysed


def test_statement_postgresql_rejects_is_unparsed():
    finding = only(run("postgresql", "ALTER TABLE t FROBNICATE"), "unparsed_statement")
    assert "PostgreSQL's parser" in finding.message


def test_opaque_mysql_command_from_alembic_is_unparsed():
    only(run("mysql", "OPTIMIZE TABLE t"), "unparsed_statement")


@pytest.mark.parametrize(
    "dialect, sql",
    [
        ("postgresql", "DO $$ BEGIN PERFORM 1; END $$"),
        ("postgresql", "CREATE FUNCTION f() RETURNS integer AS $$ SELECT 1 $$ LANGUAGE sql"),
        ("mysql", "OPTIMIZE TABLE t"),
        ("postgresql", "UPDATE t SET a = 1"),
        ("mysql", "DELETE FROM t"),
    ],
)
def test_raw_sql_the_rules_cannot_reason_about_is_noted(dialect, sql):
    finding = only(run(dialect, sql, raw=True), "raw_sql_unanalysed")
    assert finding.severity == "info"


def test_raw_sql_the_rules_understand_is_checked_normally():
    findings = run("postgresql", "UPDATE t SET a = 1 WHERE a IS NULL", "DROP TABLE t", raw=True)
    assert codes(findings) == ["table_dropped"]


# table_rewrite


def test_observed_rewrite_without_another_explanation_is_found():
    findings = run("postgresql", "CLUSTER t USING ix_t_a", rewrote=["public.t"], raw=True)
    finding = only(findings, "table_rewrite")
    assert finding.observed == {"rewrote": ["public.t"]} and finding.table == "public.t"


def test_observed_rewrite_of_a_new_table_is_not_found():
    assert (
        run("postgresql", NEW_TABLE, "ALTER TABLE n ALTER COLUMN a TYPE BIGINT", rewrote=["n"])
        == []
    )


# What every check shares: version table, placeholders, ordering, output


@pytest.mark.parametrize("version_table", ["alembic_version", "tenant_versions"])
def test_version_table_statements_are_ignored(version_table):
    sqls = [
        f"CREATE TABLE {version_table} (version_num VARCHAR(32) NOT NULL, "
        f"CONSTRAINT {version_table}_pkc PRIMARY KEY (version_num))",
        f"INSERT INTO {version_table} (version_num) VALUES ('abc')",
        f"UPDATE {version_table} SET version_num='def' WHERE {version_table}.version_num = 'abc'",
        f"DELETE FROM {version_table} WHERE {version_table}.version_num = 'def'",
    ]
    live = LiveState({version_table: 1})
    statements = plan(*sqls)
    assert lint("postgresql", statements, [], live, version_table=version_table) == []
    assert tables_referenced("postgresql", statements, version_table=version_table) == set()


def test_placeholders_and_parameter_comments_parse():
    findings = run(
        "postgresql",
        "UPDATE t SET a=%(a)s WHERE t.id = %(id_1)s  -- parameters: {'a': 1, 'id_1': 2}",
        "ALTER TABLE t ADD COLUMN c INTEGER DEFAULT %s NOT NULL;",
        raw=True,
    )
    assert findings == []
    assert run("mysql", "UPDATE t SET a=%(a)s WHERE t.id = %s", raw=True) == []


def test_findings_come_in_statement_order_and_are_json():
    findings = run("postgresql", "ALTER TABLE t DROP COLUMN x", "CREATE INDEX ix_t_a ON t (a)")
    assert [f.statement_index for f in findings] == [0, 1]
    data = json.loads(json.dumps([f.as_dict() for f in findings]))
    assert data[0]["code"] == "column_dropped" and set(data[0]) == {
        "code",
        "severity",
        "revision",
        "statement",
        "statement_index",
        "message",
        "advice",
        "table",
        "observed",
    }


def test_tables_referenced_skips_tables_the_plan_creates():
    statements = plan(
        NEW_TABLE,
        "CREATE INDEX ix_n_a ON n (a)",
        "ALTER TABLE public.t ADD COLUMN x INTEGER",
        "DROP TABLE s",
        "ALTER TABLE n RENAME TO m",
        "DROP TABLE m",
    )
    assert tables_referenced("postgresql", statements) == {"public.t", "s"}


def test_unknown_dialect_is_refused_and_mariadb_is_mysql():
    with pytest.raises(ValueError, match="oracle"):
        lint("oracle", [], [], LIVE)
    assert codes(lint("mariadb", plan("DROP TABLE t"), [], LIVE)) == ["table_dropped"]


def test_parses_are_cached():
    assert parse("postgresql", "DROP TABLE t") is parse("postgresql", "DROP TABLE t")


def test_every_code_is_registered_and_documented():
    docs = (Path(__file__).parents[2] / "docs" / "lint.md").read_text(encoding="utf-8")
    headings = set(re.findall(r"^## `?([a-z_]+)`?$", docs, re.MULTILINE))
    assert set(CODES) <= headings
    for info in CODES.values():
        assert info.severity in ("error", "warning", "info")
        assert info.default_action in ("block", "warn")
        assert info.title and info.advice and info.anchor.endswith("#" + info.code)
