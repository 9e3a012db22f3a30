"""Previews of upgrades, downgrades and stamps on real servers: the target never changes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from sqlalchemy.engine import make_url

from service import targets
from service.jobs.run import plan
from service.jobs.run import preview as pv
from service.jobs.run.failure import JobFailure
from service.jobs.run.migrate import load_scripts
from tests.helpers import chain_bundle, revision

SETTINGS = {"version_table": "alembic_version"}
MODES_OF = {
    "postgresql": ["rolled_back", "offline"],
    "mysql": ["offline"],
    "sqlite": ["copy", "offline"],
}
CASES = [(d, m) for d, modes in MODES_OF.items() for m in modes]
LIVE = {"rolled_back", "copy"}


# ------------------------------------------------------------------ helpers
class Target:
    """A throwaway database, a bundle for it, and an open connection (as the runner has)."""

    def __init__(self, url: str, bundle: Path, files: dict[str, str]):
        for name, source in files.items():
            (bundle / name).parent.mkdir(parents=True, exist_ok=True)
            (bundle / name).write_text(source)
        self.url = make_url(url)
        self.bundle = bundle
        self.script = load_scripts(bundle, "versions", [])
        self.engine = targets.make_target_engine(self.url, 5, pooled=False)
        self.conn = self.engine.connect()

    def upgrade(self, target: str) -> None:
        """Apply revisions with plain Alembic (what a real run did before the plan)."""
        script = self.script
        env = EnvironmentContext(
            Config(),
            script,
            fn=lambda rev, _ctx: script._upgrade_revs(target, rev),
            destination_rev=target,
        )
        with env:
            env.configure(connection=self.conn, transaction_per_migration=True)
            with env.begin_transaction():
                env.run_migrations()
        targets.commit(self.conn)

    def sql(self, statement: str) -> None:
        self.conn.exec_driver_sql(statement)
        targets.commit(self.conn)

    def heads(self) -> list[str]:
        heads = targets.read_heads(self.conn, SETTINGS)
        targets.commit(self.conn)
        return heads

    def preview(self, action: str = "upgrade", target: str = "head", **kw) -> dict:
        kw.setdefault("settings", SETTINGS)
        answer = pv.preview(
            self.conn,
            self.url,
            self.script,
            action=action,
            target=target,
            heads=self.heads(),
            bundle_dir=self.bundle,
            **kw,
        )
        assert not self.conn.in_transaction()
        return answer

    def state(self) -> dict:
        """Tables, columns, indexes and the version table, read with a fresh connection."""
        engine = sa.create_engine(self.url, poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as c:
                insp = sa.inspect(c)
                tables = {}
                for name in sorted(insp.get_table_names()):
                    tables[name] = (
                        [(col["name"], str(col["type"])) for col in insp.get_columns(name)],
                        sorted(
                            (ix["name"], tuple(ix["column_names"])) for ix in insp.get_indexes(name)
                        ),
                    )
                versions = (
                    sorted(
                        r[0] for r in c.exec_driver_sql("SELECT version_num FROM alembic_version")
                    )
                    if "alembic_version" in tables
                    else None
                )
                rows = (
                    c.exec_driver_sql("SELECT count(*) FROM items").scalar()
                    if "items" in tables
                    else None
                )
            return {"tables": tables, "versions": versions, "rows": rows}
        finally:
            engine.dispose()

    def close(self) -> None:
        self.conn.close()
        self.engine.dispose()


@pytest.fixture
def make_target(new_db, tmp_path):
    made: list[Target] = []

    def make(dialect: str, files: dict[str, str]) -> Target:
        bundle = tmp_path / f"bundle{len(made)}"
        bundle.mkdir()
        made.append(Target(new_db(dialect), bundle, files))
        return made[-1]

    yield make
    for target in made:
        target.close()


def statements(answer: dict) -> list[dict]:
    return [s for step in answer["steps"] for s in step["statements"]]


def sqls(answer: dict) -> list[str]:
    return [s["sql"] for s in statements(answer)]


def chain(n: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**chain_bundle(n), **(extra or {})}


def rev_file(rev: str, down: str | None, up: str, downgrade: str = "pass", **kw) -> dict:
    return {f"versions/{rev}.py": revision(rev, down, up, downgrade, **kw)}


# ------------------------------------------------- the target never changes
@pytest.mark.parametrize("dialect,mode", CASES)
def test_upgrade_preview_shows_the_revisions_sql_and_changes_nothing(make_target, dialect, mode):
    t = make_target(dialect, chain(4))
    t.upgrade("t002")
    t.sql("INSERT INTO items (id, c2) VALUES (1, 1), (2, 2)")
    before = t.state()

    answer = t.preview(mode=mode)

    assert t.state() == before
    assert json.loads(json.dumps(answer)) == answer
    assert answer["mode"] == mode and answer["dialect"] == dialect
    assert answer["from_heads"] == ["t002"] and answer["to_heads"] == ["t004"]
    assert not answer["nothing_to_do"]
    assert [s["revisions"] for s in answer["steps"]] == [["t003"], ["t004"]]
    assert [s["direction"] for s in answer["steps"]] == ["up", "up"]
    assert answer["steps"][0]["message"] == "step 3"
    assert answer["steps"][0]["revision_file"] == "versions/t003.py"
    assert all(s["rendered"] for s in answer["steps"])
    assert [len(s["statements"]) for s in answer["steps"]] == [1, 1]
    assert "ALTER TABLE items ADD COLUMN c3 INTEGER" in sqls(answer)[0]
    assert "ALTER TABLE items ADD COLUMN c4 INTEGER" in sqls(answer)[1]
    # Only what the revisions run: nothing of Alembic's version table.
    assert not any("alembic_version" in q for q in sqls(answer))
    for stmt in statements(answer):
        assert stmt["executed"] is (mode in LIVE)
        assert stmt["raw"] is False and stmt["flag"] is None
        assert stmt["in_transaction"] is (dialect != "mysql")  # MySQL DDL commits implicitly
        if mode == "rolled_back":
            assert stmt["rewrote"] == []
        else:
            assert stmt["locks"] is None and stmt["rewrote"] is None
    if mode == "rolled_back":
        first, second = (step["statements"][0]["locks"] for step in answer["steps"])
        assert first == [{"relation": "public.items", "mode": "AccessExclusiveLock"}]
        # One transaction for the plan: the lock is held already (a documented limitation).
        assert second == []
    assert answer["limitations"]
    if dialect == "mysql":
        assert any("implicitly" in why for why in answer["limitations"])


@pytest.mark.parametrize("dialect", ["postgresql", "mysql", "sqlite"])
def test_auto_picks_the_dialects_most_faithful_mode(make_target, dialect):
    t = make_target(dialect, chain(2))
    t.upgrade("t001")
    assert t.preview()["mode"] == {"postgresql": "rolled_back", "mysql": "offline"}.get(
        dialect, "copy"
    )


@pytest.mark.parametrize("dialect,mode", CASES)
def test_preview_from_an_empty_database(make_target, dialect, mode):
    t = make_target(dialect, chain(2))
    answer = t.preview(mode=mode)
    assert t.state() == {"tables": {}, "versions": None, "rows": None}
    assert answer["from_heads"] == [] and answer["to_heads"] == ["t002"]
    assert "CREATE TABLE items" in sqls(answer)[0]
    assert not any("alembic_version" in q for q in sqls(answer))


@pytest.mark.parametrize("dialect,mode", CASES)
def test_the_projects_version_table_is_left_out_too(make_target, dialect, mode):
    t = make_target(dialect, chain(2))
    settings = {"version_table": "deploy_versions"}
    answer = t.preview(mode=mode, settings=settings)
    assert t.state()["tables"] == {}
    assert answer["to_heads"] == ["t002"]
    assert len(statements(answer)) == 2
    assert not any("deploy_versions" in q for q in sqls(answer))


@pytest.mark.parametrize("dialect,mode", CASES)
def test_nothing_to_do_at_head(make_target, dialect, mode):
    t = make_target(dialect, chain(2))
    t.upgrade("head")
    answer = t.preview(mode=mode)
    assert answer["nothing_to_do"] and answer["steps"] == []
    assert answer["from_heads"] == answer["to_heads"] == ["t002"]


@pytest.mark.parametrize("dialect,mode", CASES)
def test_downgrade_preview(make_target, dialect, mode):
    t = make_target(dialect, chain(3))
    t.upgrade("head")
    before = t.state()
    answer = t.preview("downgrade", "-1", mode=mode)
    assert t.state() == before
    assert answer["to_heads"] == ["t002"]
    (step,) = answer["steps"]
    assert step["direction"] == "down" and step["revisions"] == ["t003"]
    assert "DROP COLUMN c3" in step["statements"][0]["sql"]
    assert not any("alembic_version" in q for q in sqls(answer))


@pytest.mark.parametrize("dialect,mode", CASES)
def test_stamp_preview_runs_no_revision_code(make_target, dialect, mode):
    t = make_target(dialect, chain(3))
    t.upgrade("t003")
    before = t.state()
    answer = t.preview("stamp", "t001", mode=mode)
    assert t.state() == before
    assert answer["to_heads"] == ["t001"] and not answer["nothing_to_do"]
    assert [s["direction"] for s in answer["steps"]] == ["stamp"]
    assert statements(answer) == []


def test_offline_renders_each_head_of_a_branched_graph(make_target):
    files = {
        **rev_file(
            "a1", None, "op.create_table('items', sa.Column('id', sa.Integer, primary_key=True))"
        ),
        **rev_file(
            "b1", "a1", "op.add_column('items', sa.Column('b', sa.Integer))", branch_labels="b"
        ),
        **rev_file(
            "c1", "a1", "op.add_column('items', sa.Column('c', sa.Integer))", branch_labels="c"
        ),
        **rev_file("b2", "b1", "op.add_column('items', sa.Column('b2', sa.Integer))"),
    }
    t = make_target("postgresql", files)
    t.upgrade("b@b1")
    t.upgrade("c@c1")
    assert t.heads() == ["b1", "c1"]
    for mode in ("offline", "rolled_back"):
        answer = t.preview(target="heads", mode=mode)
        assert answer["from_heads"] == ["b1", "c1"] and answer["to_heads"] == ["b2", "c1"]
        assert [s["revisions"] for s in answer["steps"]] == [["b2"]]
        assert "ADD COLUMN b2" in sqls(answer)[0]
    with pytest.raises(JobFailure) as err:
        t.preview(target="+1")
    assert err.value.error["code"] == "ambiguous_relative_target"


# ------------------------------------------------------- data migrations
DATA = """
n = op.get_bind().execute(sa.text("SELECT count(*) FROM items")).scalar()
op.execute(f"UPDATE items SET c2 = {n}")
"""


@pytest.mark.parametrize("dialect,mode", CASES)
def test_a_data_migration_shows_live_values_or_is_marked_not_rendered(make_target, dialect, mode):
    files = chain(
        2,
        {
            **rev_file("d003", "t002", DATA),
            **rev_file("d004", "d003", "op.add_column('items', sa.Column('c4', sa.Integer))"),
        },
    )
    t = make_target(dialect, files)
    t.upgrade("t002")
    t.sql("INSERT INTO items (id, c2) VALUES (1, 0), (2, 0), (3, 0)")
    before = t.state()

    answer = t.preview(mode=mode)

    assert t.state() == before
    data, after = answer["steps"]
    assert after["rendered"] and "ADD COLUMN c4" in after["statements"][0]["sql"]
    if mode in LIVE:
        assert data["rendered"] and data["note"] is None
        read, update = data["statements"]
        assert "SELECT count(*) FROM items" in read["sql"] and read["raw"] is False
        assert update["sql"] == "UPDATE items SET c2 = 3" and update["raw"] is True
        assert update["executed"]
    else:
        assert data["rendered"] is False
        assert "d003" in data["note"] and "op.get_bind()" in data["note"]
        assert "versions/d003.py" in data["note"]
        assert any("not rendered" in why for why in answer["limitations"])


# ---------------------------------------------------------- PostgreSQL
def pg_revisions(*ups: str) -> dict[str, str]:
    files = chain(1)
    down = "t001"
    for i, up in enumerate(ups, start=2):
        rev = f"p{i:03d}"
        files.update(rev_file(rev, down, up))
        down = rev
    return files


def test_postgresql_locks_and_rewrites_are_observed(make_target):
    t = make_target(
        "postgresql",
        pg_revisions(
            "op.add_column('items', sa.Column('c2', sa.Integer, nullable=True))",
            "op.create_index('ix_items_c2', 'items', ['c2'])",
            "op.alter_column('items', 'c2', type_=sa.BigInteger)",
        ),
    )
    t.upgrade("t001")
    t.sql("INSERT INTO items (id) SELECT g FROM generate_series(1, 50) g")
    before = t.state()

    answer = t.preview(mode="rolled_back")

    assert t.state() == before
    add, index, alter = (step["statements"] for step in answer["steps"])
    assert add[0]["locks"] == [{"relation": "public.items", "mode": "AccessExclusiveLock"}]
    assert add[0]["rewrote"] == []
    assert {"relation": "public.items", "mode": "ShareLock"} in index[0]["locks"]
    # The index itself is new in that step: a lock on it blocks nobody.
    assert not any(lock["relation"] == "public.ix_items_c2" for lock in index[0]["locks"])
    assert "TYPE BIGINT" in alter[0]["sql"]
    assert alter[0]["rewrote"] == ["public.items"]


def test_postgresql_concurrently_is_shown_not_run(make_target):
    t = make_target(
        "postgresql",
        pg_revisions(
            "op.add_column('items', sa.Column('c2', sa.Integer))",
            """
            with op.get_context().autocommit_block():
                op.create_index('ix_items_c2', 'items', ['c2'], postgresql_concurrently=True)
            op.add_column('items', sa.Column('c3', sa.Integer))
            """,
            "op.execute('CREATE INDEX CONCURRENTLY ix_items_c3 ON items (c3)')",
        ),
    )
    t.upgrade("t001")
    before = t.state()

    answer = t.preview(mode="rolled_back")

    assert t.state() == before
    _, block, outside = answer["steps"]
    create, add = block["statements"]
    assert "CREATE INDEX CONCURRENTLY ix_items_c2" in create["sql"]
    assert create["flag"] == "autocommit_block" and create["executed"] is False
    assert create["in_transaction"] is False and create["locks"] is None
    assert add["executed"] and add["in_transaction"] and add["flag"] is None
    assert "shown, not run" in block["note"]
    (raw,) = outside["statements"]
    assert raw["flag"] == "concurrently" and raw["raw"] and raw["executed"] is False
    assert "real run fails" in outside["note"]
    assert any("autocommit_block" in why for why in answer["limitations"])
    # The index that was only shown is not there (nor was it ever built).
    indexes = [name for name, _cols in t.state()["tables"]["items"][1]]
    assert "ix_items_c2" not in indexes and "ix_items_c3" not in indexes

    offline = t.preview(mode="offline")
    flags = [s["flag"] for s in statements(offline)]
    assert flags == [None, "autocommit_block", None, "concurrently"]
    assert not any(q.upper() in ("BEGIN", "COMMIT") for q in sqls(offline))


def test_postgresql_catalog_reads_run_but_are_not_listed(make_target):
    up = """
    if "items" in sa.inspect(op.get_bind()).get_table_names():
        op.add_column('items', sa.Column('c2', sa.Integer))
    """
    t = make_target("postgresql", pg_revisions(up))
    t.upgrade("t001")
    answer = t.preview(mode="rolled_back")
    assert sqls(answer) == ["ALTER TABLE items ADD COLUMN c2 INTEGER"]


def test_offline_sends_nothing_to_the_target(make_target):
    t = make_target("postgresql", chain(2, rev_file("d003", "t002", DATA)))
    t.upgrade("t002")
    seen: list[str] = []
    heads = t.heads()
    sa.event.listen(t.conn, "before_cursor_execute", lambda *a: seen.append(a[2]))
    answer = pv.preview(
        t.conn,
        t.url,
        t.script,
        action="upgrade",
        target="head",
        heads=heads,
        settings=SETTINGS,
        mode="offline",
    )
    assert seen == [] and answer["steps"][0]["rendered"] is False


def test_postgresql_sequences_advanced_are_reported(make_target):
    t = make_target(
        "postgresql",
        pg_revisions('op.execute("INSERT INTO items DEFAULT VALUES")'),
    )
    t.upgrade("t001")
    before = t.state()
    answer = t.preview(mode="rolled_back")
    assert t.state() == before
    assert answer["sequences_advanced"] == ["public.items_id_seq"]
    assert any("items_id_seq" in why for why in answer["limitations"])
    assert t.preview(mode="offline")["sequences_advanced"] == []


def test_postgresql_lock_timeout_names_the_table_and_revision(make_target):
    t = make_target(
        "postgresql", pg_revisions("op.add_column('items', sa.Column('c2', sa.Integer))")
    )
    t.upgrade("t001")
    holder = sa.create_engine(t.url, poolclass=sa.pool.NullPool)
    with holder.connect() as other:
        other.exec_driver_sql("LOCK TABLE items IN ACCESS SHARE MODE")
        with pytest.raises(JobFailure) as err:
            t.preview(mode="rolled_back", lock_timeout_ms=200)
        other.rollback()
    holder.dispose()
    error = err.value.error
    assert error["code"] == "plan_lock_timeout"
    assert "p002" in error["message"] and "items" in error["message"]
    assert "200 ms" in error["message"] and error["revision"] == "p002"
    assert t.heads() == ["t001"]


def test_postgresql_failing_revision_is_plan_failed_and_rolled_back(make_target):
    t = make_target(
        "postgresql",
        pg_revisions(
            "op.add_column('items', sa.Column('c2', sa.Integer))",
            "op.create_table('other', sa.Column('id', sa.Integer, primary_key=True))\n"
            "raise RuntimeError('boom')",
        ),
    )
    t.upgrade("t001")
    before = t.state()
    with pytest.raises(JobFailure) as err:
        t.preview(mode="rolled_back")
    error = err.value.error
    assert error["code"] == "plan_failed" and error["revision"] == "p003"
    lines = (t.bundle / "versions/p003.py").read_text().splitlines()
    assert error["file"] == "versions/p003.py"
    assert "boom" in lines[error["line"] - 1]
    assert "boom" in error["message"] and "rolled back" in error["message"]
    assert t.state() == before


@pytest.mark.parametrize(
    "code",
    ["op.get_bind().commit()", "op.execute('COMMIT')"],
    ids=["connection-commit", "raw-commit"],
)
def test_postgresql_a_revision_cannot_commit_the_preview(make_target, code):
    t = make_target(
        "postgresql",
        pg_revisions(
            f"op.create_table('other', sa.Column('id', sa.Integer, primary_key=True))\n{code}"
        ),
    )
    t.upgrade("t001")
    before = t.state()
    if code.startswith("op.execute"):
        answer = t.preview(mode="rolled_back")
        (_, commit) = answer["steps"][0]["statements"]
        assert commit["flag"] == "transaction_control" and not commit["executed"]
    else:
        with pytest.raises(JobFailure) as err:
            t.preview(mode="rolled_back")
        assert err.value.error["code"] == "plan_failed"
        assert "ends the transaction" in err.value.error["message"]
    assert t.state() == before
    assert t.heads() == ["t001"]


def test_postgresql_statement_timeout_from_settings(make_target):
    t = make_target("postgresql", pg_revisions("op.execute('SELECT pg_sleep(2)')"))
    t.upgrade("t001")
    with pytest.raises(JobFailure) as err:
        t.preview(mode="rolled_back", settings={**SETTINGS, "statement_timeout_ms": 100})
    assert err.value.error["code"] == "plan_failed"
    assert "statement timeout" in err.value.error["message"]


# ------------------------------------------------------------------ SQLite
BATCH = """
with op.batch_alter_table('items') as batch:
    batch.alter_column('c2', new_column_name='renamed', existing_type=sa.Integer)
"""


def test_sqlite_batch_mode_renders_on_a_copy_not_offline(make_target, tmp_path):
    t = make_target("sqlite", chain(2, rev_file("s003", "t002", BATCH)))
    t.upgrade("t002")
    t.sql("INSERT INTO items (id, c2) VALUES (1, 5)")
    before = t.state()
    copies = tmp_path / "copies"
    copies.mkdir()

    digest = hashlib.sha256(Path(t.url.database).read_bytes()).hexdigest()

    copied = t.preview(mode="copy", tmp_dir=str(copies))

    assert hashlib.sha256(Path(t.url.database).read_bytes()).hexdigest() == digest
    assert t.state() == before and list(copies.iterdir()) == []
    (step,) = copied["steps"]
    assert step["rendered"]
    joined = "\n".join(sqls(copied))
    assert "_alembic_tmp_items" in joined and "renamed" in joined
    # Batch mode's reflection of the table is not what the revision changes: not listed.
    assert "PRAGMA" not in joined and "sqlite_master" not in joined
    assert sqls(copied)[0].startswith("CREATE TABLE _alembic_tmp_items")
    assert all(s["executed"] for s in step["statements"])

    offline = t.preview(mode="offline")
    (step,) = offline["steps"]
    assert step["rendered"] is False and "batch" in step["note"] and "s003" in step["note"]
    assert t.state() == before


def test_sqlite_copy_runs_autocommit_blocks_on_the_copy(make_target):
    up = """
    with op.get_context().autocommit_block():
        op.execute('CREATE INDEX ix_items_c2 ON items (c2)')
    """
    t = make_target("sqlite", chain(2, rev_file("s003", "t002", up)))
    t.upgrade("t002")
    before = t.state()
    answer = t.preview(mode="copy")
    assert t.state() == before
    (stmt,) = statements(answer)
    assert stmt["flag"] == "autocommit_block" and stmt["executed"] and not stmt["in_transaction"]


def test_sqlite_copy_failure_is_plan_failed(make_target):
    t = make_target("sqlite", chain(2, rev_file("s003", "t002", "op.drop_table('missing')")))
    t.upgrade("t002")
    before = t.state()
    with pytest.raises(JobFailure) as err:
        t.preview(mode="copy")
    assert err.value.error["code"] == "plan_failed" and err.value.error["revision"] == "s003"
    assert "missing" in err.value.error["message"]
    assert t.state() == before


def test_sqlite_copy_keeps_the_connections_foreign_keys_setting(make_target):
    files = {
        **rev_file(
            "f001",
            None,
            """
            op.create_table('parent', sa.Column('id', sa.Integer, primary_key=True))
            op.create_table(
                'child',
                sa.Column('id', sa.Integer, primary_key=True),
                sa.Column('parent_id', sa.Integer, sa.ForeignKey('parent.id')),
            )
            """,
        ),
        **rev_file("f002", "f001", "op.execute('INSERT INTO child (id, parent_id) VALUES (1, 9)')"),
    }
    t = make_target("sqlite", files)
    t.upgrade("f001")
    assert t.preview(mode="copy")["steps"][0]["statements"][0]["executed"]
    t.conn.connection.dbapi_connection.execute("PRAGMA foreign_keys=ON")
    with pytest.raises(JobFailure) as err:
        t.preview(mode="copy")
    assert err.value.error["code"] == "plan_failed"
    assert "FOREIGN KEY" in err.value.error["message"]
    assert err.value.error["statement"].startswith("INSERT INTO child")


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize(
    "dialect,mode",
    [
        ("mysql", "rolled_back"),
        ("sqlite", "rolled_back"),
        ("postgresql", "copy"),
        ("mysql", "copy"),
        ("postgresql", "bogus"),
    ],
)
def test_invalid_modes_are_refused(make_target, dialect, mode):
    t = make_target(dialect, chain(2))
    t.upgrade("t001")
    with pytest.raises(JobFailure) as err:
        t.preview(mode=mode)
    assert err.value.error["code"] == "invalid_plan_mode"
    if dialect == "mysql":
        assert "implicitly" in err.value.error["message"]


def test_an_unknown_target_is_invalid_target(make_target):
    t = make_target("sqlite", chain(2))
    with pytest.raises(JobFailure) as err:
        t.preview(target="nosuch")
    assert err.value.error["code"] == "invalid_target"


# --------------------------------------------------------- revisions_info
def test_revisions_info_reads_each_downgrade(make_target):
    files = {
        **rev_file("r1", None, "pass", "op.drop_table('x')"),
        **rev_file("r2", "r1", "pass", '"""nothing to undo"""\npass\n...'),
        "versions/r3.py": revision("r3", "r2", "pass").split("\n\ndef downgrade")[0] + "\n",
    }
    t = make_target("sqlite", files)
    steps = plan.steps_for(t.script, "upgrade", "head", ())
    info = pv.revisions_info(t.script, steps)
    assert info == [
        {"revision": "r1", "downgrade": "ok"},
        {"revision": "r2", "downgrade": "empty"},
        {"revision": "r3", "downgrade": "missing"},
    ]
    assert pv.revisions_info(t.script, ["r2", "r2"]) == [{"revision": "r2", "downgrade": "empty"}]
    down = plan.steps_for(t.script, "downgrade", "base", ("r2",))
    assert pv.revisions_info(t.script, down) == []
    t.upgrade("head")
    with pytest.raises(JobFailure) as err:
        t.preview("downgrade", "base", mode="copy")  # r3 has no downgrade()
    assert err.value.error["code"] == "plan_failed" and "downgrade" in err.value.error["message"]


# ------------------------------------------------------------ live_tables
@pytest.mark.parametrize("dialect", ["postgresql", "mysql", "sqlite"])
def test_live_tables(make_target, dialect):
    t = make_target(dialect, chain(2))
    t.upgrade("head")
    t.sql("INSERT INTO items (id) VALUES (1), (2), (3)")
    if dialect == "postgresql":
        t.sql("ANALYZE items")
    elif dialect == "mysql":
        t.sql("ANALYZE TABLE items")
    found = pv.live_tables(
        t.conn, dialect, {"items", "nosuch", "alembic_version"}, "alembic_version"
    )
    assert not t.conn.in_transaction()
    assert "nosuch" not in found and "alembic_version" not in found
    assert found["items"] == 3
    schema = {"postgresql": "public", "sqlite": "main", "mysql": t.url.database}[dialect]
    assert found[f"{schema}.items"] == 3
    assert pv.live_tables(t.conn, dialect, set(), "alembic_version") == {}
    if dialect == "sqlite":
        t.sql(
            "INSERT INTO items (id) SELECT value + 10 FROM json_each('["
            + ",".join(map(str, range(2000)))
            + "]')"
        )
        assert pv.live_tables(t.conn, dialect, {"items"}, "alembic_version")["items"] == 1001
    if dialect == "postgresql":
        t.sql("CREATE TABLE fresh (id int)")
        assert pv.live_tables(t.conn, dialect, {"public.fresh"}, "alembic_version") == {
            "public.fresh": None,
            "fresh": None,
        }


def test_previews_leave_alembic_as_they_found_it(make_target):
    """The patched op.execute and autocommit_block are restored, even after a failure."""
    from alembic.operations import Operations, ops
    from alembic.runtime.migration import MigrationContext

    execute_sql = Operations._to_impl.dispatch(ops.ExecuteSQLOp)
    block = MigrationContext.autocommit_block
    t = make_target("sqlite", chain(2, rev_file("s003", "t002", DATA)))
    t.upgrade("t002")
    answer = t.preview(mode="offline")
    assert answer["steps"][0]["rendered"] is False
    assert Operations._to_impl.dispatch(ops.ExecuteSQLOp) is execute_sql
    assert MigrationContext.autocommit_block is block
    import alembic.op

    assert getattr(alembic.op, "_proxy", None) is None
