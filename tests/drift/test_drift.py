"""The drift check against real servers: a bundle's schema built by plain Alembic on a live
database, then changed by hand, compared with what Retort builds on a scratch database."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.operations import Operations, ops
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import make_url

from service import targets
from service.jobs.run.drift import SCRATCH_PREFIX, check_drift
from service.jobs.run.drift_normalize import Normalizer, canonical_default
from service.jobs.run.failure import JobFailure
from service.jobs.run.migrate import load_scripts
from tests.conftest import MY_ADMIN, PG_ADMIN
from tests.helpers import revision

DIALECTS = ["postgresql", "mysql", "sqlite"]
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Plain Alembic's env.py: what a user without Retort runs.
ENV_PY = """
import sqlalchemy as sa
from alembic import context

config = context.config
naming = config.attributes.get("naming_convention")
engine = sa.create_engine(config.attributes["url"], poolclass=sa.pool.NullPool)
with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=sa.MetaData(naming_convention=naming) if naming else sa.MetaData(),
        version_table=config.attributes.get("version_table", "alembic_version"),
    )
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
"""

AUTHOR = """
op.create_table(
    "author",
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(50), nullable=False),
    sa.Column("email", sa.String(200), nullable=False),
    sa.Column("active", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False,
              server_default=sa.func.now()),
    sa.Column("status", sa.Enum("new", "active", "gone", name="author_status"),
              nullable=False, server_default="new"),
    sa.Column("rating", sa.Numeric(10, 2), server_default=sa.text("0")),
    sa.UniqueConstraint("email"),
)
op.create_index("ix_author_name", "author", ["name"])
"""

POST = """
op.create_table(
    "post",
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("author_id", sa.Integer, sa.ForeignKey("author.id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("editor_id", sa.Integer),
    sa.Column("title", sa.String(50), nullable=False, server_default="untitled"),
    sa.Column("slug", sa.String(50)),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("score", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("published", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.ForeignKeyConstraint(["editor_id"], ["author.id"], name="fk_post_editor"),
)
op.create_index("ix_post_author_title", "post", ["author_id", "title"], unique=True)
op.create_index("ix_post_score", "post", ["score"])
"""

# SQLite rebuilds the table (a change of nullability), which reorders its constraints.
REBUILD = """
with op.batch_alter_table("post") as batch:
    batch.add_column(sa.Column("views", sa.BigInteger, nullable=False,
                               server_default=sa.text("0")))
    batch.alter_column("body", existing_type=sa.Text, nullable=True)
    batch.create_unique_constraint("uq_post_slug", ["slug"])
"""

ROWS = [
    "INSERT INTO author (name, email) VALUES ('ann', 'ann@example.com')",
    "INSERT INTO author (name, email, rating) VALUES ('bob', 'bob@example.com', 4.5)",
    "INSERT INTO post (author_id, title, slug, body) VALUES (1, 'hello', 'hello', 'text')",
    "INSERT INTO post (author_id, editor_id, slug, body, score) VALUES (2, 1, 'b', 'more', 3)",
    "DELETE FROM post WHERE slug = 'b'",  # the counters are past the rows
]


def make_bundle(root: Path, revisions: list[tuple[str, str | None, str]]) -> Path:
    """A bundle folder: plain Alembic's env.py and versions/<rev>.py."""
    (root / "versions").mkdir(parents=True)
    (root / "env.py").write_text(textwrap.dedent(ENV_PY))
    for rev, down, upgrade in revisions:
        (root / "versions" / f"{rev}.py").write_text(revision(rev, down, upgrade))
    return root


def chain(root: Path) -> Path:
    return make_bundle(root, [("a1", None, AUTHOR), ("a2", "a1", POST), ("a3", "a2", REBUILD)])


def upgrade_live(bundle: Path, url: str, target: str = "heads", naming=None) -> None:
    """Bring the live database to `target` with plain Alembic, not Retort."""
    cfg = Config()
    cfg.set_main_option("script_location", str(bundle))
    cfg.attributes.update(url=url, naming_convention=naming)
    command.upgrade(cfg, target)


def execute(url: str, *statements: str) -> None:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.begin() as c:
        for statement in statements:
            c.exec_driver_sql(statement)
    engine.dispose()


def alter(url: str, change) -> None:
    """Change the live schema by hand, with Alembic's operations."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.begin() as c:
        change(Operations(MigrationContext.configure(c)))
    engine.dispose()


def drift(url: str, bundle: Path, naming=None, **kw) -> dict:
    """Retort's drift check of `url` at its heads, as the runner calls it."""
    settings = {"version_table": "alembic_version", "naming_convention": naming}
    target = make_url(url)
    engine = targets.make_target_engine(target, 10)
    try:
        with engine.connect() as conn:
            heads = kw.pop("heads", None)
            if heads is None:
                heads = targets.read_heads(conn, settings)
                targets.commit(conn)
            script = load_scripts(bundle, "versions", [])
            result = check_drift(
                conn, target, script, heads=heads, settings=settings, scratch_url=None, **kw
            )
            assert conn.get_transaction() is None  # left as it was given
    finally:
        engine.dispose()
    json.dumps(result)  # JSON-able
    return result


def scratch_databases(dialect: str, tmp_dir: Path | None = None) -> set[str]:
    if dialect == "sqlite":
        return {p.name for p in tmp_dir.iterdir()}
    engine = sa.create_engine(PG_ADMIN if dialect == "postgresql" else MY_ADMIN)
    with engine.connect() as c:
        if dialect == "postgresql":
            rows = c.exec_driver_sql("SELECT datname FROM pg_database").scalars()
        else:
            rows = c.exec_driver_sql("SHOW DATABASES").scalars()
        names = {n for n in rows if n.startswith(SCRATCH_PREFIX)}
    engine.dispose()
    return names


def kinds(result: dict) -> set[tuple[str, str, str | None]]:
    return {(d["kind"], d["table"], d["name"]) for d in result["differences"]}


# ------------------------------------------------------------------ no drift
@pytest.mark.parametrize("naming", [NAMING, None], ids=["naming", "anonymous"])
@pytest.mark.parametrize("dialect", DIALECTS)
def test_no_drift_on_a_schema_the_bundle_built(new_db, tmp_path, dialect, naming):
    url = new_db(dialect)
    bundle = chain(tmp_path / "bundle")
    upgrade_live(bundle, url, naming=naming)
    execute(url, *ROWS)
    result = drift(url, bundle, naming=naming, tmp_dir=str(tmp_path))
    assert result["differences"] == [], result
    assert result["drifted"] is False
    assert result["operations"] == ""
    assert result["heads"] == ["a3"] and result["dialect"] == dialect
    assert result["ignored"][0] == "the version table alembic_version (Alembic's own)"
    if dialect == "sqlite":
        assert result["scratch"] == "sqlite temporary file"
    else:
        assert result["scratch"].startswith(f"{dialect} server 127.0.0.1:")
        assert "@" not in result["scratch"]


def test_no_drift_with_several_heads(new_db, tmp_path):
    url = new_db("sqlite")
    bundle = make_bundle(
        tmp_path / "bundle",
        [
            ("a1", None, AUTHOR),
            ("b1", "a1", "op.create_table('tag', sa.Column('id', sa.Integer, primary_key=True))"),
            ("c1", "a1", "op.add_column('author', sa.Column('bio', sa.Text))"),
        ],
    )
    upgrade_live(bundle, url)
    result = drift(url, bundle, tmp_dir=str(tmp_path))
    assert result["heads"] == ["b1", "c1"]
    assert result["drifted"] is False, result


# --------------------------------------------------------------- differences
@pytest.mark.parametrize("dialect", DIALECTS)
def test_a_column_added_on_live_is_found(new_db, tmp_path, dialect):
    url = new_db(dialect)
    bundle = chain(tmp_path / "bundle")
    upgrade_live(bundle, url, naming=NAMING)
    execute(url, *ROWS)
    alter(url, lambda op: op.add_column("post", sa.Column("extra", sa.Integer)))
    result = drift(url, bundle, naming=NAMING, tmp_dir=str(tmp_path))
    assert result["drifted"] is True
    assert kinds(result) == {("remove_column", "post", "extra")}, result
    assert result["differences"][0]["detail"] == "live has it, the bundle does not"
    assert result["operations"].startswith("# ### commands auto generated by Alembic")
    assert "\nop.drop_column('post', 'extra')\n" in result["operations"]


@pytest.mark.parametrize("dialect", DIALECTS)
def test_a_dropped_index_and_a_changed_type_are_found(new_db, tmp_path, dialect):
    url = new_db(dialect)
    bundle = chain(tmp_path / "bundle")
    upgrade_live(bundle, url, naming=NAMING)
    execute(url, *ROWS)

    def change(op):
        op.drop_index("ix_post_score", table_name="post")
        with op.batch_alter_table("post") as batch:  # SQLite rebuilds the table again
            batch.alter_column(
                "slug", existing_type=sa.String(50), type_=sa.String(200), existing_nullable=True
            )

    alter(url, change)
    result = drift(url, bundle, naming=NAMING, tmp_dir=str(tmp_path))
    assert kinds(result) == {
        ("add_index", "post", "ix_post_score"),
        ("modify_type", "post", "slug"),
    }, result
    by_kind = {d["kind"]: d for d in result["differences"]}
    assert by_kind["modify_type"]["detail"] == "VARCHAR(200) -> VARCHAR(50) (live -> bundle)"
    assert "index on (score): the bundle builds it" in by_kind["add_index"]["detail"]
    assert "op.create_index('ix_post_score', 'post', ['score']" in result["operations"]
    assert "op.alter_column('post', 'slug'" in result["operations"]


@pytest.mark.parametrize("dialect", DIALECTS)
def test_a_table_and_a_foreign_key_changed_on_live_are_found(new_db, tmp_path, dialect):
    url = new_db(dialect)
    bundle = chain(tmp_path / "bundle")
    upgrade_live(bundle, url, naming=NAMING)

    def change(op):
        op.create_table("notes", sa.Column("id", sa.Integer, primary_key=True))
        with op.batch_alter_table("post") as batch:
            batch.drop_constraint("fk_post_editor", type_="foreignkey")
            batch.alter_column(
                "score", existing_type=sa.Integer, nullable=True, existing_server_default="0"
            )
            batch.alter_column(
                "title",
                existing_type=sa.String(50),
                existing_nullable=False,
                server_default="none",
            )

    alter(url, change)
    result = drift(url, bundle, naming=NAMING, tmp_dir=str(tmp_path))
    assert kinds(result) == {
        ("remove_table", "notes", None),
        ("add_fk", "post", "fk_post_editor"),
        ("modify_nullable", "post", "score"),
        ("modify_default", "post", "title"),
    }, result
    details = {d["kind"]: d["detail"] for d in result["differences"]}
    assert details["modify_nullable"] == "NULL -> NOT NULL (live -> bundle)"
    assert "'none'" in details["modify_default"] and "'untitled'" in details["modify_default"]
    assert details["add_fk"].startswith("foreign key (editor_id) -> author.id")
    assert "op.create_foreign_key('fk_post_editor', 'post', 'author'" in result["operations"]
    assert "op.drop_table('notes')" in result["operations"]


ITEM = """
op.create_table(
    "item",
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("qty", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("price", sa.Numeric(10, 2), nullable=False, server_default=sa.text("0")),
    sa.Column("seen_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
    sa.Column("label", sa.String(10), server_default="x"),
    sa.Column("flag", sa.Boolean, nullable=False, server_default=sa.false()),
)
"""
# The same table, written by hand with other spellings (a database that predates its
# bundle and was stamped).
ITEM_BY_HAND = {
    "postgresql": "CREATE TABLE item (id SERIAL PRIMARY KEY, qty INTEGER NOT NULL DEFAULT '0', "
    "price NUMERIC(10,2) NOT NULL DEFAULT 0.00, seen_at TIMESTAMPTZ DEFAULT CURRENT_TIMESTAMP, "
    "label VARCHAR(10) DEFAULT 'x'::text, flag BOOLEAN NOT NULL DEFAULT 'f')",
    "mysql": "CREATE TABLE item (id INT(11) NOT NULL AUTO_INCREMENT, qty INT NOT NULL DEFAULT '0', "
    "price DECIMAL(10,2) NOT NULL DEFAULT '0.00', seen_at DATETIME NULL DEFAULT now(), "
    "label VARCHAR(10) DEFAULT 'x', flag BOOL NOT NULL DEFAULT FALSE, PRIMARY KEY (id))",
    "sqlite": "CREATE TABLE item (id INTEGER NOT NULL PRIMARY KEY, qty INT NOT NULL DEFAULT '0', "
    "price NUMERIC(10,2) NOT NULL DEFAULT 0.00, seen_at DATETIME DEFAULT (CURRENT_TIMESTAMP), "
    "label VARCHAR(10) DEFAULT 'x', flag BOOLEAN NOT NULL DEFAULT 0)",
}


@pytest.mark.parametrize("dialect", DIALECTS)
def test_equivalent_spellings_on_live_are_not_drift(new_db, tmp_path, dialect):
    url = new_db(dialect)
    bundle = make_bundle(tmp_path / "bundle", [("i1", None, ITEM)])
    execute(url, ITEM_BY_HAND[dialect], "INSERT INTO item (qty) VALUES (3)")
    cfg = Config()
    cfg.set_main_option("script_location", str(bundle))
    cfg.attributes.update(url=url)
    command.stamp(cfg, "heads")
    result = drift(url, bundle, tmp_dir=str(tmp_path))
    assert result["drifted"] is False, result
    if dialect != "mysql":  # MariaDB writes both alike already
        assert any(line.startswith("server defaults spelled") for line in result["ignored"])


@pytest.mark.parametrize("dialect", DIALECTS)
def test_no_drift_with_generated_columns(new_db, tmp_path, dialect):
    # PostgreSQL: an identity column; SQLite: only INTEGER is the rowid.
    identity = "sa.BigInteger, sa.Identity()" if dialect == "postgresql" else "sa.Integer"
    bundle = make_bundle(
        tmp_path / "bundle",
        [
            (
                "g1",
                None,
                f"""
op.create_table(
    "thing",
    sa.Column("id", {identity}, primary_key=True),
    sa.Column("n", sa.Integer),
    sa.Column("twice", sa.Integer, sa.Computed("n * 2", persisted=True)),
)
""",
            )
        ],
    )
    url = new_db(dialect)
    upgrade_live(bundle, url)
    execute(url, "INSERT INTO thing (n) VALUES (1)")
    assert drift(url, bundle, tmp_dir=str(tmp_path))["drifted"] is False


ENUM_ADDED = {
    "postgresql": "ALTER TYPE author_status ADD VALUE 'banned'",
    "mysql": "ALTER TABLE author MODIFY status ENUM('new','active','gone','banned') NOT NULL "
    "DEFAULT 'new'",
}


@pytest.mark.parametrize("dialect", ["postgresql", "mysql"])
def test_an_enum_value_added_on_live_is_found(new_db, tmp_path, dialect):
    url = new_db(dialect)
    bundle = chain(tmp_path / "bundle")
    upgrade_live(bundle, url)
    execute(url, ENUM_ADDED[dialect])
    result = drift(url, bundle)
    assert kinds(result) == {("modify_type", "author", "status")}, result
    assert "'banned'" in result["differences"][0]["detail"]


# ------------------------------------------------------------------- scratch
@pytest.mark.parametrize("dialect", DIALECTS)
def test_the_scratch_database_is_gone_afterwards(new_db, tmp_path, dialect):
    url = new_db(dialect)
    bundle = chain(tmp_path / "bundle")
    upgrade_live(bundle, url)
    scratch_dir = tmp_path / "scratch"
    scratch_dir.mkdir()
    before = scratch_databases(dialect, scratch_dir)
    assert drift(url, bundle, tmp_dir=str(scratch_dir))["drifted"] is False
    assert scratch_databases(dialect, scratch_dir) <= before


@pytest.mark.parametrize("dialect", DIALECTS)
def test_a_revision_failing_on_the_scratch_is_named_and_the_scratch_dropped(
    new_db, tmp_path, dialect
):
    url = new_db(dialect)
    bundle = make_bundle(
        tmp_path / "bundle",
        [
            ("a1", None, AUTHOR),
            ("a2", "a1", "op.execute(sa.text('SELECT * FROM no_such_table'))"),
        ],
    )
    scratch_dir = tmp_path / "scratch"
    scratch_dir.mkdir()
    before = scratch_databases(dialect, scratch_dir)
    with pytest.raises(JobFailure) as failed:
        drift(url, bundle, heads=["a2"], tmp_dir=str(scratch_dir))
    error = failed.value.error
    assert error["code"] == "drift_build_failed"
    assert error["revision"] == "a2"
    assert error["file"] == "versions/a2.py"
    assert isinstance(error["line"], int)
    assert "no_such_table" in error["message"] and "revision a2 (versions/a2.py" in error["message"]
    assert scratch_databases(dialect, scratch_dir) <= before


@pytest.mark.parametrize("dialect", DIALECTS)
def test_a_database_at_base_compares_against_an_empty_schema(new_db, tmp_path, dialect):
    url = new_db(dialect)
    bundle = chain(tmp_path / "bundle")
    result = drift(url, bundle, tmp_dir=str(tmp_path))
    assert result == {
        **result,
        "drifted": False,
        "heads": [],
        "differences": [],
        "operations": "",
    }
    execute(url, "CREATE TABLE handmade (id INTEGER PRIMARY KEY)")
    result = drift(url, bundle, tmp_dir=str(tmp_path))
    assert kinds(result) == {("remove_table", "handmade", None)}
    assert "op.drop_table('handmade')" in result["operations"]


@pytest.mark.parametrize("dialect", ["postgresql", "mysql"])
def test_a_scratch_server_given_by_the_operator(new_db, tmp_path, dialect):
    url = new_db(dialect)
    bundle = chain(tmp_path / "bundle")
    upgrade_live(bundle, url)
    settings = {"version_table": "alembic_version"}
    admin = make_url(PG_ADMIN if dialect == "postgresql" else MY_ADMIN)
    # The operator's URL may name the dialect without Retort's driver.
    admin = admin.set(drivername=dialect)
    engine = targets.make_target_engine(make_url(url), 10)
    with engine.connect() as conn:
        script = load_scripts(tmp_path / "bundle", "versions", [])
        result = check_drift(
            conn, make_url(url), script, heads=["a3"], settings=settings, scratch_url=admin
        )
        other = make_url(MY_ADMIN if dialect == "postgresql" else PG_ADMIN)
        with pytest.raises(JobFailure) as failed:
            check_drift(conn, make_url(url), script, heads=[], settings={}, scratch_url=other)
    engine.dispose()
    assert result["drifted"] is False, result
    assert failed.value.error["code"] == "drift_scratch_unavailable"


@pytest.mark.parametrize("dialect", ["postgresql", "mysql"])
def test_a_server_refusing_create_database_says_what_to_set(new_db, tmp_path, dialect):
    url = make_url(new_db(dialect))
    bundle = chain(tmp_path / "bundle")
    user = "rt_drift_nocreate_" + url.database.rsplit("_", 1)[-1]
    admin = sa.create_engine(
        PG_ADMIN if dialect == "postgresql" else MY_ADMIN, isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as c:
        if dialect == "postgresql":
            c.exec_driver_sql(f'CREATE ROLE "{user}" LOGIN NOCREATEDB')
        else:
            c.exec_driver_sql(f"CREATE USER '{user}'@'%%'")
            c.exec_driver_sql(f"GRANT ALL ON `{url.database}`.* TO '{user}'@'%%'")
    try:
        limited = url.set(username=user)
        engine = targets.make_target_engine(limited, 10)
        with engine.connect() as conn:
            script = load_scripts(bundle, "versions", [])
            with pytest.raises(JobFailure) as failed:
                check_drift(conn, limited, script, heads=[], settings={}, scratch_url=None)
        engine.dispose()
        error = failed.value.error
        assert error["code"] == "drift_scratch_unavailable"
        setting = f"RETORT_DRIFT_SCRATCH_URL_{'POSTGRESQL' if dialect == 'postgresql' else 'MYSQL'}"
        assert setting in error["message"]
    finally:
        with admin.connect() as c:
            if dialect == "postgresql":
                c.exec_driver_sql(f'DROP ROLE IF EXISTS "{user}"')
            else:
                c.exec_driver_sql(f"DROP USER IF EXISTS '{user}'@'%%'")
        admin.dispose()


def test_heads_the_bundle_lacks_are_refused(new_db, tmp_path):
    url = new_db("sqlite")
    bundle = chain(tmp_path / "bundle")
    with pytest.raises(JobFailure) as failed:
        drift(url, bundle, heads=["zz9"], tmp_dir=str(tmp_path))
    assert failed.value.error["code"] == "unknown_current_revision"


# ------------------------------------------------------------- normalization
@pytest.mark.parametrize(
    "a, b",
    [
        ("'0'::integer", "0"),
        ("(0)", "'0'"),
        ("now()", "CURRENT_TIMESTAMP"),
        ("current_timestamp()", "(CURRENT_TIMESTAMP)"),
        ("'untitled'::character varying", "'untitled'"),
        ("NULL", None),
        ("'new'::author_status", "'new'"),
    ],
)
def test_default_spellings_that_are_the_same(a, b):
    assert canonical_default(a) == canonical_default(b)


@pytest.mark.parametrize(
    "a, b", [("'Active'", "'active'"), ("1", "0"), ("CURRENT_TIMESTAMP(6)", "CURRENT_TIMESTAMP")]
)
def test_default_spellings_that_differ(a, b):
    assert canonical_default(a) != canonical_default(b)


@pytest.mark.parametrize("dialect, cancelled", [("mysql", True), ("postgresql", False)])
def test_foreign_keys_differing_only_in_a_default_action(dialect, cancelled):
    from sqlalchemy.dialects import mysql, postgresql

    def fk(ondelete):
        md = sa.MetaData()
        sa.Table("author", md, sa.Column("id", sa.Integer, primary_key=True))
        post = sa.Table("post", md, sa.Column("author_id", sa.Integer))
        constraint = sa.ForeignKeyConstraint(
            ["author_id"], ["author.id"], name="fk_a", ondelete=ondelete
        )
        post.append_constraint(constraint)
        return constraint

    table_ops = ops.ModifyTableOps(
        "post",
        [
            ops.DropConstraintOp.from_constraint(fk("RESTRICT")),
            ops.CreateForeignKeyOp.from_constraint(fk(None)),
        ],
    )
    norm = Normalizer((mysql if dialect == "mysql" else postgresql).dialect())
    norm.cancel_fk_pairs(table_ops)
    assert table_ops.is_empty() is cancelled
    assert bool(norm.ignored()) is cancelled


def test_type_spellings():
    from sqlalchemy.dialects import mysql

    norm = Normalizer(mysql.dialect())
    assert not norm.types_differ(mysql.INTEGER(display_width=11), sa.Integer())
    assert not norm.types_differ(mysql.TINYINT(display_width=1), sa.Boolean())
    assert norm.types_differ(mysql.TINYINT(display_width=4), sa.Boolean())
    assert norm.types_differ(sa.String(50), sa.String(200))
    assert norm.types_differ(sa.Integer(), sa.BigInteger())
    assert not norm.types_differ(mysql.DECIMAL(10, 2), sa.Numeric(10, 2))
    assert norm.types_differ(mysql.ENUM("a", "b"), mysql.ENUM("a", "b", "c"))
    assert norm.ignored() == [
        "MySQL integer display widths (INT(11) and INT): 1",
        "MySQL TINYINT(1) and BOOLEAN: 1",
        "column types spelled differently but the same (case, spacing, INT/INTEGER, "
        "BOOL/BOOLEAN, DECIMAL/NUMERIC): 1",
    ]


def test_a_rename_on_live_looks_like_a_drop_and_an_add(new_db, tmp_path):
    url = new_db("postgresql")
    bundle = chain(tmp_path / "bundle")
    upgrade_live(bundle, url, naming=NAMING)
    execute(url, "ALTER TABLE post RENAME COLUMN slug TO permalink")
    result = drift(url, bundle, naming=NAMING)
    found = kinds(result)
    assert ("add_column", "post", "slug") in found and (
        "remove_column",
        "post",
        "permalink",
    ) in found
