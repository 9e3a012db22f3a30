"""A SQLite target whose file was removed or replaced is opened afresh (issue 21, item 7).

One worker, so the second job finds the first one's warm runner and its pooled
connection: in process mode that connection would still read the old file.
"""

from __future__ import annotations

import os
import shutil

import pytest
import sqlalchemy as sa

from tests.helpers import chain_bundle, register_db, run_job, setup_project, tables


def _heads(url: str) -> list[str]:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return [r[0] for r in conn.exec_driver_sql("SELECT version_num FROM alembic_version")]
    finally:
        engine.dispose()


@pytest.mark.parametrize("sandbox", ["bwrap", "process"])
def test_a_removed_or_replaced_sqlite_file_is_a_new_database(stack, new_db, tmp_path, sandbox):
    s = stack(workers=("w1",), sandbox=sandbox)
    c = s.client
    project, _ = setup_project(c, chain_bundle(2), settings={"lint": {"enabled": False}})
    url = new_db("sqlite")
    path = url.removeprefix("sqlite:///")
    db = register_db(c, project, url)
    first = run_job(c, db)
    assert first["state"] == "succeeded" and first["to_heads"] == ["t002"], first
    assert first["sandbox"] == sandbox
    kept = tmp_path / "at-t002.db"
    shutil.copy(path, kept)

    os.remove(path)  # removed: the next job starts from base, on a new file
    again = run_job(c, db)
    assert again["state"] == "succeeded", again
    assert again["from_heads"] == [] and len(again["steps"]) == 2, again
    assert _heads(url) == ["t002"] and "items" in tables(url)

    # Replaced by another file at base (a restore from an older backup, say).
    os.remove(path)
    sa.create_engine(url).dispose()
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE unrelated (id INTEGER)")
    engine.dispose()
    live = c.get(f"/v1/databases/{db}").body
    assert live["current"] == [], live
    third = run_job(c, db)
    assert third["state"] == "succeeded" and third["from_heads"] == [], third
    assert _heads(url) == ["t002"] and tables(url) >= {"items", "unrelated"}
