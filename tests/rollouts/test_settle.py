"""Databases already at a rollout's target are settled in batches, each read first, no run."""

from __future__ import annotations

import sqlalchemy as sa

from tests.helpers import chain_bundle, make_tar, revision, setup_project, tables
from tests.rollouts.conftest import NO_LINT, fleet, jobs_of, wait_rollout


def _rollout(c, project: str, **extra) -> dict:
    r = c.post("/v1/rollouts", {"project": project, "max_parallel": 4, **extra})
    assert r.status == 202, r
    return wait_rollout(c, r.body["id"])


def _set_version(url: str, version: str) -> None:
    """Move a database behind Retort's back, as someone running `alembic downgrade` would."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE items DROP COLUMN c2")
            conn.exec_driver_sql(f"UPDATE alembic_version SET version_num = '{version}'")
    finally:
        engine.dispose()


def _push(c, project: str, files: dict[str, str]) -> None:
    r = c.post(
        f"/v1/projects/{project}/bundles", raw=make_tar(files), content_type="application/gzip"
    )
    assert r.status == 201, r


def _migrated_fleet(prod, new_db, files: dict[str, str]):
    """Three SQLite databases of a new project, migrated by a first rollout."""
    c = prod.client
    project, _ = setup_project(c, files, settings=NO_LINT)
    urls = [new_db("sqlite") for _ in range(3)]
    fleet(c, project, urls)
    assert _rollout(c, project)["state"] == "succeeded"
    return c, project, urls


def _events(c, job_id: int) -> list[dict]:
    return c.get(f"/v1/audit?job={job_id}").body["events"][::-1]  # oldest first


def test_databases_at_the_target_are_settled_without_a_run_each_read_first(prod, new_db):
    c = prod.client
    project, _ = setup_project(c, chain_bundle(2), settings=NO_LINT)
    urls = [new_db("sqlite") for _ in range(5)] + [new_db("postgresql"), new_db("mysql")]
    names = fleet(c, project, urls)
    first = _rollout(c, project, canary=1)
    assert first["state"] == "succeeded", first
    ran = jobs_of(c, first["id"])
    assert all(j["result"] is None and j["steps"] for j in ran)

    # Retort's state says every one is at t002; one of them is not any more.
    moved = 2
    _set_version(urls[moved], "t001")
    second = _rollout(c, project, canary=1)
    assert second["state"] == "succeeded", second
    assert second["not_at_target"] == 0, second
    jobs = {j["database"]: j for j in jobs_of(c, second["id"])}
    assert set(jobs) == set(names)
    for i, name in enumerate(names):
        job = jobs[name]
        assert job["state"] == "succeeded", job
        assert job["from_heads"] == (["t001"] if i == moved else ["t002"]), job
        assert job["to_heads"] == ["t002"], job
        if i == moved:
            # The hint was wrong: its heads were read, and a real job applied t002.
            assert job["result"] is None and [s["revisions"] for s in job["steps"]] == [["t002"]]
            assert job["sandbox"] is not None
        else:
            assert job["result"] == {"settled": True, "nothing_to_do": True}, job
            assert job["steps"] == [] and job["sandbox"] is None, job
            assert job["rollout"] == second["id"]
            actions = [e["action"] for e in _events(c, job["id"])]
            assert actions == ["job.requested", "job.succeeded"], actions
    engine = sa.create_engine(urls[moved], poolclass=sa.pool.NullPool)
    assert "c2" in {col["name"] for col in sa.inspect(engine).get_columns("items")}
    engine.dispose()
    assert c.get("/v1/audit/verify").body["ok"] is True


def test_a_changed_revision_file_is_never_settled(prod, new_db):
    """Settling checks what an ordinary job checks: a changed applied file fails, saying so."""
    c, project, urls = _migrated_fleet(prod, new_db, chain_bundle(2))
    files = chain_bundle(2)
    files["versions/t002.py"] = files["versions/t002.py"] + "\n# edited after it was applied\n"
    _push(c, project, files)
    second = _rollout(c, project)
    assert second["state"] == "failed", second
    for job in jobs_of(c, second["id"]):
        assert job["state"] == "failed" and job["error"]["code"] == "revision_changed", job
        assert job["result"] is None


def test_a_rollout_to_a_new_head_settles_nothing_and_migrates_all(prod, new_db):
    """The hint is only Retort's record: at a new head no database is a candidate."""
    c, project, urls = _migrated_fleet(prod, new_db, chain_bundle(1))
    files = {
        **chain_bundle(1),
        "versions/t002.py": revision(
            "t002", "t001", "op.create_table('more', sa.Column('id', sa.Integer))"
        ),
    }
    _push(c, project, files)
    second = _rollout(c, project)
    assert second["state"] == "succeeded", second
    for job in jobs_of(c, second["id"]):
        assert job["result"] is None and job["to_heads"] == ["t002"], job
    assert all("more" in tables(url) for url in urls)


def test_a_version_table_that_never_answers_is_read_within_the_timeout(tmp_path):
    """The worker (and the API) read a tenant's SQLite heads with a bounded statement:
    a view put in place of the version table that would run for ever is interrupted."""
    import time

    from service.crypto import SecretBox
    from service.databases.ops import read_live_heads

    path = tmp_path / "endless.db"
    engine = sa.create_engine(f"sqlite:///{path}", poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE VIEW alembic_version AS WITH RECURSIVE n(i) AS "
            "(SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT 'x' AS version_num FROM n "
            "WHERE i < 0"
        )
    engine.dispose()
    from cryptography.fernet import Fernet

    box = SecretBox((Fernet.generate_key().decode(),))
    started = time.monotonic()
    heads, why = read_live_heads(box.encrypt(f"sqlite:///{path}"), {}, box, 1)
    took = time.monotonic() - started
    assert heads is None and "interrupted" in why, (heads, why)
    assert took < 5, took
