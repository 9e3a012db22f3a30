"""Scoped tokens: every role against every route, other projects invisible, revocation."""

import datetime as dt
import time

import pytest

from tests.helpers import (
    chain_bundle,
    make_tar,
    register_db,
    run_job,
    setup_project,
    unique,
)

RANK = {"viewer": 0, "deployer": 1, "admin": 2, "root": 2}


@pytest.fixture(scope="module")
def world(prod, backends, tmp_path_factory):
    """Two projects with a database, a finished job and a webhook each; four tokens."""
    c = prod.client
    tmp = tmp_path_factory.mktemp("tokens")
    out = {"c": c, "tmp": tmp}
    for key in ("A", "B"):
        project, _ = setup_project(c, chain_bundle(1))
        db = register_db(c, project, backends.new("sqlite", tmp))
        job = run_job(c, db)
        hook = c.post(
            f"/v1/projects/{project}/webhooks",
            {"url": "https://example.invalid/h", "events": ["job.failed"]},
        ).body
        out[key] = {"project": project, "db": db, "job": job["id"], "hook": hook["id"]}
    a = out["A"]["project"]
    out["tokens"] = {
        "viewer": _token(c, "viewer", [a]),
        "deployer": _token(c, "deployer", [a]),
        "admin": _token(c, "admin", [a]),
        "root": _token(c, "admin", "*"),
    }
    return out


def _token(c, role: str, projects, **extra) -> dict:
    r = c.post(
        "/v1/tokens", {"name": unique(f"{role}-tok"), "role": role, "projects": projects, **extra}
    )
    assert r.status == 201, r
    assert r.body["token"].startswith("rtk_")
    return r.body


# (name, minimum role, needs a token for every project, request builder, success status)
# A builder gets the world and a project key ("A" or "B") and returns (method, path, kwargs).
ROUTES = [
    ("list projects", "viewer", False, lambda w, k: ("GET", "/v1/projects", {}), 200),
    (
        "create project",
        "admin",
        True,
        lambda w, k: ("POST", "/v1/projects", {"body": {"name": unique("p")}}),
        201,
    ),
    (
        "show project",
        "viewer",
        False,
        lambda w, k: ("GET", f"/v1/projects/{w[k]['project']}", {}),
        200,
    ),
    (
        "upload bundle",
        "deployer",
        False,
        lambda w, k: (
            "POST",
            f"/v1/projects/{w[k]['project']}/bundles",
            {
                "raw": make_tar(chain_bundle(2, prefix=unique("r").replace("-", ""))),
                "content_type": "application/gzip",
            },
        ),
        201,
    ),
    (
        "show bundle",
        "viewer",
        False,
        lambda w, k: ("GET", f"/v1/projects/{w[k]['project']}/bundles/latest", {}),
        200,
    ),
    (
        "register database",
        "admin",
        False,
        lambda w, k: (
            "POST",
            "/v1/databases",
            {
                "body": {
                    "name": unique("db"),
                    "project": w[k]["project"],
                    "url": f"sqlite:///{w['tmp'] / unique('x')}.db",
                }
            },
        ),
        201,
    ),
    ("list databases", "viewer", False, lambda w, k: ("GET", "/v1/databases", {}), 200),
    (
        "show database",
        "viewer",
        False,
        lambda w, k: ("GET", f"/v1/databases/{w[k]['db']}", {}),
        200,
    ),
    (
        "unlock database",
        "admin",
        False,
        lambda w, k: ("POST", f"/v1/databases/{w[k]['db']}/unlock", {}),
        409,  # allowed, and refused: nothing holds its lease
    ),
    (
        "database history",
        "viewer",
        False,
        lambda w, k: ("GET", f"/v1/databases/{w[k]['db']}/history", {}),
        200,
    ),
    (
        "create job",
        "deployer",
        False,
        lambda w, k: ("POST", "/v1/jobs", {"body": {"database": w[k]["db"], "target": "base"}}),
        202,
    ),
    ("list jobs", "viewer", False, lambda w, k: ("GET", "/v1/jobs", {}), 200),
    ("show job", "viewer", False, lambda w, k: ("GET", f"/v1/jobs/{w[k]['job']}", {}), 200),
    (
        "job events",
        "viewer",
        False,
        lambda w, k: ("GET", f"/v1/jobs/{w[k]['job']}/events", {}),
        200,
    ),
    (
        "cancel job",
        "deployer",
        False,
        # The job has finished: allowed to ask, refused for its state.
        lambda w, k: ("POST", f"/v1/jobs/{w[k]['job']}/cancel", {}),
        409,
    ),
    ("audit", "viewer", False, lambda w, k: ("GET", "/v1/audit", {}), 200),
    ("audit verify", "viewer", True, lambda w, k: ("GET", "/v1/audit/verify", {}), 200),
    (
        "create webhook",
        "deployer",
        False,
        lambda w, k: (
            "POST",
            f"/v1/projects/{w[k]['project']}/webhooks",
            {"body": {"url": "https://example.invalid/x", "events": ["job.succeeded"]}},
        ),
        201,
    ),
    (
        "list webhooks",
        "viewer",
        False,
        lambda w, k: ("GET", f"/v1/projects/{w[k]['project']}/webhooks", {}),
        200,
    ),
    (
        "webhook deliveries",
        "viewer",
        False,
        lambda w, k: (
            "GET",
            f"/v1/projects/{w[k]['project']}/webhooks/{w[k]['hook']}/deliveries",
            {},
        ),
        200,
    ),
    ("list tokens", "admin", True, lambda w, k: ("GET", "/v1/tokens", {}), 200),
    (
        "create token",
        "admin",
        True,
        lambda w, k: (
            "POST",
            "/v1/tokens",
            {"body": {"name": unique("t"), "role": "viewer", "projects": "*"}},
        ),
        201,
    ),
]
# Routes that name a project's object: another project's answers 404.
PROJECT_SCOPED = {
    "show project",
    "upload bundle",
    "show bundle",
    "register database",
    "show database",
    "unlock database",
    "database history",
    "create job",
    "show job",
    "job events",
    "cancel job",
    "create webhook",
    "list webhooks",
    "webhook deliveries",
}


@pytest.mark.parametrize("holder", ["viewer", "deployer", "admin", "root"])
def test_every_role_against_every_route(world, holder):
    c = world["c"]
    token = world["tokens"][holder]["token"]
    for name, needs, everywhere, build, ok in ROUTES:
        allowed = RANK[holder] >= RANK[needs] and (not everywhere or holder == "root")
        for key in ("A", "B") if name in PROJECT_SCOPED else ("A",):
            method, path, kw = build(world, key)
            r = c.request(method, path, kw.get("body"), token=token, **_raw(kw))
            if not allowed:
                expected = 403
            elif key == "B" and holder != "root":
                expected = 404  # not 403: the name of another project's object does not leak
            else:
                expected = ok
            assert r.status == expected, f"{holder} {name} on {key}: {r}"
            if r.status >= 400:
                assert set(r.body["error"]) == {"code", "message", "details"}


def test_another_projects_object_answers_exactly_like_a_missing_one(world):
    c = world["c"]
    token = world["tokens"]["admin"]["token"]
    job_b = world["B"]["job"]
    hidden = c.get(f"/v1/jobs/{job_b}", token=token)
    missing = c.get("/v1/jobs/987654321", token=token)
    assert hidden.status == missing.status == 404
    assert hidden.body["error"]["message"] == missing.body["error"]["message"].replace(
        "987654321", str(job_b)
    )
    db_b = world["B"]["db"]
    hidden = c.get(f"/v1/databases/{db_b}", token=token).body["error"]
    missing = c.get("/v1/databases/no-such-db", token=token).body["error"]
    assert hidden["message"] == missing["message"].replace("no-such-db", db_b)
    assert hidden["details"] == {"database": db_b}


def _raw(kw: dict) -> dict:
    return {k: v for k, v in kw.items() if k in ("raw", "content_type")}


def test_a_scoped_token_sees_only_its_projects(world):
    c = world["c"]
    token = world["tokens"]["viewer"]["token"]
    a, b = world["A"], world["B"]
    assert [p["name"] for p in c.get("/v1/projects", token=token).body["projects"]] == [
        a["project"]
    ]
    names = {d["name"] for d in c.get("/v1/databases", token=token).body["databases"]}
    assert a["db"] in names and b["db"] not in names
    jobs = c.get("/v1/jobs?limit=500", token=token).body["jobs"]
    assert jobs and {j["project"] for j in jobs} == {a["project"]}
    events = c.get("/v1/audit?limit=1000", token=token).body["events"]
    assert events and {e["project"] for e in events} == {a["project"]}
    r = c.get(f"/v1/jobs?database={b['db']}", token=token)
    assert r.status == 404


def test_writes_are_audited_under_the_token_name_and_refusals_too(world):
    c = world["c"]
    deployer, viewer = world["tokens"]["deployer"], world["tokens"]["viewer"]
    job = c.post(
        "/v1/jobs",
        {"database": world["A"]["db"], "target": "head", "coalesce": False},
        token=deployer["token"],
    ).body
    assert job["requested_by"] == deployer["name"]
    c.wait_job(job["id"])
    events = c.get(f"/v1/audit?job={job['id']}").body["events"]
    requested = next(e for e in events if e["action"] == "job.requested")
    assert requested["actor"] == deployer["name"]
    r = c.post("/v1/jobs", {"database": world["A"]["db"]}, token=viewer["token"])
    assert r.status == 403 and r.body["error"]["code"] == "forbidden"
    r = c.post("/v1/jobs", {"database": world["A"]["db"]}, token="rtk_1_" + "x" * 40)
    assert r.status == 401
    refused = [
        e for e in c.get("/v1/audit?limit=200").body["events"] if e["action"] == "request.refused"
    ]
    mine = [e for e in refused if e["actor"] == viewer["name"]]
    assert mine and mine[0]["data"]["path"] == "/v1/jobs" and mine[0]["data"]["status"] == 403
    assert "deployer" in mine[0]["data"]["message"]
    assert any(e["actor"] == "anonymous" and e["data"]["status"] == 401 for e in refused)
    created = [
        e for e in c.get("/v1/audit?limit=1000").body["events"] if e["action"] == "token.created"
    ]
    assert any(e["data"]["token"] == deployer["name"] for e in created)


def test_token_lifecycle_revocation_and_expiry(prod):
    c = prod.client
    project, _ = setup_project(c)
    tok = _token(c, "viewer", [project])
    assert c.get("/v1/projects", token=tok["token"]).status == 200
    listed = c.get("/v1/tokens").body["tokens"]
    mine = next(t for t in listed if t["id"] == tok["id"])
    assert "token" not in mine and mine["projects"] == [project] and mine["revoked_at"] is None
    assert all(tok["token"] not in str(t) for t in listed)
    assert c.request("DELETE", f"/v1/tokens/{tok['id']}").status == 204
    r = c.get("/v1/projects", token=tok["token"])
    assert r.status == 401 and "revoked" in r.body["error"]["message"]
    assert c.request("DELETE", "/v1/tokens/999999").status == 404
    events = c.get("/v1/audit?limit=100").body["events"]
    assert any(e["action"] == "token.revoked" and e["data"]["id"] == tok["id"] for e in events)

    soon = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)).isoformat()
    short = _token(c, "viewer", "*", expires_at=soon)
    time.sleep(1.5)
    assert c.get("/v1/projects", token=short["token"]).status == 401
    # A token that differs in one character of its secret is not valid.
    forged = tok["token"][:-1] + ("a" if tok["token"][-1] != "a" else "b")
    assert c.get("/v1/projects", token=forged).status == 401


def test_token_requests_are_checked(prod):
    c = prod.client
    project, _ = setup_project(c)
    bad = [
        ({"name": "x", "role": "root", "projects": "*"}, "role"),
        ({"name": "x", "role": "viewer", "projects": []}, "projects"),
        ({"name": "x", "role": "viewer", "projects": ["no-such-project"]}, "projects"),
        ({"name": "admin", "role": "viewer", "projects": "*"}, "name"),
        ({"name": "Bad Name", "role": "viewer", "projects": "*"}, "name"),
        (
            {"name": "x", "role": "viewer", "projects": "*", "expires_at": "2001-01-01T00:00Z"},
            "expires_at",
        ),
        ({"name": "x", "role": "viewer", "projects": "*", "extra": 1}, "extra"),
    ]
    for body, field in bad:
        r = c.post("/v1/tokens", body)
        assert r.status == 422, (body, r)
        assert r.body["error"]["details"]["field"].startswith(field), (body, r)
    name = unique("dup")
    body = {"name": name, "role": "viewer", "projects": [project]}
    assert c.post("/v1/tokens", body).status == 201
    assert c.post("/v1/tokens", body).status == 409
