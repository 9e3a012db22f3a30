"""Job requests: targets checked against the graph, 404s, listing, cancel, locks."""

import time

from tests.helpers import make_tar, register_db, revision, run_job, setup_project, tables, unique

BRANCHED = {
    "versions/a.py": revision("a", None),
    "versions/b.py": revision("b", "a", branch_labels="left"),
    "versions/c.py": revision("c", "a", branch_labels="right"),
}


def test_targets_are_checked_against_the_revision_graph(prod, new_db):
    c = prod.client
    project, _ = setup_project(c, BRANCHED)
    db = register_db(c, project, new_db("sqlite"))

    r = c.post("/v1/jobs", {"database": db, "target": "head"})
    assert r.status == 422 and r.body["error"]["code"] == "multiple_heads"
    assert r.body["error"]["details"]["heads"] == ["b", "c"]
    assert "heads" in r.body["error"]["message"] and "@head" in r.body["error"]["message"]

    r = c.post("/v1/jobs", {"database": db, "target": "+1"})
    assert r.status == 422 and r.body["error"]["code"] == "ambiguous_relative_target"
    r = c.post("/v1/jobs", {"database": db, "action": "downgrade", "target": "-1"})
    assert r.status == 422 and r.body["error"]["code"] == "ambiguous_relative_target"

    r = c.post("/v1/jobs", {"database": db, "target": "zzz"})
    assert r.status == 422 and r.body["error"]["code"] == "unknown_revision"
    assert r.body["error"]["details"]["field"] == "target"
    r = c.post("/v1/jobs", {"database": db, "target": "nobranch@head"})
    assert r.status == 422 and r.body["error"]["code"] == "unknown_revision"
    r = c.post("/v1/jobs", {"database": db, "action": "sideways"})
    assert r.status == 422 and r.body["error"]["details"]["field"] == "action"

    job = run_job(c, db, target="left@head")
    assert job["state"] == "succeeded" and job["to_heads"] == ["b"], job
    job = run_job(c, db, target="heads")
    assert job["state"] == "succeeded" and job["to_heads"] == ["b", "c"], job


def test_unknown_things_are_404(prod, new_db):
    c = prod.client
    project, bundle = setup_project(c, BRANCHED)
    db = register_db(c, project, new_db("sqlite"))
    r = c.post("/v1/jobs", {"database": "no-such-db", "target": "heads"})
    assert r.status == 404 and "no-such-db" in r.body["error"]["message"]
    r = c.post("/v1/jobs", {"database": db, "target": "heads", "bundle": "f" * 64})
    assert r.status == 404
    r = c.post("/v1/jobs", {"database": db, "target": "heads", "bundle": bundle["id"]})
    assert r.status == 202 and r.headers["Location"] == f"/v1/jobs/{r.body['id']}"
    assert c.get("/v1/jobs/987654321").status == 404
    assert c.post("/v1/jobs/987654321/cancel").status == 404
    r = c.get("/v1/jobs?state=bogus")
    assert r.status == 422 and r.body["error"]["details"]["field"] == "state"
    r = c.get("/v1/jobs?cursor=@@@")
    assert r.status == 422 and r.body["error"]["details"]["field"] == "cursor"


def test_listing_is_newest_first_with_cursor(prod, new_db):
    c = prod.client
    project, _ = setup_project(c, BRANCHED)
    db = register_db(c, project, new_db("sqlite"))
    body = {"database": db, "target": "heads", "coalesce": False}
    ids = [c.post("/v1/jobs", body).body["id"] for _ in range(5)]
    for i in ids:
        c.wait_job(i)
    page = c.get(f"/v1/jobs?database={db}&limit=2").body
    assert [j["id"] for j in page["jobs"]] == ids[::-1][:2]
    seen = [j["id"] for j in page["jobs"]]
    while page["next_cursor"]:
        page = c.get(f"/v1/jobs?database={db}&limit=2&cursor={page['next_cursor']}").body
        seen += [j["id"] for j in page["jobs"]]
    assert seen == ids[::-1]
    done = c.get(f"/v1/jobs?database={db}&state=succeeded").body["jobs"]
    assert {j["id"] for j in done} == set(ids)


def test_waiting_job_shows_the_holder_and_can_be_cancelled(prod, new_db):
    c = prod.client
    slow = {"versions/s.py": revision("s", None, "import time; time.sleep(3)")}
    project, _ = setup_project(c, slow)
    db = register_db(c, project, new_db("postgresql"))
    first = c.post("/v1/jobs", {"database": db, "target": "head"}).body
    c.wait_state(first["id"], "running")
    second = c.post("/v1/jobs", {"database": db, "target": "head"}).body
    waiting = c.wait_state(second["id"], "waiting_for_lock")
    deadline = time.monotonic() + 10
    while waiting["lock"].get("held_by_job") != first["id"] and time.monotonic() < deadline:
        waiting = c.get(f"/v1/jobs/{second['id']}").body
    assert waiting["lock"]["held_by_job"] == first["id"]
    r = c.post(f"/v1/jobs/{second['id']}/cancel")
    assert r.status == 200 and r.body["state"] == "cancelled"
    r = c.post(f"/v1/jobs/{first['id']}/cancel")
    assert r.status == 409 and r.body["error"]["code"] == "not_cancellable"
    assert c.wait_job(first["id"])["state"] == "succeeded"
    cancelled = c.wait_job(second["id"])
    assert cancelled["state"] == "cancelled" and cancelled["steps"] == []
    assert cancelled["started_at"] is None


def test_twenty_jobs_on_one_target_never_overlap(prod, new_db):
    """Two worker processes, one PostgreSQL target: the locks serialize every job."""
    c = prod.client
    url = new_db("postgresql")
    import sqlalchemy as sa

    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE job_log (id serial PRIMARY KEY, started timestamptz, ended timestamptz)"
        )
    body = """
        op.execute("INSERT INTO job_log (started) VALUES (clock_timestamp())")
        op.execute("SELECT pg_sleep(0.15)")
        op.execute("UPDATE job_log SET ended = clock_timestamp() WHERE ended IS NULL")
    """
    project, _ = setup_project(c, {"versions/w.py": revision("w", None, body, body)})
    db = register_db(c, project, url)
    ids = []
    for i in range(20):
        action, target = ("upgrade", "head") if i % 2 == 0 else ("downgrade", "base")
        r = c.post(
            "/v1/jobs", {"database": db, "action": action, "target": target, "coalesce": False}
        )
        assert r.status == 202
        ids.append(r.body["id"])
    jobs = [c.wait_job(i, timeout=120) for i in ids]
    assert all(j["state"] == "succeeded" for j in jobs), [j["error"] for j in jobs]
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT started, ended FROM job_log ORDER BY started").all()
    engine.dispose()
    assert len(rows) >= 2
    for (_s1, e1), (s2, _) in zip(rows, rows[1:]):
        assert e1 <= s2, "two migrations ran on the target at once"
    spans = sorted((j["started_at"], j["finished_at"]) for j in jobs)
    for (_s1, e1), (s2, _) in zip(spans, spans[1:]):
        assert e1 <= s2, "two jobs held the target at once"
    tokens = [j["lock"]["fencing_token"] for j in sorted(jobs, key=lambda j: j["started_at"])]
    assert tokens == sorted(tokens) and len(set(tokens)) == 20
    workers = {
        e["data"]["worker"].split(":")[1]
        for e in c.get(f"/v1/audit?database={db}&limit=1000").body["events"]
        if e["action"] == "job.claimed"
    }
    assert len(workers) >= 2, "both worker processes should have taken jobs"


def test_a_job_never_sees_another_projects_helper_modules(prod, new_db):
    c = prod.client
    body = """
        import retort_helpers
        op.execute(f"CREATE TABLE seen_{retort_helpers.NAME} (id INTEGER)")
    """
    urls = {}
    for name in ("alpha", "beta"):
        files = {
            "pkg/retort_helpers.py": f"NAME = {name!r}\n",
            "pkg/versions/h1.py": revision("h1", None, body),
        }
        project, _ = setup_project(c, files, name=unique(name))
        for _i in range(3):
            url = new_db("sqlite")
            urls[url] = name
            db = register_db(c, project, url)
            c.post("/v1/jobs", {"database": db, "target": "head"})
    import sqlalchemy as sa

    time.sleep(0.5)
    for url, name in urls.items():
        deadline = time.monotonic() + 60
        while True:
            engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
            found = set(sa.inspect(engine).get_table_names())
            engine.dispose()
            if "alembic_version" in found or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert f"seen_{name}" in found, (url, found)
        assert not {t for t in found if t.startswith("seen_")} - {f"seen_{name}"}


def _ran_in(url: str) -> int:
    """The pid a `ran_in_<pid>` table of the database names."""
    import sqlalchemy as sa

    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        (table,) = [t for t in sa.inspect(engine).get_table_names() if t.startswith("ran_in_")]
    finally:
        engine.dispose()
    return int(table.removeprefix("ran_in_"))


def test_revisions_run_in_a_warm_runner_never_in_the_pool_process(prod, new_db):
    """A runner of the project's, not the worker: it loads the scripts once and keeps them."""
    c = prod.client
    head = (
        "import builtins, os\n"
        "builtins.retort_loads = getattr(builtins, 'retort_loads', 0) + 1\n"
    )  # fmt: skip
    body = (
        'op.execute(f"CREATE TABLE ran_in_{os.getpid()} (id INTEGER)")\n'
        'op.execute(f"CREATE TABLE loads_{builtins.retort_loads} (id INTEGER)")'
    )
    project, _ = setup_project(c, {"versions/p1.py": revision("p1", None, body, head=head)})
    for _i in range(4):
        url = new_db("sqlite")
        job = run_job(c, register_db(c, project, url), target="head")
        assert job["state"] == "succeeded", job
        assert _ran_in(url) != int(job["worker"].rsplit(":", 1)[1])
        assert "loads_1" in tables(url), "a runner loaded the scripts twice"


def test_a_bundle_with_helper_modules_runs_in_a_process_of_its_own(prod, new_db):
    c = prod.client
    body = """
        import retort_helper_pid
        op.execute(f"CREATE TABLE ran_in_{os.getpid()} (id INTEGER)")
    """
    files = {
        "retort_helper_pid.py": "X = 1\n",
        "versions/q1.py": revision("q1", None, body, head="import os\n"),
    }
    project, _ = setup_project(c, files)
    url = new_db("sqlite")
    job = run_job(c, register_db(c, project, url), target="head")
    assert job["state"] == "succeeded", job
    assert _ran_in(url) != int(job["worker"].rsplit(":", 1)[1])


def test_bundle_upload_with_wrong_project_bundle_is_404(prod, new_db):
    c = prod.client
    p1, b1 = setup_project(c, BRANCHED)
    p2, _ = setup_project(c, {"versions/x.py": revision("x", None)})
    db = register_db(c, p2, new_db("sqlite"))
    r = c.post("/v1/jobs", {"database": db, "target": "heads", "bundle": b1["id"]})
    assert r.status == 404


def test_relative_target_is_refused_when_the_database_has_several_heads(prod, new_db):
    """The bundle has one head (a merge), but the database still sits on two branches."""
    c = prod.client
    project, _ = setup_project(c, BRANCHED)
    db = register_db(c, project, new_db("sqlite"))
    assert run_job(c, db, target="heads")["to_heads"] == ["b", "c"]
    merged = {**BRANCHED, "versions/m.py": revision("m", ("b", "c"), message="merge")}
    r = c.post(
        f"/v1/projects/{project}/bundles", raw=make_tar(merged), content_type="application/gzip"
    )
    assert r.status == 201 and r.body["heads"] == ["m"]
    job = run_job(c, db, action="downgrade", target="-1")
    assert job["state"] == "failed"
    assert job["error"]["code"] == "ambiguous_relative_target"
    assert "b, c" in job["error"]["message"]
    assert run_job(c, db, target="head")["to_heads"] == ["m"]
