"""Registrations that change: PATCH and DELETE a database, repair a checksum, blocked_by."""

import datetime as dt

import sqlalchemy as sa

from tests.helpers import (
    Client,
    chain_bundle,
    make_tar,
    register_db,
    revision,
    run_job,
    setup_project,
    unique,
)

PASSWORD = "Heron-Pw-5519"


def _token(c: Client, role: str, project: str) -> str:
    r = c.post("/v1/tokens", {"name": unique(f"{role}-tok"), "role": role, "projects": [project]})
    assert r.status == 201, r
    return r.body["token"]


def _events(c: Client, project: str, action: str) -> list[dict]:
    events = c.get(f"/v1/audit?project={project}&limit=1000").body["events"]
    return [e for e in events if e["action"] == action]  # newest first


def _push(c: Client, project: str, files: dict) -> dict:
    r = c.post(
        f"/v1/projects/{project}/bundles", raw=make_tar(files), content_type="application/gzip"
    )
    assert r.status in (200, 201), r
    return r.body


def _state(prod):
    return sa.create_engine(prod.state_url, poolclass=sa.pool.NullPool)


def _patch(c: Client, name: str, body: dict, **kw):
    return c.request("PATCH", f"/v1/databases/{name}", body, **kw)


def test_patch_changes_url_and_tags_validated_as_on_registration(prod, new_db):
    c = prod.client
    project, _ = setup_project(c, chain_bundle(1))
    name = register_db(c, project, new_db("sqlite"), tags={"tier": "gold", "team": "a"})

    r = _patch(c, name, {"tags": {"tier": "free"}})
    assert r.status == 200, r
    assert r.body["tags"] == {"tier": "free"}  # replaced whole
    assert r.body["dialect"] == "sqlite" and r.body["name"] == name

    # No job ran on it yet: another dialect is allowed. The password is masked everywhere.
    r = _patch(c, name, {"url": f"postgresql://u:{PASSWORD}@127.0.0.1:1/nowhere"})
    assert r.status == 200, r
    assert r.body["dialect"] == "postgresql" and "***" in r.body["url"]
    assert PASSWORD not in str(r.body)
    target = new_db("postgresql")
    r = _patch(c, name, {"url": target, "tags": {"tier": "gold"}})
    assert r.status == 200, r
    assert r.body["tags"] == {"tier": "gold"}
    job = run_job(c, name)
    assert job["state"] == "succeeded", job
    shown = c.get(f"/v1/databases/{name}").body
    assert shown["current"] == ["t001"] and shown["blocked_by"] == []

    # A job ran: the dialect stays.
    r = _patch(c, name, {"url": new_db("sqlite")})
    assert r.status == 422 and r.body["error"]["code"] == "dialect_change", r
    assert r.body["error"]["details"]["field"] == "url"
    assert c.get(f"/v1/databases/{name}?live=false").body["dialect"] == "postgresql"

    # Validated exactly as on registration, naming the field.
    for bad, code in (
        ("not a url", "invalid"),
        ("oracle://x/y", "invalid"),
        ("sqlite:///relative.db", "sqlite_path_not_allowed"),
        ("postgresql://u@h/db?host=elsewhere", "url_option_not_allowed"),
        (prod.state_url, "target_is_retort"),
    ):
        r = _patch(c, name, {"url": bad})
        assert r.status == 422, (bad, r)
        assert r.body["error"]["code"] == code and r.body["error"]["details"]["field"] == "url"
    for body in ({}, {"name": "x"}, {"tags": {"k": 1}}, {"url": ""}):
        r = _patch(c, name, body)
        assert r.status == 422, (body, r)
    assert _patch(c, "no-such-db", {"tags": {}}).status == 404

    # Admins only.
    deployer = _token(c, "deployer", project)
    r = _patch(c, name, {"tags": {}}, token=deployer)
    assert r.status == 403, r
    assert c.request("DELETE", f"/v1/databases/{name}", token=deployer).status == 403
    r = c.post(f"/v1/databases/{name}/repair", {"revision": "t001"}, token=deployer)
    assert r.status == 403

    updates = _events(c, project, "database.updated")
    assert len(updates) == 3 and all(e["database"] == name for e in updates)
    assert updates[0]["data"]["tags"] == {"tier": "gold"}
    assert updates[1]["data"]["dialect"] == "postgresql"
    assert updates[1]["data"]["previous_dialect"] == "sqlite"
    assert "***" in updates[1]["data"]["url"]
    assert PASSWORD not in str(c.get(f"/v1/audit?database={name}&limit=1000").body)
    assert PASSWORD not in prod.logs()


def test_a_database_with_an_active_job_is_not_changed_nor_removed(prod, new_db):
    c = prod.client
    slow = {
        "versions/s001.py": revision("s001", None, "import time\ntime.sleep(3)"),
    }
    project, _ = setup_project(c, slow)
    name = register_db(c, project, new_db("sqlite"))
    r = c.post("/v1/jobs", {"database": name})
    assert r.status == 202, r
    job_id = r.body["id"]
    r = _patch(c, name, {"tags": {"x": "y"}})
    assert r.status == 409 and r.body["error"]["code"] == "database_busy", r
    assert r.body["error"]["details"]["job"] == job_id
    r = c.request("DELETE", f"/v1/databases/{name}")
    assert r.status == 409 and r.body["error"]["code"] == "database_busy", r
    assert c.wait_job(job_id)["state"] == "succeeded"
    assert _patch(c, name, {"tags": {"x": "y"}}).status == 200
    assert c.request("DELETE", f"/v1/databases/{name}").status == 204


def test_delete_frees_the_name_and_keeps_the_old_jobs(prod, new_db):
    c = prod.client
    project, _ = setup_project(c, chain_bundle(2))
    name = register_db(c, project, new_db("sqlite"), tags={"k": "v"})
    old = run_job(c, name)
    assert old["state"] == "succeeded", old
    state = _state(prod)
    with state.connect() as conn:
        old_id = conn.execute(
            sa.text("SELECT id FROM databases WHERE name = :n"), {"n": name}
        ).scalar_one()

    r = c.request("DELETE", f"/v1/databases/{name}")
    assert r.status == 204 and r.body is None, r
    assert c.get(f"/v1/databases/{name}").status == 404
    assert c.get(f"/v1/databases/{name}?live=false").status == 404
    listed = c.get(f"/v1/databases?project={project}").body["databases"]
    assert listed == []
    assert c.request("DELETE", f"/v1/databases/{name}").status == 404
    r = c.post("/v1/jobs", {"database": name})
    assert r.status == 404
    # Its jobs stay readable (an API process that served the finished job before
    # still shows the name it had then; read afresh, the name the row kept).
    job = c.get(f"/v1/jobs/{old['id']}")
    assert job.status == 200 and job.body["state"] == "succeeded"
    assert job.body["database"] == name  # the name it ran under, cached or read afresh

    # The name is free again: another target, another history.
    again = register_db(c, project, new_db("sqlite"), name=name)
    shown = c.get(f"/v1/databases/{again}").body
    assert shown["current"] == [] and shown["pending"] == ["t001", "t002"]
    assert shown["lock"] == {"fencing_token": 0, "held_by_job": None}
    new = run_job(c, again)
    assert new["state"] == "succeeded" and new["from_heads"] == [], new
    assert [d["name"] for d in c.get(f"/v1/databases?project={project}").body["databases"]] == [
        name
    ]

    with state.connect() as conn:
        row = conn.execute(
            sa.text("SELECT name, removed_at, url_masked FROM databases WHERE id = :i"),
            {"i": old_id},
        ).one()
        leases = conn.execute(
            sa.text("SELECT count(*) FROM leases WHERE database_id = :i"), {"i": old_id}
        ).scalar_one()
    state.dispose()
    assert row.name == f"{name}~{old_id}" and row.removed_at is not None
    assert row.url_masked.startswith("sqlite:///") and leases == 0

    removed = _events(c, project, "database.removed")
    assert len(removed) == 1 and removed[0]["database"] == name
    assert removed[0]["data"]["kept_as"] == f"{name}~{old_id}"
    assert removed[0]["data"]["tags"] == {"k": "v"}


def test_repair_accepts_a_changed_file_and_the_upgrade_then_runs(prod, new_db):
    c = prod.client
    v1 = chain_bundle(2)
    project, first = setup_project(c, v1)
    name = register_db(c, project, new_db("postgresql"))
    assert run_job(c, name)["state"] == "succeeded"
    assert c.get(f"/v1/databases/{name}").body["blocked_by"] == []

    # The same revisions, t002's file edited after it was applied, and a new t003.
    v2 = {**chain_bundle(3)}
    v2["versions/t002.py"] = v1["versions/t002.py"] + "# reformatted\n"
    second = _push(c, project, v2)
    graph = {r["id"]: r for r in c.get(f"/v1/projects/{project}/bundles/latest").body["revisions"]}
    old_graph = {
        r["id"]: r for r in c.get(f"/v1/projects/{project}/bundles/{first['id']}").body["revisions"]
    }
    old_sha, new_sha = old_graph["t002"]["sha256"], graph["t002"]["sha256"]
    assert old_sha != new_sha

    stored = c.get(f"/v1/databases/{name}?live=false").body
    assert [(b["code"], b.get("revision")) for b in stored["blocked_by"]] == [
        ("revision_changed", "t002")
    ]
    failed = run_job(c, name)
    assert failed["state"] == "failed" and failed["error"]["code"] == "revision_changed", failed

    r = c.post(f"/v1/databases/{name}/repair", {"revision": "t003"})
    assert r.status == 422 and r.body["error"]["code"] == "revision_not_applied", r
    assert r.body["error"]["details"]["field"] == "revision"
    assert c.post(f"/v1/databases/{name}/repair", {}).status == 422
    assert c.post("/v1/databases/no-such-db/repair", {"revision": "t002"}).status == 404

    # A latest bundle without the revision: nothing to accept (and, live, the
    # database's current head is unknown to it).
    other = _push(c, project, {"versions/x001.py": revision("x001", None)})
    r = c.post(f"/v1/databases/{name}/repair", {"revision": "t002"})
    assert r.status == 422 and r.body["error"]["code"] == "revision_not_in_bundle", r
    live = c.get(f"/v1/databases/{name}").body
    assert ("unknown_current_revision", "t002") in [
        (b["code"], b.get("revision")) for b in live["blocked_by"]
    ]
    stored = c.get(f"/v1/databases/{name}?live=false").body
    assert "unknown_current_revision" not in [b["code"] for b in stored["blocked_by"]]
    assert other["id"] != second["id"]
    r = c.post(f"/v1/projects/{project}/bundles/{second['id'][:12]}/promote")
    assert r.status == 200 and r.body["latest"] is True, r

    r = c.post(f"/v1/databases/{name}/repair", {"revision": "t002"})
    assert r.status == 200, r
    assert r.body == {
        "database": name,
        "revision": "t002",
        "bundle": second["id"],
        "old_sha256": old_sha,
        "new_sha256": new_sha,
    }
    assert c.get(f"/v1/databases/{name}").body["blocked_by"] == []
    r = c.post(f"/v1/databases/{name}/repair", {"revision": "t002"})
    assert r.status == 409 and r.body["error"]["code"] == "nothing_to_repair", r

    done = run_job(c, name)
    assert done["state"] == "succeeded" and done["to_heads"] == ["t003"], done
    assert done["bundle"] == second["id"]
    repaired = _events(c, project, "database.repaired")
    assert len(repaired) == 1 and repaired[0]["database"] == name
    assert repaired[0]["data"] == {
        "revision": "t002",
        "old_sha256": old_sha,
        "new_sha256": new_sha,
        "bundle": second["id"],
    }


def test_blocked_by_names_a_drifted_database(prod, new_db):
    c = prod.client
    project, _ = setup_project(
        c, chain_bundle(1), settings={"drift": {"refuse_when_drifted": True}}
    )
    name = register_db(c, project, new_db("sqlite"))
    assert c.get(f"/v1/databases/{name}?live=false").body["blocked_by"] == []
    state = _state(prod)
    with state.begin() as conn:
        conn.execute(
            sa.text("UPDATE databases SET drifted = true, drift_checked_at = :at WHERE name = :n"),
            {"n": name, "at": dt.datetime(2026, 12, 1, 10, tzinfo=dt.UTC)},
        )
    try:
        for live in ("true", "false"):
            blocked = c.get(f"/v1/databases/{name}?live={live}").body["blocked_by"]
            assert [b["code"] for b in blocked] == ["drifted"], blocked
            assert blocked[0]["drift_checked_at"] == "2026-12-01T10:00:00Z"
            assert "refuse_when_drifted" in blocked[0]["message"]
    finally:
        with state.begin() as conn:
            conn.execute(
                sa.text("UPDATE databases SET drifted = false WHERE name = :n"), {"n": name}
            )
        state.dispose()
    assert c.get(f"/v1/databases/{name}").body["blocked_by"] == []
