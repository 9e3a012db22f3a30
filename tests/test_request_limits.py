"""What a hostile client may cost the API (issue 16): bounded refusals, bodies and slots.

One `retort api` of its own (one gunicorn process, 16 threads, no worker: jobs
stay queued), with short limits: a body must arrive within 3 s, a token holds
at most 6 requests and 3 long polls or event streams, and unauthenticated
refusals are audited once per source per 2 s.

Every socket a test opens is closed when the test ends, passed or failed (a
`with` or an ExitStack): one left to the garbage collector is reported as a
ResourceWarning in whichever test runs when it is collected, often another file's.
Timings are checked against what the test itself observed (the order of
answers, the longest silence of a trickling client), not against how fast a
loaded machine happens to be.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import select
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, closing
from types import SimpleNamespace

import pytest
from cryptography.fernet import Fernet

from tests.conftest import REDIS, RUN_ID, _base_env, subprocess_run
from tests.helpers import (
    Retort,
    chain_bundle,
    free_port,
    make_tar,
    register_db,
    revision,
    setup_project,
    unique,
)

BODY_TIMEOUT_S = 3
MAX_REQUESTS = 6
MAX_STREAMS = 3
WINDOW_S = 2


@pytest.fixture(scope="module")
def api(backends, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("limits")
    port = free_port()
    env = _base_env(data_dir)
    env.update(
        {
            "RETORT_DATABASE_URL": backends.new("postgresql"),
            "RETORT_BROKER_URL": REDIS,
            "RETORT_QUEUE": f"retort-limits-{RUN_ID}",
            "RETORT_PORT": str(port),
            "RETORT_SECRET_KEY": Fernet.generate_key().decode(),
            "RETORT_API_PROCESSES": "1",
            "RETORT_API_THREADS": "16",
            "RETORT_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
            "RETORT_MAX_REQUESTS_PER_TOKEN": str(MAX_REQUESTS),
            "RETORT_MAX_STREAMS_PER_TOKEN": str(MAX_STREAMS),
            "RETORT_REFUSAL_AUDIT_WINDOW_S": str(WINDOW_S),
        }
    )
    server = Retort(env, port, env["RETORT_ADMIN_TOKEN"], data_dir)
    try:
        subprocess_run([sys.executable, "-m", "service.cli", "db", "upgrade"], env)
        server.spawn("api", [sys.executable, "-m", "service.cli", "api", "--port", str(port)])
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _token(c, role: str, projects) -> str:
    r = c.post("/v1/tokens", {"name": unique(f"{role}-tok"), "role": role, "projects": projects})
    assert r.status == 201, r
    return r.body["token"]


def _refusals(c) -> list[dict]:
    events = c.get("/v1/audit?limit=1000").body["events"]
    return [e for e in events if e["action"] == "request.refused"]


def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _head(method: str, path: str, token: str | None, **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: retort"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _response(sock: socket.socket, timeout: float = 30) -> tuple[int, dict, dict | None]:
    """Read one HTTP/1.1 answer with a Content-Length: (status, headers, JSON body)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        if not more:
            raise ConnectionError(f"closed before an answer: {data!r}")
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    length = int(headers.get("content-length", 0))
    while len(body) < length:
        more = sock.recv(65536)
        if not more:
            break
        body += more
    return int(status_line.split()[1]), headers, json.loads(body) if body else None


def _answered(socks: list[socket.socket]) -> list[socket.socket]:
    """Those of `socks` with something to read right now: an answer, or the connection's end."""
    poller = select.poll()  # not select.select(): a long session's descriptors pass 1024
    for sock in socks:
        poller.register(sock, select.POLLIN)
    ready = {fd for fd, _ in poller.poll(0)}
    return [sock for sock in socks if sock.fileno() in ready]


def _closed(sock: socket.socket, timeout: float = 5) -> bool:
    """Whether the server ends the connection: nothing more to read, or a reset."""
    sock.settimeout(timeout)
    try:
        return sock.recv(100) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def test_unauthenticated_refusals_are_counted_and_audited_once_per_window(api):
    c = api.client
    path = "/v1/projects/" + "x" * 3900 + "/bundles"
    body = b"{}"
    # From an address of its own: its events are this test's only.
    statuses = []
    began = time.monotonic()
    with closing(
        http.client.HTTPConnection(
            "127.0.0.1", api.port, timeout=30, source_address=("127.0.0.2", 0)
        )
    ) as conn:
        for i in range(200):
            headers = {"Content-Type": "application/json"}
            if i % 2:
                headers["Authorization"] = "Bearer rtk_1_" + "x" * 40  # a token that is not valid
            conn.request("POST", path, body=body, headers=headers)
            with conn.getresponse() as resp:
                resp.read()
                statuses.append(resp.status)
    took = time.monotonic() - began
    assert set(statuses) == {401}

    def mine() -> list[dict]:
        return [e for e in _refusals(c) if e["data"].get("source") == "127.0.0.2"]

    deadline = time.monotonic() + 15
    while sum(e["data"]["count"] for e in mine()) < 200:
        assert time.monotonic() < deadline, mine()
        time.sleep(0.3)
    time.sleep(WINDOW_S + 0.5)  # nothing more comes
    events = mine()
    # The first at once, then one per window the refusals spanned: a handful, not 200
    # (however long a loaded machine took to send them).
    assert 1 <= len(events) <= 2 + took / WINDOW_S, (took, events)
    assert sum(e["data"]["count"] for e in events) == 200
    for e in events:
        assert e["actor"] == "anonymous" and e["data"]["status"] == 401
        assert len(e["data"]["path"]) <= 200 and e["data"]["window_s"] == WINDOW_S
    assert c.get("/v1/audit/verify").body["ok"] is True
    logs = api.logs()
    assert "unauthenticated request(s) from 127.0.0.2" in logs


def test_authenticated_refused_writes_stay_individual(api):
    c = api.client
    project, _ = setup_project(c)
    name = unique("viewer-tok")
    r = c.post("/v1/tokens", {"name": name, "role": "viewer", "projects": [project]})
    viewer = r.body["token"]
    for _ in range(3):
        r = c.post("/v1/projects", {"name": unique("p"), "settings": {}}, token=viewer)
        assert r.status == 403, r
    mine = [e for e in _refusals(c) if e["actor"] == name]
    assert len(mine) == 3, mine
    for e in mine:
        assert e["data"]["path"] == "/v1/projects" and e["data"]["status"] == 403
        assert "count" not in e["data"] and "source" not in e["data"]


def test_deep_json_is_refused_without_a_crash(api):
    c = api.client
    for raw in ("[" * 5000 + "]" * 5000, '{"a":' * 5000 + "1" + "}" * 5000):
        r = c.post("/v1/projects", raw=raw.encode(), content_type="application/json")
        assert r.status == 422 and r.body["error"]["code"] == "json_too_deep", r
        assert r.body["error"]["details"]["max_depth"] == 32
    # The limit is 32 levels: 32 is validated as usual, 33 is too deep.
    for depth, code in ((32, "invalid"), (33, "json_too_deep")):
        nested = "[" * (depth - 2) + "]" * (depth - 2)
        raw = '{"name": "deep", "settings": {"naming_convention": ' + nested + "}}"
        r = c.post("/v1/projects", raw=raw.encode(), content_type="application/json")
        assert r.status == 422 and r.body["error"]["code"] == code, (depth, r)
    # Brackets and escaped quotes inside strings do not count.
    name = '\\"' + "[" * 100 + "{" * 100
    raw = '{"name": "' + name + '", "settings": {}}'
    r = c.post("/v1/projects", raw=raw.encode(), content_type="application/json")
    assert r.status == 422 and r.body["error"]["code"] == "invalid", r
    assert r.body["error"]["details"]["field"] == "name"
    # Refused writes of an authenticated token are audited, as any other.
    refused = [e for e in _refusals(c) if e["data"]["code"] == "json_too_deep"]
    assert len(refused) >= 3


def _chunked(port: int, path: str, content_type: str, parts, token: str) -> tuple[int, dict]:
    """POST `parts` chunked; the answer, read even if the server cut the upload short.

    A body refused part way (413) is drained only while it keeps coming: a
    client the machine slows down may find its connection closed before it sent
    the rest. The answer was sent first and is still there to read (http.client
    would raise on the send instead).
    """
    head = _head("POST", path, token, Content_Type=content_type, Transfer_Encoding="chunked")
    with _connect(port) as sock:
        sock.sendall(head)
        try:
            for part in parts:
                sock.sendall(b"%X\r\n%b\r\n" % (len(part), part))
            sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        status, _, body = _response(sock)
    return status, body


def test_chunked_bodies_count_against_the_same_limits(api):
    c = api.client
    name = unique("chunked")
    # Under the limit: a chunked JSON body is read as any other.
    doc = json.dumps({"name": name, "settings": {}}).encode()
    status, body = _chunked(
        api.port, "/v1/projects", "application/json", [doc[:5], doc[5:]], api.token
    )
    assert status == 201 and body["name"] == name, body
    # 1.5 MiB of JSON without a Content-Length: 413 once 1 MiB + 1 byte is read.
    filler = json.dumps({"name": unique("big"), "settings": {}, "x": "a" * (1536 * 1024)}).encode()
    parts = [filler[i : i + 65536] for i in range(0, len(filler), 65536)]
    status, body = _chunked(api.port, "/v1/projects", "application/json", parts, api.token)
    assert status == 413 and body["error"]["code"] == "payload_too_large", body
    assert body["error"]["details"]["limit_bytes"] == 1024 * 1024
    # A bundle keeps its own, larger limit, chunked too: 1.5 MiB that gzip cannot shrink.
    files = {**chain_bundle(1), "versions/blob.bin": os.urandom(1536 * 1024)}
    archive = make_tar(files)
    assert len(archive) > 1024 * 1024
    parts = [archive[i : i + 65536] for i in range(0, len(archive), 65536)]
    path = f"/v1/projects/{name}/bundles"
    status, body = _chunked(api.port, path, "application/gzip", parts, api.token)
    assert status == 201, body
    # A chunked encoding that cannot be read is the client's error, not a 500.
    head = _head(
        "POST",
        "/v1/projects",
        api.token,
        Content_Type="application/json",
        Transfer_Encoding="chunked",
    )
    with _connect(api.port) as sock:
        sock.sendall(head + b"zz\r\n{}\r\n0\r\n\r\n")
        status, _, body = _response(sock, timeout=10)
    assert status == 400 and body["error"]["code"] == "malformed_body", body
    assert c.get("/v1/projects").status == 200


def test_slow_bodies_get_408_and_do_not_hold_other_tokens_out(api):
    c = api.client
    project, _ = setup_project(c, chain_bundle(1))
    viewer = _token(c, "viewer", [project])
    deployer = _token(c, "deployer", [project])
    slow_head = _head(
        "POST",
        "/v1/projects",
        api.token,
        Content_Type="application/json",
        Content_Length="100000",
    )
    jobs_head = _head(
        "POST", "/v1/jobs", deployer, Content_Type="application/json", Content_Length="100000"
    )
    stop = threading.Event()
    sends: list[float] = []  # when the trickler sent something

    with ExitStack() as stack:
        sent = time.monotonic()
        slow = []
        for _ in range(24):  # more than the server's 16 threads, all the admin token's
            sock = stack.enter_context(_connect(api.port))
            sock.sendall(slow_head + b"{")
            slow.append(sock)
        anonymous = []
        for _ in range(4):
            sock = stack.enter_context(_connect(api.port))
            sock.sendall(_head("POST", "/v1/projects", None, Content_Length="100000") + b"{")
            anonymous.append(sock)
        # The deployer's one request sends a byte every 0.3 s until it is answered: the
        # deadline is on the whole body (a timeout per read would never answer it).
        trickler = stack.enter_context(_connect(api.port))
        trickler.sendall(jobs_head + b"{")
        sends.append(time.monotonic())

        def trickle():
            while not stop.wait(0.3):
                try:
                    trickler.sendall(b" ")
                except OSError:  # answered, and the connection closed
                    return
                sends.append(time.monotonic())

        trickling = threading.Thread(target=trickle, daemon=True)
        trickling.start()
        stack.callback(trickling.join)  # before the sockets close (an ExitStack unwinds LIFO)
        stack.callback(stop.set)

        # No token: refused at once, body unread. These connections came after every
        # slow one, so the server has taken all of those up by now.
        for sock in anonymous:
            status, _, body = _response(sock, timeout=10)
            assert status == 401, body
        # Another token is served meanwhile: every read below is answered while the
        # admin token's slow bodies still hold their threads (checked after the reads).
        for _ in range(5):
            r = c.get("/v1/projects", token=viewer)
            assert r.status == 200, r
        reads_took = time.monotonic() - sent
        answered = set(_answered(slow))
        still_waiting = {sock for sock in slow if sock not in answered}

        def answer(sock):
            status, headers, body = _response(sock, timeout=BODY_TIMEOUT_S + 10)
            return status, time.monotonic() - sent, headers, body, sock

        def answer_trickler():
            try:
                return _response(trickler, timeout=BODY_TIMEOUT_S + 10), time.monotonic()
            finally:
                stop.set()

        with ThreadPoolExecutor(len(slow) + 1) as pool:
            trickled_future = pool.submit(answer_trickler)
            answers = list(pool.map(answer, slow))
            trickled, trickled_at = trickled_future.result()
        trickling.join()
        # And its connection was closed after the answer: nothing more is read from it.
        assert _closed(trickler)

    timed_out = [a for a in answers if a[0] == 408]
    over_cap = [a for a in answers if a[0] == 429]
    assert len(timed_out) + len(over_cap) == len(slow), [a[0] for a in answers]
    # The token's share of the process: 6 read their bodies until the deadline,
    # the rest were told to come back.
    assert 1 <= len(timed_out) <= MAX_REQUESTS, [a[0] for a in answers]
    for _, after, _, body, sock in timed_out:
        assert body["error"]["code"] == "body_timeout", body
        assert BODY_TIMEOUT_S - 0.1 < after < BODY_TIMEOUT_S + 5, after
        # Still waiting for its body when the other token's reads were all answered:
        # those did not wait for a slow body's thread.
        assert sock in still_waiting, (
            f"a slow body was answered before the other token's reads ended "
            f"({reads_took:.2f} s after the slow bodies were sent)"
        )
    for _, _, headers, body, _ in over_cap:
        assert body["error"]["code"] == "too_many_requests" and headers["retry-after"], body
        assert set(body["error"]) == {"code", "message", "details"}

    assert trickled[0] == 408 and trickled[2]["error"]["code"] == "body_timeout", trickled
    # Not before the deadline from its own start, nor much after it...
    took = trickled_at - sends[0]
    assert BODY_TIMEOUT_S - 0.1 < took < BODY_TIMEOUT_S + 5, took
    # ...and never after a silence as long as a read's timeout: only a deadline on the
    # whole body could have answered it.
    before = [t for t in sends if t < trickled_at] + [trickled_at]
    silence = max(b - a for a, b in itertools.pairwise(before))
    assert silence < BODY_TIMEOUT_S - 0.5, f"the trickle stalled {silence:.2f} s: inconclusive"
    # The capped token's slots came back with its answers; the other token is served as before.
    assert c.get("/v1/projects").status == 200
    assert c.get("/v1/projects", token=viewer).status == 200


def test_one_tokens_streams_cannot_take_every_waiting_slot(api, new_db):
    c = api.client
    project, _ = setup_project(c, {"versions/a.py": revision("a", None)})
    db = register_db(c, project, new_db("sqlite"))
    job = c.post("/v1/jobs", {"database": db}).body  # no worker: it stays queued
    assert job["state"] == "queued", job
    greedy = _token(c, "viewer", [project])
    other = _token(c, "viewer", [project])
    events = f"/v1/jobs/{job['id']}/events"
    with ExitStack() as stack:
        for _ in range(MAX_STREAMS):
            sock = stack.enter_context(_connect(api.port))
            sock.sendall(_head("GET", events, greedy))
            sock.settimeout(10)
            first = sock.recv(65536)
            assert first.startswith(b"HTTP/1.1 200") and b"text/event-stream" in first, first
        # One more stream, or a long poll, of the same token: 429, come back later.
        for path in (events, f"/v1/jobs/{job['id']}?wait=5"):
            r = c.get(path, token=greedy)
            assert r.status == 429 and r.body["error"]["code"] == "too_many_streams", r
            assert int(r.headers["Retry-After"]) >= 1
        # Short reads of that token still work.
        assert c.get(f"/v1/jobs/{job['id']}", token=greedy).status == 200
        # Another token's long poll is held as usual.
        started = time.monotonic()
        r = c.get(f"/v1/jobs/{job['id']}?wait=1", token=other)
        held = time.monotonic() - started
        assert r.status == 200 and "Retry-After" not in r.headers, r
        assert 0.8 < held < 5, held


def test_nothing_above_was_a_server_error(api):
    logs = api.logs()
    assert "Traceback" not in logs and "unhandled error" not in logs, logs[-5000:]
    assert '" 500 ' not in logs


def test_the_refusal_counts_stay_bounded_and_add_up():
    from service import limits

    # The windows run on a clock of the test's own: they close when it moves the
    # clock on, however long a loaded machine takes over the notes in between.
    now = [0.0]
    written: list[dict] = []
    agg = limits.RefusalAggregator(0.2, written.append, clock=lambda: now[0])
    event = limits.refusal_event("POST", "/v1/" + "x" * 5000, 401, "unauthorized", "no")
    assert len(event["path"]) == limits.PATH_CHARS
    sources = [f"10.0.{i // 250}.{i % 250}" for i in range(limits.MAX_SOURCES + 500)]
    for _ in range(3):
        for source in sources:
            agg.note(source, event)
    agg.note("10.9.9.9", None)  # a refused read: counted, not audited
    assert agg.total == 3 * len(sources) + 1
    assert len(agg._sources) <= limits.MAX_SOURCES + 1
    # One event at once per tracked source (and one for all the others together).
    assert len(written) == limits.MAX_SOURCES + 1
    now[0] += 1  # the windows close: one event each for what they counted since
    deadline = time.monotonic() + 10
    while sum(e["count"] for e in written) < 3 * len(sources):
        assert time.monotonic() < deadline, sum(e["count"] for e in written)
        time.sleep(0.05)
    assert sum(e["count"] for e in written) == 3 * len(sources)
    assert len(written) == 2 * (limits.MAX_SOURCES + 1)
    assert {e["source"] for e in written} == set(sources[: limits.MAX_SOURCES]) | {"*"}
    # Quiet sources are forgotten once their next window closes with nothing in it.
    now[0] += 1
    deadline = time.monotonic() + 10
    while agg._sources:
        assert time.monotonic() < deadline, len(agg._sources)
        time.sleep(0.05)
    assert len(written) == 2 * (limits.MAX_SOURCES + 1)


def test_slots_are_per_key_and_given_back_when_the_answer_ends():
    """The accounting behind the 429s, in one process: keyed, capped, always given back."""
    from flask import Flask, Response, g

    from service import limits
    from service.errors import InvalidError, ServiceError

    config = SimpleNamespace(
        body_timeout_s=5,
        max_requests_per_token=2,
        max_streams_per_token=1,
        refusal_audit_window_s=60,
    )
    state = limits.RequestLimits(config, lambda data: None)
    app = Flask(__name__)

    @app.get("/<key>")
    def held(key):
        limits.hold_request(key)
        return {"held": state.requests.held(key)}

    @app.get("/fails/<key>")
    def fails(key):
        limits.hold_request(key)
        raise InvalidError("no")

    @app.get("/stream/<digest>")
    def stream(digest):
        limits.hold_request(f"token:{digest}")
        g.token_digest = digest
        limits.hold_stream()  # never given back by the view: the answer's end does it

        def chunks():
            yield b"a"
            yield b"b"

        return Response(chunks())

    @app.errorhandler(ServiceError)
    def refused(exc):
        return exc.to_dict(), exc.status, exc.headers

    app.wsgi_app = state.wrap(app.wsgi_app)
    client = app.test_client()
    # Held while an answer is open (buffered=False: not closed before it is read).
    first = client.get("/token:a", buffered=False)
    second = client.get("/token:a", buffered=False)
    assert first.json["held"] == 1 and second.json["held"] == 2
    with client.get("/token:a") as over:
        assert over.status_code == 429 and over.headers["Retry-After"] == "1", over.json
        assert over.json["error"]["code"] == "too_many_requests"
    with client.get("/token:b") as other:  # another key counts apart
        assert other.status_code == 200 and other.json["held"] == 1
    assert state.requests.held("token:a") == 2 and state.requests.held("token:b") == 0
    first.close()
    assert state.requests.held("token:a") == 1
    second.close()
    # Refused after taking one, or streamed: given back all the same.
    with client.get("/fails/token:a") as failed:
        assert failed.status_code == 422
    streamed = client.get("/stream/a", buffered=False)
    assert state.requests.held("token:a") == 1 and state.streams.held("token:a") == 1
    with client.get("/stream/a") as again:  # the one stream slot is taken
        assert again.status_code == 429 and again.json["error"]["code"] == "too_many_streams"
    assert streamed.get_data() == b"ab"
    streamed.close()
    assert state.requests._held == {} and state.streams._held == {}


def test_the_depth_scan_counts_brackets_outside_strings_only():
    from service.limits import json_too_deep

    assert json_too_deep("[" * 33 + "]" * 33, 32)
    assert not json_too_deep("[" * 32 + "]" * 32, 32)
    assert not json_too_deep(json.dumps({"a": "[" * 1000, "b": '\\"{' * 1000}), 32)
    assert json_too_deep('{"a": "\\\\"' + ", " + "[" * 40, 32)  # the string ends at \\"
    assert not json_too_deep("[]" * 100_000, 32)
