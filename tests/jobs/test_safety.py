"""Plans, lint, approvals and drift end to end: real API, real workers, real targets."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from tests.cli.test_cli import cli
from tests.helpers import (
    Client,
    chain_bundle,
    register_db,
    revision,
    run_job,
    setup_project,
    unique,
    wait_until,
)
from tests.webhooks.test_webhooks import SECRET, Receiver, verify


def _token(c: Client, role: str, project: str) -> str:
    r = c.post("/v1/tokens", {"name": unique(f"{role}-tok"), "role": role, "projects": [project]})
    assert r.status == 201, r
    return r.body["token"]


def _schema(url: str) -> dict:
    """Tables, their columns and indexes, and the version table's rows."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        insp = sa.inspect(engine)
        out = {
            t: (
                [(c["name"], str(c["type"]), c["nullable"]) for c in insp.get_columns(t)],
                sorted(i["name"] for i in insp.get_indexes(t)),
            )
            for t in sorted(insp.get_table_names())
        }
        with engine.connect() as conn:
            if "alembic_version" in out:
                out["versions"] = sorted(
                    conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalars()
                )
        return out
    finally:
        engine.dispose()


def _events(c: Client, job_id: int) -> list[dict]:
    return c.get(f"/v1/audit?job={job_id}&limit=200").body["events"]


def _dropping_bundle() -> dict[str, str]:
    """r1 makes a table with a column; r2 drops that column (data loss: blocked by default)."""
    return {
        "versions/r1.py": revision(
            "r1",
            None,
            "op.create_table('accounts', sa.Column('id', sa.Integer, primary_key=True), "
            "sa.Column('legacy', sa.String(20)))",
            "op.drop_table('accounts')",
        ),
        "versions/r2.py": revision(
            "r2",
            "r1",
            "op.drop_column('accounts', 'legacy')",
            "op.add_column('accounts', sa.Column('legacy', sa.String(20)))",
        ),
    }


@pytest.mark.parametrize("dialect", ["postgresql", "mysql", "sqlite"])
def test_a_plan_shows_each_steps_sql_and_changes_nothing(prod, new_db, dialect):
    c = prod.client
    project, _ = setup_project(c, chain_bundle(3))
    url = new_db(dialect)
    db = register_db(c, project, url)
    assert run_job(c, db, target="t001")["state"] == "succeeded"
    before = _schema(url)

    job = run_job(c, db, dry_run=True)
    assert job["state"] == "succeeded", job
    assert job["kind"] == "plan"
    plan = job["result"]
    expected = {"postgresql": "rolled_back", "sqlite": "copy", "mysql": "offline"}[dialect]
    assert plan["mode"] == expected
    assert plan["from_heads"] == ["t001"]
    assert [s["revisions"] for s in plan["steps"]] == [["t002"], ["t003"]]
    sql = [st["sql"] for s in plan["steps"] for st in s["statements"]]
    assert any("ADD COLUMN c2" in q for q in sql), sql
    assert not any("alembic_version" in q for q in sql), sql
    if dialect == "mysql":
        assert any("DDL" in note or "commit" in note.lower() for note in plan["limitations"])
    assert _schema(url) == before
    # A plan is no migration: the history has only the real one.
    history = c.get(f"/v1/databases/{db}/history").body["history"]
    assert [h["revisions"] for h in history] == [["t001"]]


def test_a_plan_at_the_target_says_nothing_to_do_and_a_downgrade_plan_shows_its_sql(prod, new_db):
    c = prod.client
    project, _ = setup_project(c, chain_bundle(2))
    url = new_db("postgresql")
    db = register_db(c, project, url)
    assert run_job(c, db)["state"] == "succeeded"
    at_head = run_job(c, db, dry_run=True)
    assert at_head["result"]["nothing_to_do"] is True
    assert at_head["result"]["steps"] == []
    down = run_job(c, db, dry_run=True, action="downgrade", target="t001", plan_mode="offline")
    assert down["result"]["mode"] == "offline"
    sql = [st["sql"] for s in down["result"]["steps"] for st in s["statements"]]
    assert any("DROP COLUMN c2" in q for q in sql), sql
    assert _schema(url)["versions"] == ["t002"]
    # A mode the dialect cannot give is refused with its reason.
    wrong = run_job(c, db, dry_run=True, plan_mode="copy")
    assert wrong["state"] == "failed"
    assert wrong["error"]["code"] == "invalid_plan_mode"
    r = c.post("/v1/jobs", {"database": db, "plan_mode": "offline"})
    assert r.status == 422
    assert "dry_run" in json.dumps(r.body)


def test_a_blocking_finding_waits_for_an_approval_end_to_end(prod, new_db):
    """Deployer requests, the lint parks the job (no lease), a webhook fires, the requester
    may not approve, an admin does, the job runs; every decision audited."""
    c = prod.client
    project, _ = setup_project(c, _dropping_bundle())
    url = new_db("postgresql")
    db = register_db(c, project, url)
    receiver = Receiver()
    try:
        r = c.post(
            f"/v1/projects/{project}/webhooks",
            {
                "url": receiver.url,
                "events": ["job.waiting_for_approval", "job.approved"],
                "secret": SECRET,
            },
        )
        assert r.status == 201, r
        assert run_job(c, db, target="r1")["state"] == "succeeded"
        deployer = Client(c.base, _token(c, "deployer", project))
        r = deployer.post("/v1/jobs", {"database": db})
        assert r.status == 202, r
        job = deployer.wait_state(r.body["id"], "waiting_for_approval")
        blocking = job["findings"]["blocking"]
        assert [f["code"] for f in blocking] == ["column_dropped"]
        assert blocking[0]["revision"] == "r2"
        assert _schema(url)["versions"] == ["r1"]  # nothing ran
        # No lease is held meanwhile: another job of the database runs at once.
        other = run_job(c, db, dry_run=True)
        assert other["state"] == "succeeded"
        assert other["result"]["would_block"] == ["column_dropped"]

        wait_until(lambda: "job.waiting_for_approval" in receiver.events(), timeout=20)
        hook = receiver.requests[receiver.events().index("job.waiting_for_approval")]
        payload = verify(SECRET, hook["headers"], hook["body"])
        assert payload["job"]["id"] == job["id"]
        assert payload["job"]["state"] == "waiting_for_approval"

        # The requester may not approve its own job; a viewer may not either.
        r = deployer.post(f"/v1/jobs/{job['id']}/approve", {})
        assert r.status == 403 and r.body["error"]["code"] == "not_an_approver", r
        viewer = Client(c.base, _token(c, "viewer", project))
        assert viewer.post(f"/v1/jobs/{job['id']}/approve", {}).status == 403

        r = c.post(f"/v1/jobs/{job['id']}/approve", {"comment": "legacy column is unused"})
        assert r.status == 200, r
        assert r.body["approval"]["codes"] == ["column_dropped"]
        done = c.wait_job(job["id"])
        assert done["state"] == "succeeded", done
        assert _schema(url)["versions"] == ["r2"]
        assert c.post(f"/v1/jobs/{job['id']}/approve", {}).status == 409

        actions = [e["action"] for e in _events(c, job["id"])]
        assert "job.waiting_for_approval" in actions
        assert "job.approved" in actions
        approved = next(e for e in _events(c, job["id"]) if e["action"] == "job.approved")
        assert approved["actor"] == "admin"
        assert approved["data"]["codes"] == ["column_dropped"]
        assert approved["data"]["comment"] == "legacy column is unused"
        wait_until(lambda: "job.approved" in receiver.events(), timeout=20)
    finally:
        receiver.close()


def test_migrate_wait_exits_3_with_the_findings_and_reject_cancels(prod, new_db):
    c = prod.client
    project, _ = setup_project(c, _dropping_bundle())
    db = register_db(c, project, new_db("sqlite"))
    assert run_job(c, db, target="r1")["state"] == "succeeded"
    out = cli(prod, "migrate", db, "--wait", "--timeout", "60")
    assert out.returncode == 3, out.stdout + out.stderr
    assert "column_dropped" in out.stderr
    assert "retort approve" in out.stderr
    job = c.get(f"/v1/jobs?database={db}&state=waiting_for_approval").body["jobs"][0]
    out = cli(prod, "reject", str(job["id"]), "--comment", "not today")
    assert out.returncode == 0, out.stderr
    rejected = c.get(f"/v1/jobs/{job['id']}").body
    assert rejected["state"] == "cancelled"
    assert rejected["error"]["code"] == "rejected"
    assert "not today" in rejected["error"]["message"]
    assert "job.rejected" in [e["action"] for e in _events(c, job["id"])]


def test_a_request_can_allow_a_code_and_it_is_audited(prod, new_db):
    c = prod.client
    project, _ = setup_project(c, _dropping_bundle())
    db = register_db(c, project, new_db("sqlite"))
    assert run_job(c, db, target="r1")["state"] == "succeeded"
    job = run_job(c, db, allow=["column_dropped"])
    assert job["state"] == "succeeded", job
    assert [f["code"] for f in job["findings"]["allowed"]] == ["column_dropped"]
    allowed = [e for e in _events(c, job["id"]) if e["action"] == "job.findings_allowed"]
    assert allowed and allowed[0]["data"]["codes"] == ["column_dropped"]
    r = c.post("/v1/jobs", {"database": db, "allow": ["no_such_code"]})
    assert r.status == 422 and "no_such_code" in json.dumps(r.body)
    # Allowing in advance is approving: a deployer that may not approve may not allow.
    deployer = Client(c.base, _token(c, "deployer", project))
    r = deployer.post("/v1/jobs", {"database": db, "allow": ["column_dropped"]})
    assert r.status == 403 and r.body["error"]["code"] == "not_an_approver", r


def test_the_policy_per_database_tag(prod, new_db):
    """env=dev lets a dropped column through; env=prod blocks a finding that only warns."""
    c = prod.client
    settings = {
        "lint": {
            "by_tag": {
                "env=dev": {"column_dropped": "off"},
                "env=prod": {"irreversible_downgrade": "block"},
            }
        }
    }
    files = _dropping_bundle()
    files["versions/r3.py"] = revision("r3", "r2", "op.create_index('ix_id', 'accounts', ['id'])")
    project, _ = setup_project(c, files, settings=settings)
    dev = register_db(c, project, new_db("sqlite"), tags={"env": "dev"})
    prod_db = register_db(c, project, new_db("sqlite"), tags={"env": "prod"})
    ran = run_job(c, dev)
    assert ran["state"] == "succeeded", ran
    assert "column_dropped" not in json.dumps(ran["findings"])
    assert run_job(c, prod_db, target="r2", allow=["column_dropped"])["state"] == "succeeded"
    r = c.post("/v1/jobs", {"database": prod_db})
    parked = c.wait_state(r.body["id"], "waiting_for_approval")
    assert [f["code"] for f in parked["findings"]["blocking"]] == ["irreversible_downgrade"]
    # Bad policies are refused when set.
    r = c.request(
        "PATCH", f"/v1/projects/{project}", {"settings": {"lint": {"policy": {"nope": "block"}}}}
    )
    assert r.status == 422 and "nope" in json.dumps(r.body)


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
def test_drift_is_found_reported_and_can_refuse_an_upgrade(prod, new_db, dialect):
    c = prod.client
    files = chain_bundle(2)
    files["versions/t003.py"] = revision(
        "t003", "t002", "op.create_index('ix_items_c2', 'items', ['c2'])"
    )
    files["versions/t004.py"] = revision(
        "t004", "t003", "op.add_column('items', sa.Column('c4', sa.Integer))"
    )
    project, _ = setup_project(c, files, settings={"drift": {"refuse_when_drifted": True}})
    url = new_db(dialect)
    db = register_db(c, project, url)
    receiver = Receiver()
    try:
        r = c.post(
            f"/v1/projects/{project}/webhooks",
            {"url": receiver.url, "events": ["database.drift_detected"], "secret": SECRET},
        )
        assert r.status == 201, r
        assert run_job(c, db, target="t003")["state"] == "succeeded"
        assert c.get(f"/v1/databases/{db}/drift").body["checked_at"] is None
        out = cli(prod, "drift", db)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "no drift" in out.stdout

        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        with engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE items ADD COLUMN hand_made INTEGER")
        engine.dispose()
        out = cli(prod, "drift", db)
        assert out.returncode == 3, out.stdout + out.stderr
        assert "hand_made" in out.stdout
        latest = c.get(f"/v1/databases/{db}/drift").body
        assert latest["drifted"] is True
        kinds = {(d["kind"], d.get("name")) for d in latest["result"]["differences"]}
        assert ("remove_column", "hand_made") in kinds, kinds
        wait_until(lambda: "database.drift_detected" in receiver.events(), timeout=20)

        r = c.post("/v1/jobs", {"database": db})
        parked = c.wait_state(r.body["id"], "waiting_for_approval")
        assert "database_drifted" in [f["code"] for f in parked["findings"]["blocking"]]
        checks = c.get(f"/v1/jobs?database={db}&kind=drift").body["jobs"]
        assert len(checks) == 2
    finally:
        receiver.close()


def test_drift_checks_run_on_the_projects_schedule(prod, new_db):
    c = prod.client
    project, _ = setup_project(c, chain_bundle(2), settings={"drift": {"check_interval_s": 60}})
    db = register_db(c, project, new_db("sqlite"))
    assert run_job(c, db)["state"] == "succeeded"

    def checked():
        return c.get(f"/v1/databases/{db}/drift").body["checked_at"]

    wait_until(checked, timeout=30)
    latest = c.get(f"/v1/databases/{db}/drift").body
    assert latest["drifted"] is False
    jobs = c.get(f"/v1/jobs?database={db}&kind=drift").body["jobs"]
    assert jobs[0]["requested_by"] == "sweeper"


def test_retort_plan_prints_the_sql_and_exits_3_when_an_upgrade_would_block(prod, new_db):
    c = prod.client
    project, _ = setup_project(c, _dropping_bundle())
    url = new_db("postgresql")
    db = register_db(c, project, url)
    assert run_job(c, db, target="r1")["state"] == "succeeded"
    out = cli(prod, "plan", db)
    assert out.returncode == 3, out.stdout + out.stderr
    assert "rolled_back mode" in out.stdout
    assert "ALTER TABLE accounts DROP COLUMN legacy;" in out.stdout
    assert "AccessExclusiveLock" in out.stdout  # the lock the statement was seen to take
    assert "block: column_dropped r2" in out.stdout
    assert "--allow column_dropped" in out.stdout
    same = cli(prod, "migrate", db, "--plan", "--json")
    assert same.returncode == 3, same.stdout + same.stderr
    assert json.loads(same.stdout)["result"]["would_block"] == ["column_dropped"]
    assert _schema(url)["versions"] == ["r1"]
    # A downgrade needs a target: refused before any request.
    bad = cli(prod, "plan", db, "--action", "downgrade")
    assert bad.returncode == 2 and "--to" in bad.stderr


def test_a_revision_busy_in_its_own_code_is_not_linted_and_says_so(prod, new_db):
    """The lint's rendering gives up after RETORT_LINT_RENDER_TIMEOUT_S (2 s in the tests)."""
    c = prod.client
    slow = {"versions/s1.py": revision("s1", None, "import time\ntime.sleep(3)")}
    project, _ = setup_project(c, slow)
    db = register_db(c, project, new_db("sqlite"))
    job = run_job(c, db)
    assert job["state"] == "succeeded", job
    warnings = job["findings"]["warnings"]
    assert [w["code"] for w in warnings if "longer than 2 s" in w["message"]] == [
        "unparsed_statement"
    ], warnings
