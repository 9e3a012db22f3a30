"""A target's password never shows: not in a response, a log line, the audit log or the state."""

import json

import sqlalchemy as sa

from tests.helpers import register_db, revision, setup_project, unique

PASSWORD = "Quokka-Leak-Probe-5521"


def test_the_password_appears_nowhere(prod, backends):
    c = prod.client
    seen: list[str] = []

    def keep(r):
        seen.append(json.dumps(r.body) + json.dumps(r.headers))
        return r

    files = {
        "versions/a.py": revision("a", None, "op.create_table('t', sa.Column('id', sa.Integer))"),
        "versions/b.py": revision("b", "a", "op.execute('SELECT * FROM no_such_table')"),
    }
    project, _ = setup_project(c, files)
    hook = keep(
        c.post(
            f"/v1/projects/{project}/webhooks",
            {"url": "http://127.0.0.1:9/h", "events": ["job.succeeded", "job.failed"]},
        )
    ).body
    user = f"leak_{unique('u').split('-')[1]}"
    with backends.pg.connect() as conn:
        conn.exec_driver_sql(f"CREATE ROLE {user} LOGIN SUPERUSER PASSWORD '{PASSWORD}'")
    dbname = backends.new("postgresql").rsplit("/", 1)[1]
    try:
        good = register_db(c, project, f"postgresql://{user}:{PASSWORD}@127.0.0.1:5432/{dbname}")
        wrong_user = register_db(
            c, project, f"postgresql://nobody_{user}:{PASSWORD}@127.0.0.1:5432/{dbname}"
        )
        closed_port = register_db(c, project, f"postgresql://{user}:{PASSWORD}@127.0.0.1:1/x")
        maria = register_db(c, project, f"mysql://root:{PASSWORD}@127.0.0.1:3306/nope")
        jobs = [
            keep(c.post("/v1/jobs", {"database": good, "target": "a"})).body["id"],
            keep(c.post("/v1/jobs", {"database": good, "target": "b"})).body["id"],
            keep(c.post("/v1/jobs", {"database": wrong_user})).body["id"],
            keep(c.post("/v1/jobs", {"database": closed_port})).body["id"],
            keep(c.post("/v1/jobs", {"database": maria})).body["id"],
        ]
        outcomes = [c.wait_job(j, timeout=90) for j in jobs]
        assert [o["state"] for o in outcomes] == [
            "succeeded",
            "failed",
            "failed",
            "failed",
            "failed",
        ], [o["error"] for o in outcomes]
        assert outcomes[1]["error"]["revision"] == "b"
        assert {o["error"]["code"] for o in outcomes[2:]} <= {
            "target_unreachable",
            "revision_failed",
            "internal_error",
        }
        for job_id in jobs:
            keep(c.get(f"/v1/jobs/{job_id}"))
            keep(c.get(f"/v1/jobs/{job_id}/events"))
        for db in (good, wrong_user, closed_port, maria):
            keep(c.get(f"/v1/databases/{db}"))
            keep(c.get(f"/v1/databases/{db}/history"))
        keep(c.get("/v1/databases"))
        keep(c.get(f"/v1/jobs?database={good}"))
        keep(c.get(f"/v1/projects/{project}/webhooks/{hook['id']}/deliveries"))
        # The audit export: every page of the log.
        page = keep(c.get("/v1/audit?limit=1000")).body
        while page["next_cursor"]:
            page = keep(c.get(f"/v1/audit?limit=1000&cursor={page['next_cursor']}")).body
        # Failed writes carry messages too.
        keep(c.post("/v1/databases", {"name": good, "project": project, "url": "postgresql://x"}))

        for text in seen:
            assert PASSWORD not in text, text[:500]
        assert PASSWORD not in prod.logs()
        state = sa.create_engine(prod.env["RETORT_DATABASE_URL"], poolclass=sa.pool.NullPool)
        with state.connect() as conn:
            for table in ("jobs", "job_steps", "audit_events", "webhook_deliveries", "databases"):
                rows = conn.exec_driver_sql(f"SELECT * FROM {table}").all()
                assert PASSWORD not in repr(rows), table
        state.dispose()
    finally:
        with backends.pg.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
            conn.exec_driver_sql(f"DROP ROLE {user}")
