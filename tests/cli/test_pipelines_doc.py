"""docs/pipelines.md's curl wait loop, run as written against a real Retort (issue 21, item 9)."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

from tests.helpers import chain_bundle, register_db, revision, setup_project, unique

DOC = Path(__file__).resolve().parents[2] / "docs" / "pipelines.md"


def _loop() -> str:
    text = DOC.read_text()
    section = text[text.index("## Waiting with curl") :]
    return re.search(r"```sh\n(.*?)```", section, re.S).group(1)


def _run(prod, tmp_path, database: str) -> tuple[int, str, float]:
    script = _loop().replace("billing-prod", database)
    env = {
        "PATH": "/usr/bin:/bin:/usr/local/bin",
        "RETORT_URL": f"http://127.0.0.1:{prod.port}",
        "RETORT_TOKEN": prod.token,
        "CI_JOB_ID": unique("ci"),
    }
    started = time.monotonic()
    done = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    return done.returncode, done.stderr, time.monotonic() - started


def test_the_documented_loop_waits_for_the_job_and_exits_0(prod, new_db, tmp_path):
    c = prod.client
    project, _ = setup_project(c, chain_bundle(2))
    db = register_db(c, project, new_db("sqlite"))
    code, err, _ = _run(prod, tmp_path, db)
    assert code == 0, err
    jobs = c.get(f"/v1/jobs?database={db}").body["jobs"]
    assert [j["state"] for j in jobs] == ["succeeded"]


def test_the_documented_loop_exits_1_when_the_migration_fails(prod, new_db, tmp_path):
    c = prod.client
    bad = {"versions/x.py": revision("x", None, "raise RuntimeError('boom')")}
    project, _ = setup_project(c, bad, settings={"lint": {"enabled": False}})
    db = register_db(c, project, new_db("sqlite"))
    code, err, _ = _run(prod, tmp_path, db)
    assert code == 1, err
    assert "revision_failed" in err


def test_the_documented_loop_stops_at_once_when_the_request_is_refused(prod, tmp_path):
    code, err, took = _run(prod, tmp_path, unique("no-such-db"))
    assert code == 2, err
    assert '"not_found"' in err and "no database named" in err, err
    assert took < 10  # it never spins on a job id that does not exist
