"""The latest bundle: the one pushed or promoted last; the list; ids and their prefixes."""

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


def push(c: Client, project: str, files: dict):
    return c.post(
        f"/v1/projects/{project}/bundles", raw=make_tar(files), content_type="application/gzip"
    )


def _events(c: Client, project: str, action: str) -> list[dict]:
    events = c.get(f"/v1/audit?project={project}&limit=1000").body["events"]
    return [e for e in events if e["action"] == action]  # newest first


def _listed(c: Client, project: str) -> list[tuple[str, bool]]:
    r = c.get(f"/v1/projects/{project}/bundles")
    assert r.status == 200, r
    return [(b["id"], b["latest"]) for b in r.body["bundles"]]


GOOD = chain_bundle(1)
BAD = {
    **chain_bundle(1),
    "versions/t002.py": revision("t002", "t001", "op.execute('SELECT no_such_function()')"),
}


def test_pushing_known_content_again_makes_it_latest(prod, new_db):
    """The latest trap: push good A, bad B, then A again: A is what migrate runs."""
    c = prod.client
    project, _ = setup_project(c)
    a = push(c, project, GOOD)
    assert a.status == 201 and a.body["latest"] is True, a
    b = push(c, project, BAD)
    assert b.status == 201 and b.body["latest"] is True, b
    assert c.get(f"/v1/projects/{project}/bundles/{a.body['id']}").body["latest"] is False
    assert _listed(c, project) == [(b.body["id"], True), (a.body["id"], False)]

    again = push(c, project, GOOD)
    assert again.status == 200 and again.body["id"] == a.body["id"], again
    assert again.body["latest"] is True
    assert c.get(f"/v1/projects/{project}/bundles/latest").body["id"] == a.body["id"]
    assert _listed(c, project) == [(a.body["id"], True), (b.body["id"], False)]
    promoted = _events(c, project, "bundle.promoted")
    assert len(promoted) == 1
    assert promoted[0]["data"] == {
        "from": b.body["id"],
        "to": a.body["id"],
        "reason": "pushed again",
    }
    # The latest pushed again: still latest, nothing to record.
    assert push(c, project, GOOD).status == 200
    assert len(_events(c, project, "bundle.promoted")) == 1

    db = register_db(c, project, new_db("sqlite"))
    assert c.get(f"/v1/databases/{db}").body["bundle"] == a.body["id"]
    job = run_job(c, db)  # no bundle named: the latest
    assert job["state"] == "succeeded" and job["bundle"] == a.body["id"], job
    assert job["to_heads"] == ["t001"]


def test_promote_makes_a_pushed_bundle_latest(prod, new_db):
    c = prod.client
    project, first = setup_project(c, GOOD)
    second = push(c, project, chain_bundle(2)).body
    assert _listed(c, project)[0] == (second["id"], True)

    r = c.post(f"/v1/projects/{project}/bundles/{first['id'][:12]}/promote")
    assert r.status == 200 and r.body["id"] == first["id"] and r.body["latest"] is True, r
    assert r.body["revisions"] == ["t001"]
    assert _listed(c, project) == [(first["id"], True), (second["id"], False)]
    events = _events(c, project, "bundle.promoted")
    assert [e["data"] for e in events] == [
        {"from": second["id"], "to": first["id"], "reason": "promoted"}
    ]
    # Promoting the latest changes nothing.
    r = c.post(f"/v1/projects/{project}/bundles/{first['id']}/promote")
    assert r.status == 200 and r.body["latest"] is True
    assert len(_events(c, project, "bundle.promoted")) == 1

    db = register_db(c, project, new_db("sqlite"))
    assert run_job(c, db)["to_heads"] == ["t001"]

    viewer = c.post(
        "/v1/tokens", {"name": unique("viewer"), "role": "viewer", "projects": [project]}
    ).body["token"]
    r = c.post(f"/v1/projects/{project}/bundles/{second['id']}/promote", token=viewer)
    assert r.status == 403
    assert c.post(f"/v1/projects/{project}/bundles/{'0' * 64}/promote").status == 404
    assert c.post(f"/v1/projects/no-such-project/bundles/{first['id']}/promote").status == 404
    assert _listed(c, project)[0] == (first["id"], True)


def test_the_list_is_paged_newest_first(prod):
    c = prod.client
    project, _ = setup_project(c)
    assert c.get(f"/v1/projects/{project}/bundles").body == {"bundles": [], "next_cursor": None}
    ids = [push(c, project, chain_bundle(n)).body["id"] for n in (1, 2, 3)]
    r = c.get(f"/v1/projects/{project}/bundles?limit=2")
    assert r.status == 200, r
    page = r.body["bundles"]
    assert [b["id"] for b in page] == [ids[2], ids[1]]
    assert page[0] == {
        "id": ids[2],
        "heads": ["t003"],
        "revision_count": 3,
        "created_by": page[0]["created_by"],
        "created_at": page[0]["created_at"],
        "pushed_at": page[0]["pushed_at"],
        "latest": True,
    }
    pushed = [dt.datetime.fromisoformat(b["pushed_at"].replace("Z", "+00:00")) for b in page]
    assert pushed[0] >= pushed[1]
    rest = c.get(f"/v1/projects/{project}/bundles?limit=2&cursor={r.body['next_cursor']}").body
    assert [b["id"] for b in rest["bundles"]] == [ids[0]] and rest["next_cursor"] is None
    r = c.get(f"/v1/projects/{project}/bundles?cursor=@@@")
    assert r.status == 422 and r.body["error"]["details"]["field"] == "cursor"
    assert c.get(f"/v1/projects/{project}/bundles?limit=0").status == 422
    assert c.get("/v1/projects/no-such-project/bundles").status == 404


def test_an_id_prefix_needs_8_characters_and_must_be_unique(prod, new_db):
    c = prod.client
    project, bundle = setup_project(c, GOOD)
    digest = bundle["id"]
    assert c.get(f"/v1/projects/{project}/bundles/{digest[:12]}").body["id"] == digest
    assert c.get(f"/v1/projects/{project}/bundles/{digest[:8]}").body["id"] == digest
    r = c.get(f"/v1/projects/{project}/bundles/{digest[:7]}")
    assert r.status == 422 and r.body["error"]["code"] == "invalid_bundle_ref", r
    assert c.get(f"/v1/projects/{project}/bundles/not-hex-at-all").status == 422
    db = register_db(c, project, new_db("sqlite"))
    r = c.post("/v1/jobs", {"database": db, "bundle": digest[:7]})
    assert r.status == 422 and r.body["error"]["code"] == "invalid_bundle_ref", r

    # Another bundle whose id starts with the same 10 characters (no sha256
    # collision needed: the row is written straight into the state database).
    twin = digest[:10] + ("0" if digest[10] != "0" else "1") + digest[11:]
    from service.bundles.models import Bundle

    state = sa.create_engine(prod.state_url, poolclass=sa.pool.NullPool)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    with state.begin() as conn:
        project_id = conn.execute(
            sa.text("SELECT id FROM projects WHERE name = :n"), {"n": project}
        ).scalar_one()
        conn.execute(
            sa.insert(Bundle.__table__).values(
                project_id=project_id,
                digest=twin,
                versions_path="versions",
                revisions=[],
                heads=[],
                bases=[],
                file_count=0,
                size=0,
                created_by="test",
                created_at=now,
                pushed_at=now,
            )
        )
    state.dispose()
    for ref in (digest[:8], digest[:10]):
        r = c.get(f"/v1/projects/{project}/bundles/{ref}")
        assert r.status == 422 and r.body["error"]["code"] == "ambiguous_bundle", r
        candidates = {b["id"] for b in r.body["error"]["details"]["candidates"]}
        assert candidates == {digest, twin}
    r = c.post("/v1/jobs", {"database": db, "bundle": digest[:8]})
    assert r.status == 422 and r.body["error"]["code"] == "ambiguous_bundle", r
    r = c.post(f"/v1/projects/{project}/bundles/{digest[:8]}/promote")
    assert r.status == 422 and r.body["error"]["code"] == "ambiguous_bundle", r
    # 12 characters tell them apart; the full id always does.
    assert c.get(f"/v1/projects/{project}/bundles/{digest[:12]}").body["id"] == digest
    assert c.get(f"/v1/projects/{project}/bundles/{digest.upper()}").body["id"] == digest
    job = run_job(c, db, bundle=digest[:12])
    assert job["state"] == "succeeded" and job["bundle"] == digest, job
    assert _listed(c, project) == [(digest, True), (twin, False)]
