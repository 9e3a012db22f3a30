"""A finished job's document is read once per API process, then served without a query."""

import pytest
import sqlalchemy as sa

from tests.helpers import chain_bundle, register_db, revision, run_job, setup_project, unique


@pytest.fixture
def own_api(prod):
    """An API of our own on the production state database, to see its statements and cache."""
    from service.app import create_app
    from service.config import Config

    app = create_app(Config.from_env(env=prod.env))
    svc = app.extensions["retort"]
    statements: list[str] = []
    sa.event.listen(svc.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    yield app.test_client(), svc, statements
    svc.engine.dispose()


def _reads_of_jobs(statements: list[str]) -> list[str]:
    return [s for s in statements if "FROM jobs" in s]


def test_a_finished_job_is_served_from_the_cache_with_the_same_bytes(prod, new_db, own_api):
    from service.jobs.schemas import JobOut

    c = prod.client
    project, _ = setup_project(c, chain_bundle(2))
    db = register_db(c, project, new_db("sqlite"))
    done = run_job(c, db)
    assert done["state"] == "succeeded" and len(done["steps"]) == 2
    client, svc, statements = own_api
    admin = {"Authorization": f"Bearer {prod.token}"}

    first = client.get(f"/v1/jobs/{done['id']}", headers=admin)
    assert first.status_code == 200 and first.json == done
    assert list(first.json) == [f for f in JobOut.model_fields if f != "coalesced_into"]
    assert len(_reads_of_jobs(statements)) == 1  # the job, its names and steps: one statement
    second = client.get(f"/v1/jobs/{done['id']}?wait=30", headers=admin)
    assert second.status_code == 200
    assert second.data == first.data
    assert second.headers["ETag"] == first.headers["ETag"] == f'"{done["id"]}-succeeded-2"'
    assert second.headers["Content-Type"] == first.headers["Content-Type"]
    assert second.headers["Cache-Control"] == "no-store"
    assert len(_reads_of_jobs(statements)) == 1  # no query for the second read
    assert svc.finished_jobs.get(done["id"]) is not None


def test_a_scoped_token_gets_404_from_the_cache_too(prod, new_db, own_api):
    c = prod.client
    project, _ = setup_project(c, chain_bundle(1))
    done = run_job(c, register_db(c, project, new_db("sqlite")))
    other, _ = setup_project(c)
    token = c.post(
        "/v1/tokens", {"name": unique("viewer"), "role": "viewer", "projects": [other]}
    ).body["token"]
    client, svc, statements = own_api
    admin = {"Authorization": f"Bearer {prod.token}"}
    assert client.get(f"/v1/jobs/{done['id']}", headers=admin).status_code == 200
    assert svc.finished_jobs.get(done["id"]) is not None
    before = len(_reads_of_jobs(statements))

    scoped = {"Authorization": f"Bearer {token}"}
    hidden = client.get(f"/v1/jobs/{done['id']}", headers=scoped)
    assert len(_reads_of_jobs(statements)) == before  # answered from the cached entry
    missing = client.get("/v1/jobs/987654321", headers=scoped)
    assert hidden.status_code == missing.status_code == 404
    assert hidden.json["error"]["code"] == "not_found"
    assert hidden.json["error"]["message"] == missing.json["error"]["message"].replace(
        "987654321", str(done["id"])
    )
    assert hidden.json["error"]["details"] == {"job": done["id"]}


def test_an_unfinished_job_is_read_fresh_every_time(prod, new_db, own_api):
    c = prod.client
    slow = {"versions/s.py": revision("s", None, "import time; time.sleep(2)")}
    project, _ = setup_project(c, slow)
    job = c.post("/v1/jobs", {"database": register_db(c, project, new_db("sqlite"))}).body
    c.wait_state(job["id"], "running")
    client, svc, statements = own_api
    admin = {"Authorization": f"Bearer {prod.token}"}
    for reads in (1, 2):
        r = client.get(f"/v1/jobs/{job['id']}", headers=admin)
        assert r.status_code == 200 and r.json["state"] == "running"
        assert len(_reads_of_jobs(statements)) == reads
    assert svc.finished_jobs.get(job["id"]) is None
    final = c.wait_job(job["id"])
    r = client.get(f"/v1/jobs/{job['id']}", headers=admin)
    assert r.json == final and svc.finished_jobs.get(job["id"]) is not None
