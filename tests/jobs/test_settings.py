"""A project's settings take the place of env.py: version table, naming, timeouts."""

import pytest
import sqlalchemy as sa

from tests.helpers import register_db, revision, run_job, setup_project


def test_version_table_schema_and_naming_convention(prod, new_db):
    c = prod.client
    url = new_db("postgresql")
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE SCHEMA meta")
    files = {
        "versions/n1.py": revision(
            "n1",
            None,
            """
            op.create_table('items', sa.Column('id', sa.Integer, primary_key=True),
                            sa.Column('name', sa.String(20)))
            op.create_unique_constraint(None, 'items', ['name'])
            """,
        ),
    }
    settings = {
        "version_table": "billing_version",
        "version_table_schema": "meta",
        "naming_convention": {"uq": "uq_%(table_name)s_%(column_0_name)s"},
    }
    project, _ = setup_project(c, files, settings=settings)
    db = register_db(c, project, url)
    job = run_job(c, db)
    assert job["state"] == "succeeded", job
    inspector = sa.inspect(engine)
    assert "billing_version" in inspector.get_table_names(schema="meta")
    assert "alembic_version" not in inspector.get_table_names()
    assert [u["name"] for u in inspector.get_unique_constraints("items")] == ["uq_items_name"]
    engine.dispose()
    assert c.get(f"/v1/databases/{db}").body["current"] == ["n1"]


@pytest.mark.parametrize("dialect", ["postgresql", "mysql"])
def test_statement_timeout_stops_a_runaway_revision(prod, new_db, dialect):
    c = prod.client
    sleep = "SELECT pg_sleep(5)" if dialect == "postgresql" else "SELECT SLEEP(5)"
    files = {
        "versions/s1.py": revision(
            "s1", None, "op.create_table('ok_t', sa.Column('id', sa.Integer))"
        ),
        "versions/s2.py": revision("s2", "s1", f"op.execute({sleep!r})"),
    }
    project, _ = setup_project(c, files, settings={"statement_timeout_ms": 300})
    db = register_db(c, project, new_db(dialect))
    job = run_job(c, db)
    assert job["state"] == "failed", job
    assert job["error"]["revision"] == "s2"
    expected = "statement timeout" if dialect == "postgresql" else "max_statement_time"
    assert expected in job["error"]["database_message"], job["error"]
    assert job["to_heads"] == ["s1"]
    assert job["steps"][-1]["duration_ms"] < 4000


def test_lock_timeout_applies_to_ddl_waiting_on_a_table_lock(prod, new_db):
    c = prod.client
    url = new_db("postgresql")
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE busy (id int)")
    files = {
        "versions/l1.py": revision("l1", None, "op.add_column('busy', sa.Column('x', sa.Integer))")
    }
    project, _ = setup_project(c, files, settings={"lock_timeout_ms": 300})
    db = register_db(c, project, url)
    with engine.connect() as holder:
        holder.exec_driver_sql("BEGIN")
        holder.exec_driver_sql("LOCK TABLE busy IN ACCESS EXCLUSIVE MODE")
        job = run_job(c, db)
        holder.exec_driver_sql("ROLLBACK")
    engine.dispose()
    assert job["state"] == "failed"
    assert "lock timeout" in job["error"]["database_message"]
    assert job["error"]["revision"] == "l1"
