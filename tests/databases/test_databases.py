"""Registering targets: encrypted URLs, masking, live state, filters, errors."""

import sqlalchemy as sa

from tests.helpers import chain_bundle, register_db, run_job, setup_project, unique

PASSWORD = "Zebra-Pw-7731"


def test_url_is_encrypted_at_rest_and_never_returned(prod, backends):
    c = prod.client
    project, _ = setup_project(c, chain_bundle(1))
    user = f"u_{unique('x').split('-')[1]}"
    with backends.pg.connect() as conn:
        conn.exec_driver_sql(f"CREATE ROLE {user} LOGIN SUPERUSER PASSWORD '{PASSWORD}'")
    dbname = backends.new("postgresql").rsplit("/", 1)[1]
    try:
        url = f"postgresql://{user}:{PASSWORD}@127.0.0.1:5432/{dbname}"
        r = c.post("/v1/databases", {"name": unique("sec"), "project": project, "url": url})
        assert r.status == 201
        assert PASSWORD not in str(r.body) and "***" in r.body["url"]
        name = r.body["name"]
        shown = c.get(f"/v1/databases/{name}")
        assert PASSWORD not in str(shown.body) and shown.body["current"] == []
        job = run_job(c, name)
        assert job["state"] == "succeeded"
        assert PASSWORD not in str(c.get(f"/v1/audit?database={name}").body)
        state = sa.create_engine(prod.env["RETORT_DATABASE_URL"], poolclass=sa.pool.NullPool)
        with state.connect() as conn:
            stored = conn.exec_driver_sql(
                "SELECT url_encrypted, url_masked FROM databases WHERE name = %s", (name,)
            ).one()
        state.dispose()
        assert PASSWORD not in stored[0] and PASSWORD not in stored[1]
        assert PASSWORD not in prod.logs()
    finally:
        with backends.pg.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
            conn.exec_driver_sql(f"DROP ROLE {user}")


def test_live_state_filters_and_errors(prod, new_db):
    c = prod.client
    project, _ = setup_project(c, chain_bundle(2))
    a = register_db(c, project, new_db("mysql"), tags={"tier": "gold"})
    b = register_db(c, project, new_db("sqlite"), tags={"tier": "free"})
    assert c.get(f"/v1/databases/{a}").body["pending"] == ["t001", "t002"]
    listed = {d["name"] for d in c.get(f"/v1/databases?project={project}").body["databases"]}
    assert listed == {a, b}
    gold = c.get(f"/v1/databases?project={project}&tag=tier=gold").body["databases"]
    assert [d["name"] for d in gold] == [a]
    tagged = c.get(f"/v1/databases?project={project}&tag=tier").body["databases"]
    assert {d["name"] for d in tagged} == {a, b}

    r = c.post("/v1/databases", {"name": a, "project": project, "url": "sqlite:////tmp/x.db"})
    assert r.status == 409
    r = c.post("/v1/databases", {"name": unique("d"), "project": "nope", "url": "sqlite:////x"})
    assert r.status == 404
    r = c.post("/v1/databases", {"name": unique("d"), "project": project, "url": "oracle://x/y"})
    assert r.status == 422 and r.body["error"]["details"]["field"] == "url"
    r = c.post("/v1/databases", {"name": unique("d"), "project": project, "url": "not a url"})
    assert r.status == 422 and r.body["error"]["details"]["field"] == "url"
    r = c.post("/v1/databases", {"name": unique("d"), "project": project})
    assert r.status == 422 and r.body["error"]["details"]["field"] == "url"
    assert c.get("/v1/databases/nope").status == 404
    r = c.post(
        "/v1/databases",
        {"name": unique("d"), "project": project, "url": "postgresql://u@h/db?password=hidden"},
    )
    assert r.status == 422 and "query string" in r.body["error"]["message"]
    assert "hidden" not in str(r.body)


def test_unreachable_target_reports_why_without_the_password(prod):
    c = prod.client
    project, _ = setup_project(c, chain_bundle(1))
    db = register_db(c, project, f"postgresql://x:{PASSWORD}@127.0.0.1:1/none")
    body = c.get(f"/v1/databases/{db}").body
    assert body["current"] is None and body["current_error"]
    assert PASSWORD not in str(body)
