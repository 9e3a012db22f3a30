"""The pipeline commands, run as a pipeline would: a subprocess against a real Retort."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tests.helpers import (
    ROOT,
    TcpProxy,
    chain_bundle,
    free_port,
    register_db,
    revision,
    setup_project,
    unique,
    wait_until,
)

BRANCHED = {
    "versions/a.py": revision("a", None),
    "versions/b.py": revision("b", "a", branch_labels="left"),
    "versions/c.py": revision("c", "a", branch_labels="right"),
}


def cli(
    server,
    *args: str,
    token: str | None = "default",
    url: str | None = None,
    cwd: Path = ROOT,
    timeout: float = 90,
) -> subprocess.CompletedProcess:
    """Run `retort ARGS` with RETORT_URL/RETORT_TOKEN pointing at `server`."""
    out = subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        env=cli_env(server, token, url),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert "Traceback" not in out.stderr + out.stdout, out.stderr
    return out


def cli_env(server, token: str | None = "default", url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETORT_")}
    env["RETORT_URL"] = url or f"http://127.0.0.1:{server.port}"
    if token:
        env["RETORT_TOKEN"] = server.token if token == "default" else token
    return env


def write(root: Path, files: dict[str, str]) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    return root


def versions_only(root: Path, files: dict[str, str]) -> Path:
    """Write a bundle's revision scripts as a bare versions directory."""
    return write(root, {k.removeprefix("versions/"): v for k, v in files.items()})


def test_push_a_versions_directory_twice_is_the_same_bundle(prod, tmp_path):
    project, _ = setup_project(prod.client)
    scripts = versions_only(tmp_path / "revs", chain_bundle(2))

    first = cli(prod, "push", project, str(scripts))
    assert first.returncode == 0, first.stderr
    assert "(new)" in first.stdout and "heads: t002" in first.stdout
    bundle = prod.client.get(f"/v1/projects/{project}/bundles/latest").body
    assert bundle["id"][:12] in first.stdout
    assert [r["id"] for r in bundle["revisions"]] == ["t001", "t002"]

    # Caches and dotfiles are left out: the same scripts make the same bundle.
    write(scripts, {"__pycache__/t001.cpython-311.pyc": "x", ".DS_Store": "x", ".t002.py.swp": "x"})
    again = cli(prod, "push", project, str(scripts), "--json")
    assert again.returncode == 0, again.stderr
    doc = json.loads(again.stdout)
    assert doc["id"] == bundle["id"] and doc["created"] is False
    assert doc["heads"] == ["t002"] and doc["revisions"] == ["t001", "t002"]
    assert "(unchanged)" in cli(prod, "push", project, str(scripts)).stdout

    # The same scripts may serve another project: its push is its own.
    other, _ = setup_project(prod.client)
    out = cli(prod, "push", other, str(scripts))
    assert out.returncode == 0 and "(new)" in out.stdout, out.stdout + out.stderr


def test_push_an_alembic_directory_with_env_py(prod, tmp_path):
    project, _ = setup_project(prod.client)
    alembic = write(
        tmp_path / "alembic",
        {
            "env.py": "# the project's env.py: Retort runs its own\n",
            "script.py.mako": "${upgrades}\n",
            "helpers.py": "NAME = 'x'\n",
            **chain_bundle(3, prefix="e"),
        },
    )
    out = cli(prod, "push", project, str(alembic))
    assert out.returncode == 0, out.stderr
    assert "(new)" in out.stdout and "3 revisions" in out.stdout and "heads: e003" in out.stdout
    bundle = prod.client.get(f"/v1/projects/{project}/bundles/latest").body
    assert bundle["versions_path"] == "versions" and bundle["files"] == 6

    out = cli(prod, "push", project, str(tmp_path / "missing"))
    assert out.returncode == 2


def test_migrate_with_scripts_and_wait_prints_each_step(prod, new_db, tmp_path):
    project, _ = setup_project(prod.client)
    db = register_db(prod.client, project, new_db("sqlite"))
    scripts = write(tmp_path / "alembic", {"env.py": "", **chain_bundle(3)})

    out = cli(prod, "migrate", db, "--scripts", str(scripts), "--wait", "--timeout", "60")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert "(new)" in lines[0]
    steps = [line for line in lines if line.startswith("  applied")]
    assert [s.split()[1] for s in steps] == ["t001", "t002", "t003"], out.stdout
    assert steps[0].startswith("  applied t001 step 1 (") and steps[0].endswith(" ms)")
    assert "succeeded" in lines[-1] and "t003" in lines[-1]
    assert "\r" not in out.stdout  # not a terminal: plain lines only
    job_id = prod.client.get(f"/v1/jobs?database={db}").body["jobs"][0]["id"]

    current = cli(prod, "current", db)
    assert current.returncode == 0, current.stderr
    assert "current   t003" in current.stdout and "up to date" in current.stdout
    doc = json.loads(cli(prod, "current", db, "--json").stdout)
    assert doc["current"] == ["t003"] and doc["pending"] == []

    status = cli(prod, "status", str(job_id))
    assert status.returncode == 0 and "succeeded" in status.stdout
    assert status.stdout.count("applied t00") == 3
    assert json.loads(cli(prod, "status", str(job_id), "--json").stdout)["state"] == "succeeded"

    jobs = cli(prod, "jobs", "--database", db)
    assert jobs.returncode == 0 and jobs.stdout.startswith("JOB")
    row = jobs.stdout.splitlines()[1].split()
    assert row[:3] == [str(job_id), "succeeded", db]
    page = json.loads(cli(prod, "jobs", "--database", db, "--state", "failed", "--json").stdout)
    assert page["jobs"] == []

    # Nothing left to do: a new job succeeds without a step.
    again = cli(prod, "migrate", db, "--wait")
    assert again.returncode == 0 and "applied" not in again.stdout


def test_history_lists_applied_revisions_newest_first(prod, new_db, tmp_path):
    """Needs the server's /v1/databases/{name}/history."""
    c = prod.client
    project, _ = setup_project(c, chain_bundle(2))
    db = register_db(c, project, new_db("sqlite"))
    assert cli(prod, "migrate", db, "--wait").returncode == 0

    out = cli(prod, "history", db)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:4] == ["WHEN", "WHO", "DIRECTION", "REVISIONS"]
    assert "t002" in lines[1] and "t001" in lines[2] and "admin" in lines[1]
    doc = json.loads(cli(prod, "history", db, "--limit", "1", "--json").stdout)
    assert [h["revisions"] for h in doc["history"]] == [["t002"]] and doc["next_cursor"]


def test_migrate_without_wait_then_wait_and_status(prod, new_db):
    c = prod.client
    project, _ = setup_project(c, chain_bundle(2))
    db = register_db(c, project, new_db("sqlite"))

    out = cli(prod, "migrate", db, "--json")
    assert out.returncode == 0, out.stderr
    job = json.loads(out.stdout)
    assert job["database"] == db and job["target"] == "head" and job["action"] == "upgrade"
    assert job["state"] not in ("failed", "cancelled")

    waited = cli(prod, "wait", str(job["id"]), "--json")
    assert waited.returncode == 0, waited.stderr
    final = json.loads(waited.stdout)
    assert final["id"] == job["id"] and final["state"] == "succeeded"
    assert final["to_heads"] == ["t002"] and len(final["steps"]) == 2


def test_a_failing_revision_exits_1_and_names_it(prod, new_db):
    c = prod.client
    files = {
        **chain_bundle(1),
        "versions/t002.py": revision(
            "t002", "t001", "op.execute('INSERT INTO no_such_table VALUES (1)')", message="broken"
        ),
    }
    project, _ = setup_project(c, files)
    db = register_db(c, project, new_db("sqlite"))

    out = cli(prod, "migrate", db, "--wait")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "  applied t001" in out.stdout and "  failed t002 broken" in out.stdout
    assert "revision_failed" in out.stdout and "revision: t002" in out.stdout
    assert "no_such_table" in out.stdout

    job_id = c.get(f"/v1/jobs?database={db}").body["jobs"][0]["id"]
    status = cli(prod, "status", str(job_id))
    assert status.returncode == 1 and "revision: t002" in status.stdout
    assert cli(prod, "current", db).stdout.count("pending   t002") == 1


def test_timeout_exits_4_and_the_job_goes_on(prod, new_db):
    c = prod.client
    slow = {"versions/s1.py": revision("s1", None, "import time; time.sleep(6)")}
    project, _ = setup_project(c, slow)
    db = register_db(c, project, new_db("sqlite"))

    out = cli(prod, "migrate", db, "--wait", "--timeout", "1")
    assert out.returncode == 4, out.stdout + out.stderr
    job_id = c.get(f"/v1/jobs?database={db}").body["jobs"][0]["id"]
    assert f"timed out after 1 s waiting for job {job_id}" in out.stderr
    assert "the job goes on" in out.stderr and f"retort wait {job_id}" in out.stderr

    # The job went on; waiting again follows it to its end.
    done = cli(prod, "wait", str(job_id), "--timeout", "60")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "applied s1" in done.stdout and "succeeded" in done.stdout


def test_multiple_heads_is_refused_with_exit_3(prod, new_db):
    c = prod.client
    project, _ = setup_project(c, BRANCHED)
    db = register_db(c, project, new_db("sqlite"))

    out = cli(prod, "migrate", db)
    assert out.returncode == 3, out.stdout + out.stderr
    assert out.stderr.startswith("error: ") and "(multiple_heads)" in out.stderr
    doc = json.loads(cli(prod, "migrate", db, "--json").stdout)
    assert doc["error"]["code"] == "multiple_heads"
    assert c.get(f"/v1/jobs?database={db}").body["jobs"] == []


def test_request_errors_exit_2(prod):
    out = cli(prod, "migrate", unique("no-such-db"), "--wait")
    assert out.returncode == 2 and "(not_found)" in out.stderr, out.stderr
    assert cli(prod, "status", "987654321").returncode == 2
    out = cli(prod, "jobs", "--state", "bogus", "--json")
    assert out.returncode == 2 and json.loads(out.stdout)["error"]["details"]["field"] == "state"
    assert cli(prod, "migrate", "x", "--bundle", "abc", "--scripts", str(ROOT)).returncode == 2
    assert cli(prod, "migrate", "x", "--action", "sideways").returncode == 2


def test_unreachable_and_bad_token_exit_5(prod, tmp_path):
    closed = f"http://127.0.0.1:{free_port()}"
    out = cli(prod, "jobs", url=closed)
    assert out.returncode == 5 and "cannot reach Retort" in out.stderr, out.stderr
    doc = json.loads(cli(prod, "jobs", "--json", url=closed).stdout)
    assert doc["error"]["code"] == "unreachable"

    out = cli(prod, "jobs", token="not-the-token", cwd=tmp_path)
    assert out.returncode == 5 and "token" in out.stderr, out.stderr
    out = cli(prod, "jobs", token=None, cwd=tmp_path)
    assert out.returncode == 5 and "RETORT_TOKEN" in out.stderr


def test_the_embedded_servers_token_file_is_used(prod, tmp_path):
    write(tmp_path, {"retort-data/admin-token": prod.token + "\n"})
    out = cli(prod, "jobs", "--limit", "1", token=None, cwd=tmp_path)
    assert out.returncode == 0, out.stderr


def test_audit_verify(prod):
    out = cli(prod, "audit", "verify")
    assert out.returncode == 0 and "intact" in out.stdout, out.stdout + out.stderr
    doc = json.loads(cli(prod, "audit", "verify", "--json").stdout)
    assert doc["ok"] is True and doc["first_bad"] is None and doc["events"] > 0


def test_a_repeated_idempotency_key_returns_the_same_job(prod, new_db):
    """Needs the server's Idempotency-Key support on POST /v1/jobs."""
    project, _ = setup_project(prod.client, chain_bundle(1))
    db = register_db(prod.client, project, new_db("sqlite"))
    key = unique("deploy")
    first = json.loads(cli(prod, "migrate", db, "--idempotency-key", key, "--json").stdout)
    second = json.loads(cli(prod, "migrate", db, "--idempotency-key", key, "--json").stdout)
    assert second["id"] == first["id"]


def test_an_identical_pending_job_is_joined(prod, new_db):
    """Needs the server's coalescing (`coalesced_into`) on POST /v1/jobs."""
    c = prod.client
    slow = {"versions/s1.py": revision("s1", None, "import time; time.sleep(3)")}
    project, _ = setup_project(c, slow)
    db = register_db(c, project, new_db("sqlite"))
    running = c.post("/v1/jobs", {"database": db, "target": "head"}).body
    c.wait_state(running["id"], "running")
    pending = c.post("/v1/jobs", {"database": db, "target": "head", "coalesce": False}).body

    out = cli(prod, "migrate", db, "--wait", "--timeout", "60")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"attached to job {pending['id']}, already queued" in out.stdout

    alone = cli(prod, "migrate", db, "--no-coalesce", "--json")
    assert json.loads(alone.stdout)["coalesced_into"] is None


def test_token_create_list_revoke(prod, new_db):
    project, _ = setup_project(prod.client, chain_bundle(1))
    db = register_db(prod.client, project, new_db("sqlite"))
    name = unique("ci-viewer")
    out = cli(prod, "token", "create", name, "--role", "viewer", "--project", project)
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    assert token.startswith("rtk_") and "not shown again" in out.stderr
    listed = cli(prod, "token", "list")
    assert name in listed.stdout and token not in listed.stdout
    assert cli(prod, "jobs", "--database", db, token=token).returncode == 0
    # A viewer may not migrate: refused before anything is queued.
    out = cli(prod, "migrate", db, token=token)
    assert out.returncode == 5 and "deployer" in out.stderr, out.stderr
    token_id = next(
        t["id"]
        for t in json.loads(cli(prod, "token", "list", "--json").stdout)["tokens"]
        if t["name"] == name
    )
    assert cli(prod, "token", "revoke", str(token_id)).returncode == 0
    out = cli(prod, "jobs", token=token)
    assert out.returncode == 5 and "revoked" in out.stderr, out.stderr
    out = cli(prod, "token", "create", unique("x"), "--role", "viewer")
    assert out.returncode == 2 and "--all-projects" in out.stderr


# ---------------------------------------------------------------- hostile surroundings


class FakeServer:
    """An HTTP server in the test process that answers with `answer` and records requests."""

    def __init__(self, answer: Callable[[str, str], tuple[int, dict[str, str], bytes]]):
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def handle_one(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fake.requests.append((self.command, self.path, dict(self.headers)))
                status, headers, body = answer(self.command, self.path)
                self.send_response(status)
                for name, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_DELETE = handle_one

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> FakeServer:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_token_with_a_trailing_newline_works(prod, tmp_path):
    # A Kubernetes secret mounted from a file, or `$(cat token)` in a heredoc.
    for token in (prod.token + "\n", f"  {prod.token}\r\n"):
        out = cli(prod, "jobs", "--limit", "1", "--json", token=token, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert isinstance(json.loads(out.stdout)["jobs"], list)
    out = cli(prod, "jobs", "--limit", "1", "--token", prod.token + "\n", token=None, cwd=tmp_path)
    assert out.returncode == 0, out.stderr

    # One that cannot go in a header at all is a usage error, and it is never echoed.
    broken = prod.token[:4] + "\n" + prod.token[4:]
    out = cli(prod, "jobs", token=broken, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "token (--token/RETORT_TOKEN) has a control character at position 5" in out.stderr
    assert prod.token[4:] not in out.stderr + out.stdout
    out = cli(prod, "jobs", "--json", token="jeton—secret", cwd=tmp_path)
    assert out.returncode == 2
    assert json.loads(out.stdout)["error"]["code"] == "invalid_token"


def test_an_idempotency_key_retort_would_refuse_exits_2_before_anything_is_sent(
    prod, new_db, tmp_path
):
    project, _ = setup_project(prod.client, chain_bundle(1))
    db = register_db(prod.client, project, new_db("sqlite"))
    scripts = write(tmp_path / "alembic", {"env.py": "", **chain_bundle(2)})
    for key in ("déploiement—1", "two words", "k" * 201, ""):
        out = cli(prod, "migrate", db, "--scripts", str(scripts), "--idempotency-key", key)
        assert out.returncode == 2, out.stdout + out.stderr
        assert out.stderr.startswith(f"error: --idempotency-key {key!r} is not 1 to 200 visible")
    out = cli(prod, "migrate", db, "--idempotency-key", "clé", "--json")
    assert out.returncode == 2
    assert json.loads(out.stdout)["error"]["code"] == "invalid_idempotency_key"
    # Nothing was pushed, nothing queued.
    latest = prod.client.get(f"/v1/projects/{project}/bundles/latest").body
    assert [r["id"] for r in latest["revisions"]] == ["t001"]
    assert prod.client.get(f"/v1/jobs?database={db}").body["jobs"] == []
    # The longest key Retort accepts goes through.
    out = cli(prod, "migrate", db, "--idempotency-key", "k" * 200, "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["database"] == db


def test_a_redirect_is_not_followed_and_the_token_goes_nowhere(prod, new_db):
    project, _ = setup_project(prod.client, chain_bundle(1))
    db = register_db(prod.client, project, new_db("sqlite"))
    # The redirect points at Retort itself, through a proxy that counts connections.
    target = TcpProxy(prod.port)
    target.start()
    try:
        with FakeServer(lambda method, path: (301, {"Location": target.url + path}, b"")) as moved:
            # The case of the report: an http -> https redirect of POST /v1/jobs.
            out = cli(prod, "migrate", db, "--wait", url=moved.url)
            assert out.returncode == 2, out.stdout + out.stderr
            assert out.stderr.strip() == (
                f"error: Retort answered with a redirect to {target.url}/v1/jobs: use that URL "
                f"in --url/RETORT_URL; here that is --url {target.url} (redirected)"
            )
            out = cli(prod, "jobs", "--json", url=moved.url)
            assert out.returncode == 2
            error = json.loads(out.stdout)["error"]
            assert error["code"] == "redirected"
            assert error["details"] == {"status": 301, "location": f"{target.url}/v1/jobs?limit=20"}
        # Each request was sent once, to the configured URL only: a redirect is not retried.
        assert [(m, p) for m, p, _ in moved.requests] == [
            ("POST", "/v1/jobs"),
            ("GET", "/v1/jobs?limit=20"),
        ]
        assert moved.requests[0][2]["Authorization"] == f"Bearer {prod.token}"
        assert target.connections == 0  # the redirect's target never heard of the token
    finally:
        target.stop()
    assert prod.client.get(f"/v1/jobs?database={db}").body["jobs"] == []


def test_an_answer_that_is_not_retorts_exits_5(prod, tmp_path):
    def answer(method: str, path: str) -> tuple[int, dict[str, str], bytes]:
        if path.startswith("/v1/jobs"):  # a proxy's sign-in page
            return 200, {"Content-Type": "text/html"}, b"<html><body>Sign in</body></html>"
        return 200, {"Content-Type": "application/json"}, b'{"service": "something else"}'

    with FakeServer(answer) as fake:
        out = cli(prod, "jobs", url=fake.url)
        assert out.returncode == 5, out.stdout + out.stderr
        assert f"{fake.url}/v1/jobs?limit=20 answered HTTP 200 with an HTML page" in out.stderr
        assert "Sign in" in out.stderr and "is --url/RETORT_URL right" in out.stderr
        doc = json.loads(cli(prod, "jobs", "--json", url=fake.url).stdout)
        assert doc["error"]["code"] == "unreachable"

        # JSON, but not Retort's: the last resort says so in one line, exit 5 (never 1).
        out = cli(prod, "current", "billing", url=fake.url)
        assert out.returncode == 5
        assert out.stderr == "error: unexpected KeyError: 'name'\n"
        scripts = versions_only(tmp_path / "revs", chain_bundle(1))
        out = cli(prod, "migrate", "billing", "--scripts", str(scripts), "--json", url=fake.url)
        assert out.returncode == 5
        assert json.loads(out.stdout)["error"] == {
            "code": "unexpected",
            "message": "unexpected KeyError: 'project'",
            "details": {},
        }


def _wait_through_proxy(prod, new_db, sleep_s: int, timeout_s: int):
    """Start `retort wait` on a slow job through a TCP proxy; return (job, proxy, process).

    Returns once the wait is long-polling (its second connection): Retort has answered.
    """
    c = prod.client
    slow = {"versions/s1.py": revision("s1", None, f"import time; time.sleep({sleep_s})")}
    # The lint's rendering would sleep too (up to RETORT_LINT_RENDER_TIMEOUT_S).
    project, _ = setup_project(c, slow, settings={"lint": {"enabled": False}})
    db = register_db(c, project, new_db("sqlite"))
    proxy = TcpProxy(prod.port)
    proxy.start()
    job = c.post("/v1/jobs", {"database": db, "target": "head"}).body
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "wait", str(job["id"]), "--timeout", str(timeout_s)],
        env=cli_env(prod, url=proxy.url),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: proxy.connections >= 2)
    except BaseException:
        proc.kill()
        proxy.stop()
        raise
    return job, proxy, proc


def test_wait_outlasts_an_api_restart(prod, new_db):
    c = prod.client
    job, proxy, proc = _wait_through_proxy(prod, new_db, sleep_s=5, timeout_s=8)
    try:
        proxy.stop()  # the API goes away mid-poll...
        time.sleep(2.5)
        assert proc.poll() is None, proc.communicate()
        proxy.start()  # ...and comes back on the same address
        out, err = proc.communicate(timeout=30)
    finally:
        proxy.stop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out + err
    assert "Traceback" not in err
    assert "applied s1" in out and f"job {job['id']} succeeded" in out
    assert c.get(f"/v1/jobs/{job['id']}").body["state"] == "succeeded"
    lines = err.splitlines()
    assert len(lines) == 2, err  # one line when it is lost, one when it is back
    assert lines[0].startswith(f"lost the connection to Retort (cannot reach Retort at {proxy.url}")
    assert lines[0].endswith("; retrying until the timeout")
    assert lines[1].startswith("connection to Retort back after ")
    # Down for 2.5 s; retried after 1 s, then 2 s more: back at once, not after a long poll.
    assert 2 <= int(lines[1].split()[5]) <= 4, err
    assert lines[1].endswith(f" s; still waiting for job {job['id']}")


def test_wait_times_out_with_4_when_retort_stays_away(prod, new_db):
    c = prod.client
    job, proxy, proc = _wait_through_proxy(prod, new_db, sleep_s=6, timeout_s=3)
    try:
        proxy.stop()  # for good
        started = time.monotonic()
        out, err = proc.communicate(timeout=30)
    finally:
        proxy.stop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Retort answered once, so this is a timeout (the job goes on), not "unreachable".
    assert proc.returncode == 4, out + err
    assert time.monotonic() - started < 4
    assert "lost the connection to Retort" in err
    assert f"timed out after 3 s waiting for job {job['id']}" in err
    assert "Retort unreachable at the end: cannot reach Retort" in err
    assert "the job goes on" in err
    assert c.get(f"/v1/jobs/{job['id']}").body["state"] in ("queued", "running", "succeeded")


def test_wait_fails_fast_when_retort_never_answered(prod):
    closed = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    out = cli(prod, "wait", "1", "--timeout", "60", url=closed)
    assert out.returncode == 5 and "cannot reach Retort" in out.stderr, out.stderr
    assert "lost the connection" not in out.stderr
    assert time.monotonic() - started < 10
