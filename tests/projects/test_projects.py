"""Projects over HTTP: create, read, and every way a request can be wrong."""

from tests.helpers import unique


def test_create_and_read_project(prod):
    c = prod.client
    name = unique("svc")
    settings = {
        "version_table": "svc_version",
        "lock_timeout_ms": 3000,
        "naming_convention": {"ix": "ix_%(column_0_label)s"},
    }
    r = c.post("/v1/projects", {"name": name, "settings": settings})
    assert r.status == 201, r
    assert r.body["name"] == name
    assert r.body["settings"]["version_table"] == "svc_version"
    assert r.body["settings"]["lock_timeout_ms"] == 3000
    assert c.get(f"/v1/projects/{name}").body["settings"] == r.body["settings"]
    assert name in [p["name"] for p in c.get("/v1/projects").body["projects"]]


def test_duplicate_project_is_409(prod):
    c = prod.client
    name = unique("dup")
    assert c.post("/v1/projects", {"name": name}).status == 201
    r = c.post("/v1/projects", {"name": name})
    assert r.status == 409
    assert r.body["error"]["code"] == "conflict"
    assert name in r.body["error"]["message"]


def test_unknown_project_is_404(prod):
    r = prod.client.get("/v1/projects/no-such-project")
    assert r.status == 404
    assert r.body["error"]["code"] == "not_found"


def test_invalid_fields_are_422_naming_the_field(prod):
    c = prod.client
    r = c.post("/v1/projects", {"name": "Bad Name!"})
    assert r.status == 422 and r.body["error"]["details"]["field"] == "name"
    r = c.post("/v1/projects", {"name": unique("p"), "settings": {"version_table": "x; drop"}})
    assert r.status == 422 and r.body["error"]["details"]["field"] == "settings.version_table"
    r = c.post("/v1/projects", {"name": unique("p"), "colour": "blue"})
    assert r.status == 422 and r.body["error"]["details"]["field"] == "colour"
    r = c.post("/v1/projects", {"name": unique("p"), "settings": {"lock_timeout_ms": -1}})
    assert r.status == 422 and r.body["error"]["details"]["field"] == "settings.lock_timeout_ms"


def test_invalid_json_and_wrong_content_type(prod):
    c = prod.client
    r = c.post("/v1/projects", raw=b"{not json", content_type="application/json")
    assert r.status == 422 and r.body["error"]["code"] == "invalid_json"
    r = c.post("/v1/projects", raw=b"name=x", content_type="application/x-www-form-urlencoded")
    assert r.status == 415 and r.body["error"]["code"] == "unsupported_media_type"


def test_every_v1_route_needs_the_token(prod):
    c = prod.client
    r = c.get("/v1/projects", token=None)
    assert r.status == 401 and r.body["error"]["code"] == "unauthorized"
    r = c.get("/v1/projects", token="wrong")
    assert r.status == 401
    assert c.get("/healthz", token=None).body == {"ok": True}


def test_unknown_route_and_method_are_json(prod):
    r = prod.client.get("/v1/nothing-here")
    assert r.status == 404 and r.body["error"]["code"] == "not_found"
    r = prod.client.request("DELETE", "/v1/projects")
    assert r.status == 405 and r.body["error"]["code"] == "method_not_allowed"
