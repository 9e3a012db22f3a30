"""`retort rollout ...` run as a pipeline would: a subprocess against a real Retort
(the usage errors against none: they must exit 2 before any request)."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.cli.test_cli import cli_env
from tests.helpers import ROOT, chain_bundle, free_port, register_db, revision, setup_project

RETORT = [sys.executable, "-m", "service.cli", "rollout"]


def rollout(server, *args: str, timeout: float = 180, **run) -> subprocess.CompletedProcess:
    """Run `retort rollout ARGS` against `server` (no terminal anywhere)."""
    out = subprocess.run(
        [*RETORT, *args],
        env=cli_env(server),
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        **run,
    )
    assert "Traceback" not in out.stderr + out.stdout, out.stderr
    return out


def fleet(client, tmp_path: Path, n: int, files: dict[str, str], **tags: str):
    """A project with a bundle and N SQLite databases tagged tier=tenant (and `tags`)."""
    project, _ = setup_project(client, files)
    tmp_path.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        url = f"sqlite:///{tmp_path / f'tenant{i}.db'}"
        names.append(
            register_db(
                client, project, url, name=f"{project}-t{i}", tags={"tier": "tenant", **tags}
            )
        )
    return project, names


def current(client, name: str) -> list[str] | None:
    return client.get(f"/v1/databases/{name}").body.get("current")


def rollout_id(out: subprocess.CompletedProcess) -> int:
    match = re.search(r"^rollout (\d+): ", out.stdout, re.M)
    assert match, out.stdout + out.stderr
    return int(match.group(1))


# ---------------------------------------------------------------- usage errors


class _Nowhere:
    """A server that is not there: any request would exit 5, never 2."""

    port = free_port()
    token = "nobody"


@pytest.mark.parametrize(
    "args, says",
    [
        (["start", "--project", "p", "--action", "downgrade"], "a downgrade needs --to"),
        (["start", "--project", "p", "--action", "downgrade", "--to", "head"], "needs --to"),
        (["start", "--project", "p", "--wave-size", "10", "--waves", "10,100"], "not both"),
        (["start", "--project", "p", "--canary", "2", "--canary-db", "a"], "not both"),
        (["start", "--project", "p", "--waves", "10,x"], "not wave sizes"),
        (["start", "--project", "p", "--waves", "10,0"], "not wave sizes"),
        (["start", "--project", "p", "--halt-on-failure-ratio", "1"], "0<=x<1"),
        (["start", "--project", "p", "--tag", "novalue"], "K=V"),
        (["start", "--project", "p", "--tag", "a=1", "--tag", "a=2"], "twice"),
        (["start", "--project", "p", "--action", "sideways"], "sideways"),
        (["start", "--project", "p", "--timeout", "5"], "--timeout goes with --wait"),
        (["start", "--project", "p", "--idempotency-key", "has space"], "idempotency"),
        (["start", "--tag", "a=1"], "--project"),
        (["status", "1", "--not-at-target", "--state", "failed"], "not both"),
        (["status", "x"], "not a valid integer"),
        (["wait", "1", "--timeout", "-1"], "-1"),
        (["pause"], "Missing argument"),
    ],
)
def test_usage_errors_exit_2_before_any_request(args, says):
    out = rollout(_Nowhere, *args, timeout=30)
    assert out.returncode == 2, out.stdout + out.stderr
    assert says in out.stdout + out.stderr, out.stdout + out.stderr
    assert "cannot reach Retort" not in out.stderr


# ---------------------------------------------------------------- against Retort


def test_start_and_wait_over_four_databases_succeeds(prod, tmp_path):
    c = prod.client
    project, names = fleet(c, tmp_path, 4, chain_bundle(2))
    other = register_db(c, project, f"sqlite:///{tmp_path / 'other.db'}", tags={"tier": "admin"})

    out = rollout(
        prod,
        "start",
        "--project",
        project,
        "--tag",
        "tier=tenant",
        "--canary",
        "1",
        "--wave-size",
        "2",
        "--max-parallel",
        "2",
        "--max-parallel-per-server",
        "1",
        "--halt-on-failure-ratio",
        "0.5",
        "--wait",
        "--timeout",
        "150",
    )
    assert out.returncode == 0, out.stdout + out.stderr
    rid = rollout_id(out)
    lines = out.stdout.splitlines()
    assert lines[0] == f"rollout {rid}: 4 databases in 3 waves (canary 1, then 2 each) to head"
    assert re.fullmatch(
        rf"rollout {rid} succeeded: 4 databases at head \(in \d+\.\d s\)", lines[-1]
    )
    assert "\r" not in out.stdout  # not a terminal: plain lines
    assert any(
        re.match(r"(canary|wave \d/2)  \d/4 done  \d failed  \d running", li) for li in lines
    )
    for name in names:
        assert current(c, name) == ["t002"], name
    assert current(c, other) == []  # not selected

    status = rollout(prod, "status", str(rid))
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.startswith(f"rollout {rid}  succeeded  upgrade to head")
    assert "4 succeeded" in status.stdout and "at target    4 of 4" in status.stdout
    assert "canary" in status.stdout  # the waves' table names wave 0
    doc = json.loads(rollout(prod, "status", str(rid), "--json").stdout)
    assert doc["id"] == rid and doc["state"] == "succeeded"

    behind = rollout(prod, "status", str(rid), "--not-at-target")
    assert behind.returncode == 0 and behind.stdout.rstrip().endswith("no databases")
    listed = json.loads(rollout(prod, "status", str(rid), "--state", "succeeded", "--json").stdout)
    assert sorted(d["database"] for d in listed["databases"]) == sorted(names)

    # Again: every database is at head already; a start with --json is one document.
    again = rollout(prod, "start", "--project", project, "--tag", "tier=tenant", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["project"] == project
    waited = rollout(prod, "wait", str(json.loads(again.stdout)["id"]), "--timeout", "60")
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert "succeeded: 4 databases at head" in waited.stdout


def test_a_failing_canary_halts_with_exit_1_and_says_why(prod, tmp_path):
    c = prod.client
    project, names = fleet(c, tmp_path, 4, chain_bundle(2))
    bad = names[2]
    # t001 creates table items: on this database it exists already, so t001 fails.
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'tenant2.db'}")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE items (id INTEGER PRIMARY KEY)")
    engine.dispose()

    out = rollout(
        prod,
        "start",
        "--project",
        project,
        "--canary-db",
        bad,
        "--wave-size",
        "3",
        "--wait",
        "--timeout",
        "120",
    )
    assert out.returncode == 1, out.stdout + out.stderr
    rid = rollout_id(out)
    assert out.stdout.startswith(f"rollout {rid}: 4 databases in 2 waves (canary 1, then 3) to")
    outcome = next(li for li in out.stdout.splitlines() if li.startswith(f"rollout {rid} halted"))
    assert "canary" in outcome.lower(), out.stdout
    assert f"failed  {bad} (job " in out.stdout and "revision_failed" in out.stdout
    assert f"retort rollout retry {rid}" in out.stdout
    assert all(current(c, n) == [] for n in names if n != bad)  # nothing after the canary

    status = rollout(prod, "status", str(rid), "--not-at-target")
    assert status.returncode == 1, status.stdout + status.stderr
    rows = {
        li.split()[0]: li.split() for li in status.stdout.splitlines() if li.startswith(project)
    }
    assert sorted(rows) == sorted(names)
    assert rows[bad][2] == "failed" and rows[bad][-1] == "revision_failed"
    failed = json.loads(rollout(prod, "status", str(rid), "--state", "failed", "--json").stdout)
    assert [d["database"] for d in failed["databases"]] == [bad]
    assert failed["rollout"]["state"] == "halted"

    # Fixed on the database: retry the failed one and go on.
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'tenant2.db'}")
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE items")
    engine.dispose()
    retried = rollout(prod, "retry", str(rid))
    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert retried.stdout.strip() == f"rollout {rid} running"
    done = rollout(prod, "wait", str(rid), "--timeout", "120")
    assert done.returncode == 0, done.stdout + done.stderr
    assert all(current(c, n) == ["t002"] for n in names)


SLOW = {
    "versions/s001.py": revision("s001", None, "import time; time.sleep(2)"),
}


def test_pause_resume_and_abort(prod, tmp_path):
    c = prod.client
    project, names = fleet(c, tmp_path, 4, SLOW)
    start = ["start", "--project", project, "--wave-size", "1", "--max-parallel", "1"]
    out = rollout(prod, *start)
    assert out.returncode == 0, out.stdout + out.stderr
    rid = rollout_id(out)
    assert out.stdout.strip() == f"rollout {rid}: 4 databases in 4 waves (1 each) to head"

    paused = rollout(prod, "pause", str(rid))
    assert paused.returncode == 0, paused.stdout + paused.stderr
    assert paused.stdout.strip() == f"rollout {rid} paused: no new jobs"
    again = rollout(prod, "pause", str(rid))
    assert again.returncode == 2, again.stdout + again.stderr
    assert again.stderr.startswith("error: ") and "paused" in again.stderr

    waited = rollout(prod, "wait", str(rid), "--timeout", "4")
    assert waited.returncode == 4, waited.stdout + waited.stderr
    assert f"rollout {rid} paused" in waited.stdout
    assert f"retort rollout resume {rid}" in waited.stdout
    assert f"timed out after 4 s waiting for rollout {rid} (still paused)" in waited.stderr
    status = rollout(prod, "status", str(rid), "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["state"] == "paused"
    assert sum(current(c, n) == ["s001"] for n in names) <= 1  # nothing new while paused

    resumed = rollout(prod, "resume", str(rid), "--json")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert json.loads(resumed.stdout)["state"] == "running"
    done = rollout(prod, "wait", str(rid), "--timeout", "120")
    assert done.returncode == 0, done.stdout + done.stderr
    assert all(current(c, n) == ["s001"] for n in names)
    finished = rollout(prod, "resume", str(rid))
    assert finished.returncode == 2 and "succeeded" in finished.stderr

    # Abort: final; the rollout is then a failure for the pipeline.
    project2, names2 = fleet(c, tmp_path / "second", 3, SLOW)
    second = rollout_id(rollout(prod, "start", "--project", project2, "--max-parallel", "1"))
    aborted = rollout(prod, "abort", str(second))
    assert aborted.returncode == 0, aborted.stdout + aborted.stderr
    assert aborted.stdout.startswith(f"rollout {second} aborted")
    assert rollout(prod, "abort", str(second)).returncode == 2
    ended = rollout(prod, "wait", str(second), "--timeout", "60")
    assert ended.returncode == 1, ended.stdout + ended.stderr
    assert f"rollout {second} aborted" in ended.stdout.splitlines()[-1]
    assert rollout(prod, "status", str(second)).returncode == 1
    assert rollout(prod, "status", "987654321").returncode == 2  # no such rollout


def test_approval_between_waves_is_waited_for_and_exits_3_at_the_timeout(prod, tmp_path):
    c = prod.client
    project, names = fleet(c, tmp_path, 3, chain_bundle(1))
    args = ["start", "--project", project, "--canary", "1", "--approve-between-waves", "--wait"]
    out = rollout(prod, *args, "--timeout", "8")
    assert out.returncode == 3, out.stdout + out.stderr
    rid = rollout_id(out)
    assert out.stdout.startswith(f"rollout {rid}: 3 databases in 2 waves (canary 1, then 2) to")
    said = f"rollout {rid} waiting for approval of wave 1: an admin token, or one named in "
    assert said in out.stdout and f"`retort rollout resume {rid}`" in out.stdout, out.stdout
    assert "(still waiting_for_approval)" in out.stderr
    assert current(c, names[0]) == ["t001"] and current(c, names[1]) == []
    status = rollout(prod, "status", str(rid))
    assert status.returncode == 3 and "waiting for approval of wave 1" in status.stdout

    approved = rollout(prod, "resume", str(rid))
    assert approved.returncode == 0 and approved.stdout.strip() == f"rollout {rid} running"
    done = rollout(prod, "wait", str(rid), "--timeout", "60")
    assert done.returncode == 0, done.stdout + done.stderr
    assert all(current(c, n) == ["t001"] for n in names)


def test_wait_on_a_terminal_redraws_one_line(prod, tmp_path):
    c = prod.client
    project, names = fleet(c, tmp_path, 3, SLOW)
    rid = rollout_id(rollout(prod, "start", "--project", project, "--max-parallel", "1"))

    controller, terminal = pty.openpty()
    seen = bytearray()

    def read() -> None:
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:
                return
            if not chunk:
                return
            seen.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc = subprocess.run(
            [*RETORT, "wait", str(rid), "--timeout", "120"],
            env=cli_env(prod),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=terminal,
            stderr=subprocess.PIPE,
            timeout=150,
        )
    finally:
        os.close(terminal)
        reader.join(5)
        os.close(controller)
    text = seen.decode(errors="replace")
    assert proc.returncode == 0, text + proc.stderr.decode()
    assert "\r\x1b[K" in text and re.search(r"/3 done  0 failed  \d running", text), text
    final = text.replace("\r\n", "\n").split("\n")
    last = [li for li in final if li.strip()][-1]
    assert last.split("\x1b[K")[-1].startswith(f"rollout {rid} succeeded: 3 databases at head")
    assert all(current(c, n) == ["s001"] for n in names)
