"""PATCH /v1/projects/{name}: a merge patch of settings and secret variables, on both layouts."""

from __future__ import annotations

import json

import sqlalchemy as sa

from tests.helpers import chain_bundle, register_db, run_job, setup_project, tables, unique

SECRET = "s3cr3t-" + "q7Zp" * 6  # a value no other text in the logs could contain


def _patch(c, name: str, body, **kw):
    return c.request("PATCH", f"/v1/projects/{name}", body, **kw)


def _token(c, role: str, projects) -> dict:
    r = c.post("/v1/tokens", {"name": unique(f"{role}-tok"), "role": role, "projects": projects})
    assert r.status == 201, r
    return r.body


def _events(c, project: str, action: str = "project.updated") -> list[dict]:
    events = c.get(f"/v1/audit?project={project}&limit=1000").body["events"]
    return [e for e in events if e["action"] == action]  # newest first


def test_a_changed_setting_is_used_by_the_next_job(retort, new_db):
    c = retort.client
    project, _ = setup_project(c, chain_bundle(1), settings={"lock_timeout_ms": 4000})
    first = new_db("sqlite")
    job = run_job(c, register_db(c, project, first))
    assert job["state"] == "succeeded", job
    assert {"alembic_version", "items"} <= tables(first)

    r = _patch(c, project, {"settings": {"version_table": "svc_version"}})
    assert r.status == 200, r
    assert r.body["settings"]["version_table"] == "svc_version"
    assert r.body["settings"]["lock_timeout_ms"] == 4000  # a setting left out stays
    assert c.get(f"/v1/projects/{project}").body == r.body

    second = new_db("sqlite")
    job = run_job(c, register_db(c, project, second))
    assert job["state"] == "succeeded", job
    assert tables(second) == {"svc_version", "items"}
    assert "svc_version" not in tables(first)  # nothing happens to a database by itself


def test_null_resets_a_setting_and_lists_are_replaced_whole(retort):
    c = retort.client
    created = {
        "version_table": "old_version",
        "lock_timeout_ms": 3000,
        "requirements": ["sqlalchemy>=2", "attrs"],
        "env": {"A": "1", "B": "2"},
    }
    project, _ = setup_project(c, settings=created)
    patch = {
        "version_table": None,
        "lock_timeout_ms": None,
        "statement_timeout_ms": 100,
        "requirements": ["packaging"],
        "env": {"C": "3"},
    }
    r = _patch(c, project, {"settings": patch})
    assert r.status == 200, r
    settings = r.body["settings"]
    assert settings["version_table"] == "alembic_version"  # the default
    assert settings["lock_timeout_ms"] is None and settings["statement_timeout_ms"] == 100
    assert settings["requirements"] == ["packaging"] and settings["env"] == {"C": "3"}
    r = _patch(c, project, {"settings": {"env": None, "requirements": None}})
    assert r.status == 200, r
    assert r.body["settings"]["env"] == {} and r.body["settings"]["requirements"] == []
    assert r.body["settings"]["statement_timeout_ms"] == 100


def test_invalid_patches_are_422_naming_the_field_and_change_nothing(retort):
    c = retort.client
    project, _ = setup_project(c, settings={"requirements": ["attrs"]})
    before = c.get(f"/v1/projects/{project}").body

    lines = ["sqlalchemy>=2", "not a requirement !!", "attrs"]
    r = _patch(c, project, {"settings": {"requirements": lines}})
    assert r.status == 422, r
    error = r.body["error"]
    assert set(error) == {"code", "message", "details"} and error["code"] == "invalid"
    assert error["details"]["field"] == "settings.requirements"
    assert "line 2" in error["message"] and "not a requirement !!" in error["message"]

    r = _patch(c, project, {"settings": {"env": {"PATH": "/tmp/evil", "OK": "1"}}})
    assert r.status == 422 and r.body["error"]["details"]["field"] == "settings.env", r
    assert "PATH" in r.body["error"]["message"]
    r = _patch(c, project, {"secret_env": {"LD_PRELOAD": "x"}})
    assert r.status == 422 and r.body["error"]["details"]["field"] == "secret_env", r

    cases = [
        ({"settings": {"version_table": "x; drop"}}, "settings.version_table"),
        ({"settings": {"lock_timeout_ms": -1}}, "settings.lock_timeout_ms"),
        ({"settings": {"lock_timeout_ms": "5"}}, "settings.lock_timeout_ms"),  # strict JSON
        ({"settings": {"colour": "blue"}}, "settings.colour"),
        ({"colour": "blue"}, "colour"),
        ({"name": "renamed"}, "name"),  # a project's name is not a setting
        ({"settings": None}, "settings"),  # null does not mean "reset everything"
        ({"settings": {}}, "settings"),
        ({"secret_env": {}}, "secret_env"),
        ({}, "(body)"),  # an empty patch
    ]
    for body, field in cases:
        r = _patch(c, project, body)
        assert r.status == 422, (body, r)
        assert r.body["error"]["details"]["field"] == field, (body, r)
    r = c.request(
        "PATCH", f"/v1/projects/{project}", raw=b"", content_type="application/json"
    )  # no body at all
    assert r.status == 422, r

    assert c.get(f"/v1/projects/{project}").body == before
    assert _events(c, project) == []


def test_secret_env_is_set_and_removed_and_never_shown(retort):
    c = retort.client
    project, _ = setup_project(c)
    seen = []

    r = _patch(c, project, {"secret_env": {"API_KEY": SECRET, "OTHER": "x"}})
    assert r.status == 200, r
    assert r.body["secret_env_names"] == ["API_KEY", "OTHER"]
    seen.append(r)
    seen.append(c.get(f"/v1/projects/{project}"))
    assert seen[-1].body["secret_env_names"] == ["API_KEY", "OTHER"]
    seen.append(c.get("/v1/projects"))
    # Refused, with the value in the body: not in the answer nor the refusal's event.
    seen.append(_patch(c, project, {"secret_env": {"PATH": SECRET}}))
    assert seen[-1].status == 422
    seen.append(_patch(c, project, {"secret_env": {"API_KEY": SECRET * 2000}}))  # too long
    assert seen[-1].status == 422

    r = _patch(c, project, {"secret_env": {"API_KEY": None, "NEVER_SET": None}})
    assert r.status == 200, r
    assert r.body["secret_env_names"] == ["OTHER"]
    seen.append(r)

    removed, added = _events(c, project)
    assert added["data"]["secret_env_set"] == ["API_KEY", "OTHER"]
    assert added["data"]["secret_env_removed"] == [] and added["data"]["settings"] == {}
    assert removed["data"]["secret_env_set"] == []
    assert removed["data"]["secret_env_removed"] == ["API_KEY"]  # only what was there

    for response in seen:
        assert SECRET not in json.dumps(response.body), response
    assert SECRET not in json.dumps(c.get("/v1/audit?limit=1000").body)
    export = c.get("/v1/audit/export")
    assert export.status == 200 and project in export.body
    assert SECRET not in export.body
    assert SECRET not in retort.logs()

    # At rest: a Fernet token, not the value.
    engine = sa.create_engine(retort.state_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            stored = conn.execute(
                sa.text("SELECT secret_env FROM projects WHERE name = :n"), {"n": project}
            ).scalar_one()
    finally:
        engine.dispose()
    stored = json.loads(stored) if isinstance(stored, str) else stored
    assert set(stored) == {"OTHER"} and stored["OTHER"] != "x"


def test_the_audit_event_lists_what_changed_under_the_token_name(retort):
    c = retort.client
    project, _ = setup_project(c, settings={"lock_timeout_ms": 3000, "env": {"A": "1"}})
    deployer = _token(c, "deployer", [project])
    body = {
        "settings": {
            "lock_timeout_ms": 1234,
            "env": {"A": "1", "B": "2"},
            "version_table": "alembic_version",  # the value it has: not a change
            "max_duration_s": None,  # already the default: not a change
        },
        "secret_env": {"TOKEN": SECRET},
    }
    r = _patch(c, project, body, token=deployer["token"])
    assert r.status == 200, r
    [event] = _events(c, project)
    assert event["actor"] == deployer["name"] and event["project"] == project
    assert event["data"] == {
        "settings": {"lock_timeout_ms": 1234, "env": {"A": "1", "B": "2"}},
        "secret_env_set": ["TOKEN"],
        "secret_env_removed": [],
    }
    assert SECRET not in json.dumps(event)


def test_who_may_patch_a_project(retort):
    c = retort.client
    project, _ = setup_project(c, settings={"lock_timeout_ms": 3000})
    other, _ = setup_project(c)
    body = {"settings": {"lock_timeout_ms": 10}}

    viewer = _token(c, "viewer", [project])
    r = _patch(c, project, body, token=viewer["token"])
    assert r.status == 403 and r.body["error"]["code"] == "forbidden", r
    viewer_all = _token(c, "viewer", "*")
    assert _patch(c, project, body, token=viewer_all["token"]).status == 403

    # A token for another project: as if this one did not exist.
    elsewhere = _token(c, "deployer", [other])
    hidden = _patch(c, project, body, token=elsewhere["token"])
    missing = _patch(c, "no-such-project", body)
    assert hidden.status == missing.status == 404, (hidden, missing)
    assert missing.body["error"]["code"] == "not_found"
    assert hidden.body["error"]["message"] == missing.body["error"]["message"].replace(
        "no-such-project", project
    )
    assert c.get(f"/v1/projects/{project}").body["settings"]["lock_timeout_ms"] == 3000

    for role in ("deployer", "admin"):  # of this project only
        token = _token(c, role, [project])
        body = {"settings": {"lock_timeout_ms": 100 if role == "deployer" else 200}}
        r = _patch(c, project, body, token=token["token"])
        assert r.status == 200, (role, r)
    assert c.get(f"/v1/projects/{project}").body["settings"]["lock_timeout_ms"] == 200
    assert _patch(c, project, body, token=None).status == 401
