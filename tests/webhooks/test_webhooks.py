"""Webhooks: signed deliveries to a real local receiver, retried until it answers."""

import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.helpers import (
    chain_bundle,
    free_port,
    make_tar,
    register_db,
    revision,
    setup_project,
)

SECRET = "s3cret-for-tests-0123456789"


class Receiver:
    """A real HTTP server in this process that records what it is sent."""

    def __init__(self, port: int = 0, status: int = 204):
        self.requests: list[dict] = []
        self.status = status
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append({"headers": dict(self.headers), "body": body})
                self.send_response(receiver.status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/retort"

    def events(self) -> list[str]:
        return [r["headers"]["Retort-Event"] for r in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def verify(secret: str, headers: dict, body: bytes, tolerance_s: int = 300) -> dict:
    """What a receiver does (the README's snippet): check the signature, then trust the body."""
    timestamp = headers["Retort-Timestamp"]
    if abs(time.time() - int(timestamp)) > tolerance_s:
        raise ValueError("stale delivery")
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    if not hmac.compare_digest("v1=" + expected.hexdigest(), headers["Retort-Signature"]):
        raise ValueError("bad signature")
    return json.loads(body)


def _until(check, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout}s: {check}")
        time.sleep(0.1)


def _hook(c, project: str, url: str, events: list[str], secret: str | None = SECRET) -> dict:
    body = {"url": url, "events": events}
    if secret:
        body["secret"] = secret
    r = c.post(f"/v1/projects/{project}/webhooks", body)
    assert r.status == 201, r
    return r.body


def test_signed_deliveries_for_started_succeeded_and_failed(retort, new_db):
    c = retort.client
    receiver = Receiver()
    try:
        project, _ = setup_project(c, chain_bundle(2))
        hook = _hook(c, project, receiver.url, ["job.started", "job.succeeded", "job.failed"])
        assert hook["secret"] == SECRET and hook["events"] == sorted(hook["events"])
        listed = c.get(f"/v1/projects/{project}/webhooks").body["webhooks"]
        assert [h["id"] for h in listed] == [hook["id"]] and "secret" not in listed[0]
        db = register_db(c, project, new_db("sqlite"))
        job = c.post("/v1/jobs", {"database": db}).body
        assert c.wait_job(job["id"])["state"] == "succeeded"
        _until(lambda: len(receiver.requests) >= 2)
        assert sorted(receiver.events()) == ["job.started", "job.succeeded"]
        for req in receiver.requests:
            payload = verify(SECRET, req["headers"], req["body"])
            assert payload["event"] == req["headers"]["Retort-Event"]
            assert payload["id"] == req["headers"]["Retort-Delivery"]
            assert payload["job"]["id"] == job["id"] and payload["job"]["database"] == db
            assert req["headers"]["Content-Type"] == "application/json"
        done = next(r for r in receiver.requests if r["headers"]["Retort-Event"] == "job.succeeded")
        assert json.loads(done["body"])["job"]["state"] == "succeeded"
        # A forged body does not pass the check a receiver makes.
        forged = done["body"].replace(b"succeeded", b"failed")
        try:
            verify(SECRET, done["headers"], forged)
            raise AssertionError("a forged body verified")
        except ValueError:
            pass

        # A failing migration is reported too, with its error.
        bad = {"versions/x.py": revision("x", None, "op.execute('SELECT * FROM nowhere')")}
        r = c.post(
            f"/v1/projects/{project}/bundles",
            raw=make_tar(bad),
            content_type="application/gzip",
        )
        db2 = register_db(c, project, new_db("sqlite"))
        failed = c.post("/v1/jobs", {"database": db2, "bundle": r.body["id"]}).body
        assert c.wait_job(failed["id"])["state"] == "failed"
        _until(lambda: "job.failed" in receiver.events())
        req = next(r for r in receiver.requests if r["headers"]["Retort-Event"] == "job.failed")
        payload = verify(SECRET, req["headers"], req["body"])
        assert payload["job"]["error"]["revision"] == "x"

        path = f"/v1/projects/{project}/webhooks/{hook['id']}/deliveries"

        def all_recorded():
            # The receiver answers before the worker records the answer.
            found = c.get(path).body["deliveries"]
            return found if all(d["state"] != "pending" for d in found) else None

        deliveries = _until(all_recorded)
        assert len(deliveries) == 4  # started, succeeded; started, failed
        for d in deliveries:
            assert d["state"] == "delivered" and d["status_code"] == 204 and d["attempts"] == 1
            assert d["attempt_log"] == [
                {**d["attempt_log"][0], "attempt": 1, "status_code": 204, "error": None}
            ]
    finally:
        receiver.close()


def test_a_receiver_that_is_down_is_retried_and_never_fails_a_migration(prod, new_db):
    c = prod.client
    port = free_port()  # nothing listens here yet
    project, _ = setup_project(c, chain_bundle(1))
    hook = _hook(c, project, f"http://127.0.0.1:{port}/h", ["job.succeeded"], secret=None)
    secret = hook["secret"]
    assert secret.startswith("whsec_")
    db = register_db(c, project, new_db("sqlite"))
    job = c.post("/v1/jobs", {"database": db}).body
    assert c.wait_job(job["id"])["state"] == "succeeded"
    path = f"/v1/projects/{project}/webhooks/{hook['id']}/deliveries"

    def failed_twice():
        d = c.get(path).body["deliveries"]
        return d and d[0]["attempts"] >= 2 and d

    (pending,) = _until(failed_twice)
    assert pending["state"] == "pending" and pending["status_code"] is None
    assert "Connection" in pending["error"] or "refused" in pending["error"], pending
    assert pending["next_attempt_at"] is not None

    # The receiver comes back, first answering 500, then 200.
    receiver = Receiver(port, status=500)
    try:
        _until(lambda: receiver.requests)
        receiver.status = 200
        (delivered,) = _until(
            lambda: [d for d in c.get(path).body["deliveries"] if d["state"] == "delivered"]
        )
        assert delivered["status_code"] == 200
        codes = [a["status_code"] for a in delivered["attempt_log"]]
        numbers = [a["attempt"] for a in delivered["attempt_log"]]
        assert numbers == list(range(1, delivered["attempts"] + 1))
        assert codes[0] is None and 500 in codes and codes[-1] == 200, delivered["attempt_log"]
        # Every attempt carried the same delivery id, for the receiver to drop repeats.
        assert {r["headers"]["Retort-Delivery"] for r in receiver.requests} == {delivered["uid"]}
        verify(secret, receiver.requests[-1]["headers"], receiver.requests[-1]["body"])
    finally:
        receiver.close()


def test_webhook_requests_are_checked(prod):
    c = prod.client
    project, _ = setup_project(c)
    path = f"/v1/projects/{project}/webhooks"
    r = c.post(path, {"url": "ftp://example.com/x", "events": ["job.failed"]})
    assert r.status == 422 and r.body["error"]["details"]["field"] == "url"
    r = c.post(path, {"url": "https://user:pw@example.com/x", "events": ["job.failed"]})
    assert r.status == 422 and "credentials" in r.body["error"]["message"]
    r = c.post(path, {"url": "https://example.com/x", "events": ["job.exploded"]})
    assert r.status == 422 and r.body["error"]["details"]["field"].startswith("events")
    r = c.post(path, {"url": "https://example.com/x", "events": []})
    assert r.status == 422
    r = c.post(path, {"url": "https://example.com/x", "events": ["job.failed"], "secret": "short"})
    assert r.status == 422 and r.body["error"]["details"]["field"] == "secret"
    r = c.post(path, {"url": "https://example.com/x", "events": ["job.failed"], "extra": 1})
    assert r.status == 422
    r = c.post(
        "/v1/projects/nope/webhooks", {"url": "https://example.com", "events": ["job.failed"]}
    )
    assert r.status == 404
    hook = _hook(c, project, "https://example.com/x", ["job.failed"])
    assert c.get(f"{path}/{hook['id']}/deliveries").body == {"deliveries": [], "next_cursor": None}
    assert c.request("DELETE", f"{path}/{hook['id']}").status == 204
    assert c.get(f"{path}/{hook['id']}").status == 404
    assert c.get(f"{path}/999999/deliveries").status == 404
