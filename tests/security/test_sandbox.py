"""Attacks a hostile tenant's revision tries, and what stops each (docs/security.md).

Every test runs against `retort serve` under each sandbox mode, for what that
mode promises: "bwrap" (namespaces, only its own files) and "process" (a clean
exec'd interpreter with limits, not isolated from the machine's files).
"""

from __future__ import annotations

import json
import os
import time

import sqlalchemy as sa

from tests.helpers import register_db, revision, run_job, setup_project, wait_until
from tests.security.conftest import pids_of_runners, secrets_of


def loot_chain(body: str, head: str = "") -> dict[str, str]:
    """r1 makes a `loot` table on the target; r2 runs `body`, which may call keep(k, v)."""
    head = (
        "import json, os, sys\n" + head + "def keep(k, v):\n"
        "    op.get_bind().execute(sa.text('INSERT INTO loot (k, v) VALUES (:k, :v)'),\n"
        "                          {'k': k, 'v': json.dumps(v, default=str)[:100000]})\n"
    )
    return {
        "versions/r1.py": revision(
            "r1", None, "op.create_table('loot', sa.Column('k', sa.Text), sa.Column('v', sa.Text))"
        ),
        "versions/r2.py": revision("r2", "r1", body, head=head),
    }


def loot(url: str) -> dict[str, object]:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as c:
            return {k: json.loads(v) for k, v in c.exec_driver_sql("SELECT k, v FROM loot")}
    finally:
        engine.dispose()


def attack(server, new_db, body: str, head: str = "", dialect: str = "postgresql", **settings):
    c = server.client
    project, _ = setup_project(c, loot_chain(body, head), settings=settings or None)
    url = new_db(dialect)
    db = register_db(c, project, url)
    job = run_job(c, db, timeout=90)
    return c, job, url


def test_every_job_says_which_sandbox_ran_it(sandboxed, new_db):
    c, job, _ = attack(sandboxed, new_db, "keep('uid', os.getuid())")
    assert job["state"] == "succeeded", job
    assert job["sandbox"] == sandboxed.mode
    ready = c.get("/readyz", token=None).body
    assert ready["sandbox"]["mode"] == sandboxed.mode, ready
    started = [e for e in c.get(f"/v1/audit?job={job['id']}").body["events"]
               if e["action"] == "job.started"]  # fmt: skip
    assert started[0]["data"]["sandbox"] == sandboxed.mode


def test_the_runner_holds_no_secret(sandboxed, new_db):
    """Its environment, the worker's /proc, the data directory, Retort's config: nothing."""
    data = str(sandboxed.log_dir)
    body = f"""
keep('environ', dict(os.environ))
found = {{}}
try:
    with open(f'/proc/{{os.getppid()}}/environ', 'rb') as f:
        found['parent_environ'] = f.read().decode(errors='replace')
except OSError as e:
    found['parent_environ'] = repr(e)
for name in ('secret-key', 'admin-token', 'retort.db'):
    try:
        with open(os.path.join({data!r}, name), 'rb') as f:
            found[name] = f.read(4096).decode(errors='replace')
    except OSError as e:
        found[name] = repr(e)
try:
    from service.config import Config
    cfg = Config.from_env()
    found['config'] = [cfg.database_url, cfg.admin_token, list(cfg.secret_keys)]
except Exception as e:
    found['config'] = repr(e)
keep('found', found)
"""
    c, job, url = attack(sandboxed, new_db, body)
    assert job["state"] == "succeeded", job
    stolen = loot(url)
    env = stolen["environ"]
    assert not [k for k in env if k.startswith("RETORT_")], env
    assert set(env) <= {"PATH", "HOME", "LANG", "PWD", "LC_CTYPE"}, env
    everything = json.dumps(stolen) + json.dumps(job)
    secrets = secrets_of(sandboxed)
    if sandboxed.mode == "bwrap":
        # Nothing of Retort's: not the worker's /proc, not the data directory.
        for secret in secrets:
            assert secret not in everything
        for name in ("secret-key", "admin-token", "retort.db"):
            assert "No such file" in stolen["found"][name], stolen["found"][name]
        # Its parent is the sandbox's own init (the worker is outside its PID namespace).
        assert "RETORT_" not in stolen["found"]["parent_environ"]
    else:
        # "process" promises a clean environment and a fresh interpreter only.
        for secret in secrets:
            assert secret not in json.dumps(env)


def test_code_left_by_one_projects_job_never_runs_in_anothers(sandboxed, new_db):
    """A listener and a module planted in the runner stay with their project."""
    plant = """
import types
evil = types.ModuleType('evil_planted')
sys.modules['evil_planted'] = evil

def spy(conn, cursor, statement, *args):
    if 'loot' not in statement and 'alembic_version' not in statement:
        cursor.execute("SELECT 'planted listener ran'")

sa.event.listen(sa.engine.Engine, 'before_cursor_execute', spy)
keep('planted', True)
"""
    c, job, _ = attack(sandboxed, new_db, plant)
    assert job["state"] == "succeeded", job
    look = """
keep('modules', sorted(k for k in sys.modules if k.startswith('evil')))
keep('listeners', sa.event.contains(sa.engine.Engine, 'before_cursor_execute', lambda *a: None))
op.create_table('other', sa.Column('id', sa.Integer))
"""
    for _ in range(3):  # whichever runner a job lands on
        c2, other, url = attack(sandboxed, new_db, look)
        assert other["state"] == "succeeded", other
        assert loot(url)["modules"] == []
        sql = json.dumps(other["steps"])
        assert "planted listener ran" not in sql


def test_a_sleeping_revision_times_out_while_another_project_completes(sandboxed, new_db):
    c = sandboxed.client
    project, _ = setup_project(
        c, loot_chain("import time\ntime.sleep(3600)"), settings={"max_duration_s": 4}
    )
    url = new_db("postgresql")
    db = register_db(c, project, url)
    started = time.monotonic()
    sleeper = c.post("/v1/jobs", {"database": db}).body["id"]
    c.wait_state(sleeper, "running", timeout=30)
    # The other worker slot serves another tenant meanwhile.
    _, other, _ = attack(sandboxed, new_db, "keep('x', 1)")
    assert other["state"] == "succeeded", other
    assert time.monotonic() - started < 20
    done = c.wait_job(sleeper, timeout=60)
    assert done["state"] == "failed" and done["error"]["code"] == "timeout", done
    assert "max_duration_s" in done["error"]["message"]
    assert time.monotonic() - started < 40
    # Rolled back to its last good revision, and the lease is free.
    assert [s["revisions"] for s in done["steps"] if s["state"] == "applied"] == [["r1"]]
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == "r1"
    engine.dispose()
    assert c.get(f"/v1/databases/{db}").body["lock"]["held_by_job"] is None
    again = run_job(c, db, action="stamp", target="r1")
    assert again["state"] == "succeeded", again


def test_a_memory_hog_fails_with_memory_limit_and_leaves_nothing_behind(sandboxed, new_db):
    c, job, _ = attack(sandboxed, new_db, "hog = bytearray(4 * 1024 ** 3)")
    assert job["state"] == "failed", job
    assert job["error"]["code"] == "memory_limit", job["error"]
    # A job that keeps 400 MB when it ends retires its runner: no runner holds it after.
    c, job, _ = attack(sandboxed, new_db, "sys.modules['hoard'] = b'x' * (400 * 1024 ** 2)")
    assert job["state"] == "succeeded", job

    def no_big_runner() -> bool:
        for pid in pids_of_runners():
            try:
                with open(f"/proc/{pid}/statm") as f:
                    rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            except OSError:
                continue
            if rss > 350 * 1024**2:
                return False
        return True

    wait_until(no_big_runner, timeout=10)


def test_killing_its_own_process_group_costs_only_its_job(sandboxed, new_db):
    """kill(0) reaches the caller's process group: the runner has its own session."""
    c, job, _ = attack(sandboxed, new_db, "import signal\nos.kill(0, signal.SIGKILL)")
    assert job["state"] == "failed", job
    assert job["error"]["code"] == "runner_crashed", job["error"]
    assert "SIGKILL" in job["error"]["message"]
    assert c.get("/readyz", token=None).status == 200
    for p in sandboxed.procs:
        assert p.poll() is None
    _, after, _ = attack(sandboxed, new_db, "keep('x', 1)")
    assert after["state"] == "succeeded", after


def test_a_failed_revision_says_which_file_and_line(sandboxed, new_db):
    body = "keep('x', 1)\nraise RuntimeError('the tenant broke it')"
    _, job, _ = attack(sandboxed, new_db, body)
    assert job["state"] == "failed", job
    error = job["error"]
    assert error["code"] == "revision_failed" and error["revision"] == "r2", error
    assert error["file"] == "versions/r2.py"
    assert isinstance(error["line"], int) and error["line"] > 1
    assert "the tenant broke it" in error["message"]
    assert "versions/r2.py, line" in error["message"]


def test_a_silent_mysql_port_fails_its_job_within_timeouts_while_others_are_served(
    sandboxed, new_db
):
    from tests.security.test_targets import SilentServer

    silent = SilentServer()
    try:
        c = sandboxed.client
        project, _ = setup_project(c, loot_chain("keep('x', 1)"))
        db = register_db(c, project, f"mysql://root:pw@127.0.0.1:{silent.port}/app")
        started = time.monotonic()
        hung = c.post("/v1/jobs", {"database": db}).body["id"]
        _, other, _ = attack(sandboxed, new_db, "keep('x', 1)")
        assert other["state"] == "succeeded", other
        done = c.wait_job(hung, timeout=60)
        # Two connect attempts of 2 s each (the tests' settings), a backoff, and the
        # early try: bounded, not minutes.
        assert time.monotonic() - started < 30
        assert done["state"] == "failed", done
        assert done["error"]["code"] == "target_unreachable", done["error"]
        assert "pw" not in json.dumps(done)
        assert c.get(f"/v1/databases/{db}").body["lock"]["held_by_job"] is None
    finally:
        silent.close()
