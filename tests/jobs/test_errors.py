"""A failing revision's error points at the line (issue 21, item 6)."""

from __future__ import annotations

import pytest

from tests.helpers import register_db, revision, run_job, setup_project

HELPER = """
def _check(conn):
    assert conn is None, "the helper refuses"
"""


def _bundle(body: str) -> dict[str, str]:
    return {
        "versions/a1.py": revision(
            "a1", None, "op.create_table('t', sa.Column('id', sa.Integer, primary_key=True))"
        ),
        "versions/a2.py": revision("a2", "a1", body, head=HELPER),
    }


def _line_of(files: dict[str, str], path: str, text: str) -> int:
    return next(i for i, line in enumerate(files[path].splitlines(), 1) if text in line)


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
def test_a_python_error_names_file_line_and_source_and_no_statement(retort, new_db, dialect):
    c = retort.client
    files = _bundle(
        "op.add_column('t', sa.Column('c', sa.Integer))\n"
        "raise NotImplementedError('the second half is not written')"
    )
    project, _ = setup_project(c, files, settings={"lint": {"enabled": False}})
    job = run_job(c, register_db(c, project, new_db(dialect)))
    assert job["state"] == "failed", job
    err = job["error"]
    assert err["code"] == "revision_failed" and err["revision"] == "a2", err
    # The ALTER TABLE before it succeeded: it is not the failing statement.
    assert err["statement"] is None, err
    assert err["file"] == "versions/a2.py"
    assert err["line"] == _line_of(files, "versions/a2.py", "raise NotImplementedError")
    assert err["source"] == "raise NotImplementedError('the second half is not written')"
    assert "NotImplementedError: the second half is not written" in err["message"]
    assert "versions/a2.py, line" in err["message"]
    failed = job["steps"][-1]
    assert failed["state"] == "failed" and failed["revisions"] == ["a2"]
    assert any("ALTER TABLE" in q.upper() for q in failed["sql"]), failed["sql"]
    # Only what the revision ran: not Retort's read-back of the version table.
    assert not any("alembic_version" in q for q in failed["sql"]), failed["sql"]


def test_an_assertion_in_a_helper_shows_the_bundles_frames(retort, new_db):
    c = retort.client
    files = _bundle("_check(op.get_bind())")
    project, _ = setup_project(c, files, settings={"lint": {"enabled": False}})
    job = run_job(c, register_db(c, project, new_db("sqlite")))
    err = job["error"]
    assert err["code"] == "revision_failed", err
    assert "AssertionError: the helper refuses" in err["message"]
    assert err["line"] == _line_of(files, "versions/a2.py", "assert conn is None")
    assert err["statement"] is None
    where = [frame.split(":", 2)[:2] for frame in err["traceback"]]
    assert where[-1] == ["versions/a2.py", str(err["line"]) + " in _check"], err["traceback"]
    assert any("in upgrade" in frame for frame in err["traceback"]), err["traceback"]
