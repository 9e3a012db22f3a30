"""The management commands (projects, databases, bundles, cancel, unlock, repair) and what
every command shares (--version, usage errors, a closed pipe, the outcome line), run as a
subprocess against a real Retort."""

from __future__ import annotations

import importlib.metadata
import json
import os
import pty
import re
import subprocess
import sys

from tests.cli.test_cli import cli_env
from tests.helpers import (
    ROOT,
    chain_bundle,
    free_port,
    make_tar,
    register_db,
    revision,
    run_job,
    setup_project,
    unique,
)

RETORT = [sys.executable, "-m", "service.cli"]


def retort(
    server, *args: str, url: str | None = None, stdin=subprocess.DEVNULL, timeout: float = 90
) -> subprocess.CompletedProcess:
    """Run `retort ARGS` against `server`, with no terminal on standard input."""
    out = subprocess.run(
        [*RETORT, *args],
        env=cli_env(server, url=url),
        cwd=ROOT,
        stdin=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert "Traceback" not in out.stderr + out.stdout, out.stderr
    return out


def push_bundle(client, project: str, files: dict[str, str]) -> dict:
    r = client.post(
        f"/v1/projects/{project}/bundles", raw=make_tar(files), content_type="application/gzip"
    )
    assert r.status in (200, 201), r
    return r.body


# ---------------------------------------------------------------- projects


def test_project_create_show_list_and_set(prod, tmp_path):
    c = prod.client
    name = unique("proj")
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"lock_timeout_ms": 1000, "version_table": "from_file"}))

    out = retort(
        prod,
        "project",
        "create",
        name,
        "--settings-file",
        str(settings),
        "--setting",
        "lock_timeout_ms=5000",  # overrides the file's
        "--setting",
        'env={"TZ": "UTC"}',
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"project {name} created"), out.stdout
    stored = c.get(f"/v1/projects/{name}").body["settings"]
    assert stored["lock_timeout_ms"] == 5000 and stored["version_table"] == "from_file"
    assert stored["env"] == {"TZ": "UTC"}

    again = retort(prod, "project", "create", name)
    assert again.returncode == 2 and "already exists" in again.stderr, again.stderr

    show = retort(prod, "project", "show", name)
    assert show.returncode == 0, show.stderr
    lines = show.stdout.splitlines()
    assert lines[0].startswith(f"project   {name} (created ")
    assert re.search(r"^  lock_timeout_ms +5000$", show.stdout, re.M), show.stdout
    assert re.search(r'^  version_table +"from_file"$', show.stdout, re.M), show.stdout
    assert lines[-1] == "secret variables: none"
    assert json.loads(retort(prod, "project", "show", name, "--json").stdout)["settings"] == (
        stored
    )

    listed = retort(prod, "project", "list")
    assert listed.returncode == 0 and listed.stdout.startswith("NAME"), listed.stderr
    assert name in [line.split()[0] for line in listed.stdout.splitlines()[1:]]
    page = json.loads(retort(prod, "project", "list", "--json").stdout)
    assert name in [p["name"] for p in page["projects"]]

    # A value is JSON, else a plain string; --reset restores the default.
    out = retort(
        prod,
        "project",
        "set",
        name,
        "statement_timeout_ms=60000",
        "version_table=app_version",
        "--reset",
        "lock_timeout_ms",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        f"project {name} updated:",
        "  lock_timeout_ms = null (its default)",
        "  statement_timeout_ms = 60000",
        '  version_table = "app_version"',
    ]
    stored = c.get(f"/v1/projects/{name}").body["settings"]
    assert stored["statement_timeout_ms"] == 60000 and stored["version_table"] == "app_version"
    assert stored["lock_timeout_ms"] is None and stored["env"] == {"TZ": "UTC"}

    doc = json.loads(retort(prod, "project", "set", name, "max_duration_s=90", "--json").stdout)
    assert doc["settings"]["max_duration_s"] == 90

    # Retort's refusal (a 422 naming the setting) is a request error.
    bad = retort(prod, "project", "set", name, "lock_timeout_ms=-1")
    assert bad.returncode == 2 and "lock_timeout_ms" in bad.stderr, bad.stderr
    missing = retort(prod, "project", "show", unique("no-such-project"))
    assert missing.returncode == 2 and "(not_found)" in missing.stderr, missing.stderr


# ---------------------------------------------------------------- databases


def test_database_add_list_and_show(prod, new_db):
    project, _ = setup_project(prod.client, chain_bundle(2))
    name = unique("db")

    out = retort(
        prod,
        "database",
        "add",
        name,
        "--project",
        project,
        "--url",  # the target's: Retort's is --retort-url here (RETORT_URL in this test)
        new_db("sqlite"),
        "--tag",
        "env=test",
        "--tag",
        "team=core",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"database {name} registered: sqlite, project {project}, ")
    assert "tags env=test, team=core" in out.stdout
    stored = prod.client.get(f"/v1/databases/{name}?live=false").body
    assert stored["tags"] == {"env": "test", "team": "core"}

    listed = retort(prod, "database", "list", "--project", project)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["NAME", "PROJECT", "DIALECT", "TAGS", "URL"]
    assert lines[1].split()[:3] == [name, project, "sqlite"] and len(lines) == 2
    tagged = retort(prod, "database", "list", "--project", project, "--tag", "team=core")
    assert name in tagged.stdout
    other = retort(prod, "database", "list", "--project", project, "--tag", "team=other")
    assert other.returncode == 0 and other.stdout.strip() == "no databases"
    page = json.loads(retort(prod, "database", "list", "--tag", "team", "--json").stdout)
    assert name in [d["name"] for d in page["databases"]]

    show = retort(prod, "database", "show", name)
    assert show.returncode == 0, show.stderr
    assert f"database  {name} (sqlite, project {project})" in show.stdout
    assert "tags      env=test, team=core" in show.stdout
    assert "current   base (nothing applied)" in show.stdout
    assert "pending   t001, t002" in show.stdout and "lock      free" in show.stdout
    doc = json.loads(retort(prod, "database", "show", name, "--json").stdout)
    assert doc["current"] == [] and doc["pending"] == ["t001", "t002"]

    target = new_db("sqlite")
    unknown = retort(prod, "database", "add", unique("db"), "--project", "nope", "--url", target)
    assert unknown.returncode == 2, unknown.stderr
    closed = f"http://127.0.0.1:{free_port()}"
    add = ["database", "add", "x", "--project", project, "--url", target]
    gone = retort(prod, *add, "--retort-url", closed)
    assert gone.returncode == 5 and "cannot reach Retort" in gone.stderr, gone.stderr


def test_database_remove_asks_on_a_terminal(prod, new_db):
    project, _ = setup_project(prod.client)
    name = register_db(prod.client, project, new_db("sqlite"))
    controller, terminal = pty.openpty()
    try:
        os.write(controller, b"n\n")
        out = retort(prod, "database", "remove", name, stdin=terminal)
    finally:
        os.close(terminal)
        os.close(controller)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"Remove database {name} from Retort?" in out.stderr
    assert f"{name} not removed" in out.stderr
    assert prod.client.get(f"/v1/databases/{name}?live=false").status == 200


def test_database_set_merges_tags_and_changes_the_url(prod, new_db, tmp_path):
    c = prod.client
    project, _ = setup_project(c)
    name = register_db(c, project, new_db("sqlite"), tags={"env": "test", "team": "core"})

    out = retort(prod, "database", "set", name, "--tag", "region=eu", "--untag", "team")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("tags env=test, region=eu"), out.stdout
    assert c.get(f"/v1/databases/{name}?live=false").body["tags"] == {"env": "test", "region": "eu"}

    moved = new_db("sqlite")
    out = retort(prod, "database", "set", name, "--url", moved, "--untag", "nope", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["url"].endswith(moved.rpartition("/")[2]) and doc["tags"]["region"] == "eu"
    assert f"note: {name} has no tag nope" in out.stderr

    bad = retort(prod, "database", "set", name, "--url", "sqlite:///relative.db")
    assert bad.returncode == 2 and "sqlite_path_not_allowed" in bad.stderr, bad.stderr
    missing = retort(prod, "database", "set", unique("no-such-db"), "--tag", "a=b")
    assert missing.returncode == 2 and "(not_found)" in missing.stderr, missing.stderr


def test_database_remove(prod, new_db):
    c = prod.client
    project, _ = setup_project(c, chain_bundle(1))
    name = register_db(c, project, new_db("sqlite"))
    job = run_job(c, name)

    out = retort(prod, "database", "remove", name, "--yes")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"database {name} removed"
    assert c.get(f"/v1/databases/{name}?live=false").status == 404
    assert c.get(f"/v1/jobs/{job['id']}").status == 200  # its jobs stay readable

    again = retort(prod, "database", "remove", name, "--yes", "--json")
    assert again.returncode == 2 and json.loads(again.stdout)["error"]["code"] == "not_found"
    other = register_db(c, project, new_db("sqlite"))
    doc = json.loads(retort(prod, "database", "remove", other, "--yes", "--json").stdout)
    assert doc == {"name": other, "removed": True}


def test_repair_accepts_the_bundles_file_for_a_changed_revision(prod, new_db):
    c = prod.client
    project, _ = setup_project(c, chain_bundle(2))
    db = register_db(c, project, new_db("sqlite"))
    assert run_job(c, db)["state"] == "succeeded"
    edited = chain_bundle(2)
    edited["versions/t001.py"] += "\n# a comment added after it was applied\n"
    push_bundle(c, project, edited)

    refused = retort(prod, "migrate", db, "--wait")
    assert refused.returncode == 3, refused.stdout + refused.stderr
    show = retort(prod, "database", "show", db)
    assert "blocked   revision_changed: revision t001 was applied" in show.stdout, show.stdout

    out = retort(prod, "repair", db, "t001")
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(
        rf"repaired {db}: revision t001 now matches bundle [0-9a-f]{{12}} "
        r"\(sha256 [0-9a-f]{12} -> [0-9a-f]{12}\)",
        out.stdout.strip(),
    ), out.stdout
    assert "blocked" not in retort(prod, "database", "show", db).stdout

    again = retort(prod, "repair", db, "t001", "--json")
    assert again.returncode == 2
    assert json.loads(again.stdout)["error"]["code"] == "nothing_to_repair"
    unknown = retort(prod, "repair", db, "zzz999")
    assert unknown.returncode == 2, unknown.stderr
    assert retort(prod, "migrate", db, "--wait").returncode == 0


# ---------------------------------------------------------------- bundles


def test_bundle_show_prints_the_revision_graph(prod):
    files = {
        "versions/a.py": revision("a", None, message="create things"),
        "versions/b.py": revision("b", "a", branch_labels="left"),
        "versions/c.py": revision("c", "a", branch_labels="right"),
        "versions/m.py": revision(
            "m", ("b", "c"), downgrade="op.execute('SELECT 1')", message="merge"
        ),
    }
    project, bundle = setup_project(prod.client, files)

    out = retort(prod, "bundle", "show", project, bundle["id"][:12])
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"bundle    {bundle['id']} (project {project}, the latest)")
    graph = out.stdout.split("revisions, newest first (as `alembic history`):\n")[1]
    lines = graph.splitlines()
    assert lines[0] == "  b, c -> m (head) (mergepoint), merge"
    assert "  a -> b (left), revision b [no downgrade]" in lines
    assert "  a -> c (right), revision c [no downgrade]" in lines
    assert lines[-1] == "  <base> -> a (branchpoint), create things [no downgrade]"
    doc = json.loads(retort(prod, "bundle", "show", project, "latest", "--json").stdout)
    assert doc["id"] == bundle["id"] and [r["id"] for r in doc["revisions"]][0] == "a"

    assert retort(prod, "bundle", "show", project, "0" * 12).returncode == 2


def test_bundle_list_and_promote(prod):
    c = prod.client
    project, first = setup_project(c, chain_bundle(1))
    second = push_bundle(c, project, chain_bundle(2))

    out = retort(prod, "bundle", "list", project)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["BUNDLE", "LATEST", "PUSHED", "HEADS", "REVISIONS", "BY"]
    rows = [line.split() for line in lines[1:]]
    assert [r[0] for r in rows] == [second["id"][:12], first["id"][:12]]  # newest first
    assert rows[0][1] == "*" and rows[1][1] != "*"
    assert rows[0][-3:] == ["t002", "2", "admin"]

    promoted = retort(prod, "bundle", "promote", project, first["id"][:12])
    assert promoted.returncode == 0, promoted.stderr
    assert promoted.stdout.strip() == f"bundle {first['id'][:12]} is now the latest of {project}"
    assert c.get(f"/v1/projects/{project}/bundles/latest").body["id"] == first["id"]
    page = json.loads(retort(prod, "bundle", "list", project, "--json").stdout)
    assert [(b["id"], b["latest"]) for b in page["bundles"]] == [
        (first["id"], True),
        (second["id"], False),
    ]
    doc = json.loads(retort(prod, "bundle", "promote", project, second["id"], "--json").stdout)
    assert doc["id"] == second["id"] and doc["latest"] is True

    assert retort(prod, "bundle", "list", unique("no-such-project")).returncode == 2


# ---------------------------------------------------------------- jobs and locks


def test_cancel_waiting_jobs_and_unlock_refused(prod, new_db):
    c = prod.client
    slow = {"versions/s1.py": revision("s1", None, "import time; time.sleep(4)")}
    project, _ = setup_project(c, slow)
    db = register_db(c, project, new_db("sqlite"))
    body = {"database": db, "coalesce": False}
    holder = c.post("/v1/jobs", body).body["id"]
    c.wait_state(holder, "running")
    waiting = [c.post("/v1/jobs", body).body["id"] for _ in range(2)]

    # The holder is alive and renews its lease: unlock is refused.
    refused = retort(prod, "unlock", db)
    assert refused.returncode == 2 and "(lease_held)" in refused.stderr, refused.stderr

    out = retort(prod, "cancel", str(waiting[0]))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"job {waiting[0]} cancelled"
    assert c.get(f"/v1/jobs/{waiting[0]}").body["state"] == "cancelled"
    out = retort(prod, "cancel", str(waiting[1]), "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["id"] == waiting[1] and doc["state"] == "cancelled"

    again = retort(prod, "cancel", str(waiting[0]), "--json")
    assert again.returncode == 2, again.stdout + again.stderr
    assert json.loads(again.stdout)["error"]["code"] == "not_cancellable"
    assert retort(prod, "cancel", "987654321").returncode == 2

    assert c.wait_job(holder)["state"] == "succeeded"
    free = retort(prod, "unlock", db, "--json")
    assert free.returncode == 2 and json.loads(free.stdout)["error"]["code"] == "not_locked"
    free = retort(prod, "unlock", db)
    assert free.returncode == 2 and "is not locked" in free.stderr, free.stderr


# ---------------------------------------------------------------- what every command shares


def test_version():
    out = subprocess.run([*RETORT, "--version"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"retort, version {importlib.metadata.version('retort')}"


def test_the_exit_codes_are_listed_once_in_retort_help():
    top = subprocess.run([*RETORT, "--help"], capture_output=True, text=True, cwd=ROOT)
    assert top.returncode == 0 and "Exit codes:" in top.stdout
    assert "4  timed out waiting" in top.stdout
    for command in (["migrate"], ["database", "remove"], ["token", "create"], ["plan"]):
        sub = subprocess.run([*RETORT, *command, "--help"], capture_output=True, text=True)
        assert sub.returncode == 0, sub.stderr
        assert sub.stdout.rstrip().endswith("Exit codes: see retort --help."), sub.stdout
        assert "timed out waiting" not in sub.stdout


def test_usage_errors_exit_2_before_any_request(prod):
    """Retort is not even there (a closed port): a bad form is still a usage error, exit 2."""
    closed = f"http://127.0.0.1:{free_port()}"
    bad = [
        ["project", "create", "p", "--setting", "no-equals-sign"],
        ["project", "create", "p", "--setting", "=5"],
        ["project", "create", "p", "--setting", "a=1", "--setting", "a=2"],
        ["project", "set", "p"],
        ["project", "set", "p", "a=1", "--reset", "a"],
        ["project", "set", "p", "--reset", "a=1"],
        ["database", "add", "d", "--project", "p", "--url", "sqlite://", "--tag", "env"],
        ["database", "add", "d", "--url", "sqlite://"],
        ["database", "list", "--tag", "=prod"],
        ["database", "set", "d"],
        ["database", "set", "d", "--tag", "a=1", "--untag", "a"],
        ["database", "set", "d", "--untag", "a=1"],
        ["database", "remove", "d"],  # not a terminal: --yes is needed
        ["migrate", "d", "--action", "downgrade"],
        ["cancel", "not-a-number"],
        ["bundle", "show", "p"],
    ]
    for args in bad:
        out = retort(prod, *args, url=closed)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert "cannot reach" not in out.stderr and "Usage:" in out.stderr, (args, out.stderr)
    settings = ROOT / "pyproject.toml"  # not JSON
    out = retort(prod, "project", "create", "p", "--settings-file", str(settings), url=closed)
    assert out.returncode == 2 and "not JSON" in out.stderr, out.stderr


def test_a_closed_pipe_ends_quietly(prod, new_db):
    """`retort jobs | head -1`: the reader goes away; the command exits 0, no traceback."""
    c = prod.client
    project, _ = setup_project(c, chain_bundle(2))
    db = register_db(c, project, new_db("sqlite"))
    run_job(c, db)

    with piped(prod, "jobs", "--limit", "500") as proc:
        first = proc.stdout.readline()
        proc.stdout.close()
        err = proc.stderr.read()
        assert proc.wait(timeout=60) == 0, err
    assert first.split()[0] == b"JOB" and err == b"", err

    # Closed before anything is written: every write meets the closed pipe.
    for args in (["history", db], ["jobs", "--database", db, "--json"], ["audit", "export"]):
        with piped(prod, *args) as proc:
            proc.stdout.close()
            err = proc.stderr.read()
            assert proc.wait(timeout=60) == 0, (args, err)
        assert err == b"", (args, err)


def piped(server, *args: str) -> subprocess.Popen:
    """`retort ARGS | ...`: the test reads (or closes) the other end."""
    return subprocess.Popen(
        [*RETORT, *args],
        env=cli_env(server),
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_the_success_line_shows_the_jobs_own_duration(prod, new_db):
    c = prod.client
    slow = {"versions/s1.py": revision("s1", None, "import time; time.sleep(1.5)")}
    project, _ = setup_project(c, slow)
    db = register_db(c, project, new_db("sqlite"))
    job = run_job(c, db)
    assert job["state"] == "succeeded", job

    # The job ended before this wait began: the line says how long the job ran.
    out = retort(prod, "wait", str(job["id"]))
    assert out.returncode == 0, out.stderr
    line = out.stdout.splitlines()[-1]
    match = re.fullmatch(rf"job {job['id']} succeeded: {db} is at s1 \((\d+\.\d) s\)", line)
    assert match, line
    from datetime import datetime

    took = (
        datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["started_at"])
    ).total_seconds()
    assert float(match.group(1)) >= 1.5 and match.group(1) == f"{took:.1f}"


def test_a_job_with_nothing_to_do_says_so(prod, new_db):
    c = prod.client
    project, _ = setup_project(c, chain_bundle(2))
    db = register_db(c, project, new_db("sqlite"))
    assert retort(prod, "migrate", db, "--wait").returncode == 0

    again = retort(prod, "migrate", db, "--wait")
    assert again.returncode == 0, again.stderr
    job_id = c.get(f"/v1/jobs?database={db}").body["jobs"][0]["id"]
    assert again.stdout.splitlines()[-1] == (
        f"job {job_id} succeeded, nothing to do: {db} is already at t002"
    )
    status = retort(prod, "status", str(job_id))
    assert f"  nothing to do: {db} is already at t002" in status.stdout
