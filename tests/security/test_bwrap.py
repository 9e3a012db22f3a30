"""What only the full sandbox (bubblewrap) promises: the runner sees none of the
machine but its own Python, its project's bundles and its project's SQLite files,
and can signal nothing outside its PID namespace."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.helpers import ROOT, register_db, run_job, setup_project, wait_until
from tests.security.conftest import pids_with, start_serve
from tests.security.test_sandbox import attack, loot, loot_chain


@pytest.fixture(scope="module")
def bwrapped(backends, tmp_path_factory):
    # Groups of two of a project's SQLite files per runner (test_a_runner_binds_one_group).
    server = start_serve(tmp_path_factory, "bwrap", runner_max_warm=0, runner_sqlite_group=2)
    server.mode = "bwrap"  # type: ignore[attr-defined]
    yield server
    server.stop()


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
def test_revision_code_cannot_write_retorts_state(bwrapped, new_db, dialect):
    state_file = str(bwrapped.log_dir / "retort.db")
    body = f"""
import sqlite3
try:
    con = sqlite3.connect('file:{state_file}?mode=rw', uri=True)
    con.execute("INSERT INTO api_tokens (name, role, token_hash) VALUES ('evil', 'admin', 'x')")
    con.execute("DROP TRIGGER IF EXISTS audit_events_no_update")
    con.commit()
    keep('state', 'written')
except Exception as e:
    keep('state', repr(e))
"""
    c, job, url = attack(bwrapped, new_db, body, dialect=dialect)
    assert job["state"] == "succeeded", job
    assert "unable to open" in loot(url)["state"], loot(url)
    names = [t["name"] for t in c.get("/v1/tokens").body["tokens"]]
    assert "evil" not in names
    assert c.get("/v1/audit/verify").body["ok"] is True


def test_the_runner_sees_only_what_it_needs(bwrapped, new_db, tmp_path):
    marker = tmp_path / "host-file"
    marker.write_text("the host's /tmp")
    body = f"""
try:
    seen_marker = open({str(marker)!r}).read()
except OSError as e:
    seen_marker = repr(e)
keep('marker', seen_marker)
"""
    body += """
seen = {}
bundles = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
seen['bundles_dir'] = bundles
for path in ('/', '/tmp', '/root', '/etc', bundles):
    try:
        seen[path] = sorted(os.listdir(path))
    except OSError as e:
        seen[path] = repr(e)
for path in ('/etc/shadow', '/root/.bash_history', '/proc/1/cmdline'):
    try:
        with open(path, 'rb') as f:
            seen[path] = f.read(200).decode(errors='replace')
    except OSError as e:
        seen[path] = repr(e)
try:
    open(__file__, 'a').write('# tampered')
    seen['write_bundle'] = 'written'
except OSError as e:
    seen['write_bundle'] = repr(e)
seen['pids'] = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())
seen['uid'] = os.getuid()
keep('seen', seen)
"""
    _, job, url = attack(bwrapped, new_db, body)
    assert job["state"] == "succeeded", job
    seen = loot(url)["seen"]
    assert "No such file" in seen["/etc/shadow"]
    assert (
        "No such file" in seen["/root/.bash_history"] or "Permission" in seen["/root/.bash_history"]
    )
    assert "Read-only file system" in seen["write_bundle"]
    assert seen["uid"] == 65534
    # A private /tmp: only the folders leading to what is bound (the test's data
    # directory lives under /tmp), none of the host's files.
    assert "No such file" in loot(url)["marker"]
    bound = [sys.prefix, str(ROOT), str(bwrapped.log_dir), str(tmp_path)]
    leading = {Path(p).parts[2] for p in bound if Path(p).parts[:2] == ("/", "tmp")}
    assert set(seen["/tmp"]) <= leading, (seen["/tmp"], leading)
    assert "shadow" not in seen["/etc"] and "passwd" not in seen["/etc"]
    # Its own PID namespace: a handful of processes, none of the worker's.
    assert len(seen["pids"]) < 10, seen["pids"]
    # The runner's bundle folder holds this job's bundle, nothing else of the cache.
    assert len(seen[seen["bundles_dir"]]) == 1, seen[seen["bundles_dir"]]
    assert "bundle-cache" not in seen["bundles_dir"]


def test_the_runner_cannot_signal_the_worker_or_the_service(bwrapped, new_db):
    body = """
import signal
hits = []
for target in [os.getppid(), -1] + [int(p) for p in os.listdir('/proc') if p.isdigit()]:
    if target == os.getpid():
        continue
    try:
        os.kill(target, signal.SIGKILL)
        hits.append(target)
    except OSError as e:
        hits.append(repr(e))
keep('hits', hits)
"""
    c, job, _ = attack(bwrapped, new_db, body)
    assert job["state"] in ("succeeded", "failed"), job
    time.sleep(1)
    for p in bwrapped.procs:
        assert p.poll() is None, "retort serve lost a process"
    assert c.get("/readyz", token=None).status == 200
    _, after, _ = attack(bwrapped, new_db, "keep('x', 1)")
    assert after["state"] == "succeeded", after


def test_processes_a_revision_leaves_behind_die_with_its_runner(bwrapped, new_db):
    marker = f"4242.{os.getpid()}"
    body = f"""
import subprocess
subprocess.Popen(['sleep', '{marker}'], start_new_session=True)
keep('forked', True)
"""
    _, job, _ = attack(bwrapped, new_db, body)
    assert job["state"] == "succeeded", job

    # runner_max_warm=0: the runner is let go after its job, its namespace with it.
    wait_until(lambda: not pids_with(marker.encode()), timeout=15)


def test_a_sqlite_target_sees_nothing_else_of_its_folder(bwrapped, tmp_path):
    folder = tmp_path / "tenants"
    folder.mkdir()
    (folder / "other-tenant.db").write_bytes(b"secret rows of another tenant")
    target = folder / "mine.db"
    body = f"""
seen = {{'listing': sorted(os.listdir({str(folder)!r}))}}
try:
    seen['other'] = open({str(folder / "other-tenant.db")!r}, 'rb').read().decode()
except OSError as e:
    seen['other'] = repr(e)
try:
    open({str(folder / "new.db")!r}, 'w').write('x')
    seen['create'] = 'created'
except OSError as e:
    seen['create'] = repr(e)
keep('seen', seen)
op.create_table('mine', sa.Column('id', sa.Integer))
"""
    c = bwrapped.client
    project, _ = setup_project(c, loot_chain(body))
    db = register_db(c, project, f"sqlite:///{target}")
    job = run_job(c, db, timeout=90)
    assert job["state"] == "succeeded", job
    seen = loot(f"sqlite:///{target}")["seen"]
    assert "other-tenant.db" not in seen["listing"], seen
    assert "No such file" in seen["other"], seen
    # A file it makes there lands in its private view (a tmpfs), never in the folder.
    assert not (folder / "new.db").exists(), seen
    # The journal stays beside the database (where SQLite's recovery looks), no lock file.
    assert sorted(p.name for p in folder.iterdir()) == [
        "mine.db",
        "mine.db-journal",
        "other-tenant.db",
    ]
    assert (folder / "mine.db-journal").stat().st_size == 0
    engine = sa.create_engine(f"sqlite:///{target}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == "r2"
    engine.dispose()


def _fleet_seeing_itself(tmp_path, names: str):
    """SQLite files named by letter, and a chain whose r2 keeps which of them it can see."""
    folder = tmp_path / "fleet"
    folder.mkdir()
    paths = {n: folder / f"{n}.db" for n in names}
    body = f"""
keep('seen', sorted(n for n, p in { ({n: str(p) for n, p in paths.items()})!r}.items()
                    if os.path.exists(p)))
"""
    return paths, loot_chain(body)


def test_a_runner_binds_one_group_of_its_projects_sqlite_files(bwrapped, tmp_path):
    """Groups in the order of the databases' names: the job of `c` sees c and d only."""
    paths, chain = _fleet_seeing_itself(tmp_path, "abcde")
    c = bwrapped.client
    project, _ = setup_project(c, chain)
    names = {
        n: register_db(c, project, f"sqlite:///{p}", name=f"{project}-{n}")
        for n, p in paths.items()
    }
    job = run_job(c, names["c"], timeout=90)
    assert job["state"] == "succeeded" and job["sandbox"] == "bwrap", job
    assert loot(f"sqlite:///{paths['c']}")["seen"] == ["c", "d"]
    job = run_job(c, names["e"], timeout=90)
    assert job["state"] == "succeeded", job
    assert loot(f"sqlite:///{paths['e']}")["seen"] == ["e"]


def test_a_rollout_with_warm_runners_gives_each_group_its_own_runner(
    backends, tmp_path_factory, tmp_path
):
    """Warm runners (and those started ahead) are per group: no job sees another group."""
    from tests.rollouts.conftest import jobs_of, wait_rollout

    server = start_serve(tmp_path_factory, "bwrap", runner_sqlite_group=2)
    try:
        paths, chain = _fleet_seeing_itself(tmp_path, "abcdef")
        c = server.client
        project, _ = setup_project(c, chain, settings={"lint": {"enabled": False}})
        for n, p in paths.items():
            register_db(c, project, f"sqlite:///{p}", name=f"{project}-{n}")
        r = c.post("/v1/rollouts", {"project": project, "max_parallel": 2})
        assert r.status == 202, r
        done = wait_rollout(c, r.body["id"], timeout=180)
        assert done["state"] == "succeeded", done
        assert {j["sandbox"] for j in jobs_of(c, done["id"])} == {"bwrap"}
        seen = {n: loot(f"sqlite:///{p}")["seen"] for n, p in paths.items()}
        assert seen == {
            "a": ["a", "b"], "b": ["a", "b"], "c": ["c", "d"],
            "d": ["c", "d"], "e": ["e", "f"], "f": ["e", "f"],
        }  # fmt: skip
    finally:
        server.stop()


def test_a_modified_cache_file_is_never_run(bwrapped, new_db):
    c = bwrapped.client
    project, bundle = setup_project(c, loot_chain("keep('ran', 'original')"))
    db = register_db(c, project, new_db("postgresql"))
    assert run_job(c, db)["state"] == "succeeded"
    cached = list(bwrapped.log_dir.glob(f"bundle-cache/p*/{bundle['id']}/versions/r2.py"))
    assert len(cached) == 1, list(bwrapped.log_dir.glob("bundle-cache/**"))
    cached[0].write_text(cached[0].read_text().replace("'original'", "'tampered'"))
    url = new_db("postgresql")
    db2 = register_db(c, project, url)
    job = run_job(c, db2)
    assert job["state"] == "succeeded", job
    assert loot(url)["ran"] == "original"
    assert "'original'" in cached[0].read_text()  # unpacked again from the state database
    events = c.get(f"/v1/audit?job={job['id']}").body["events"]
    discarded = [e for e in events if e["action"] == "bundle.cache_discarded"]
    assert discarded and "r2.py" in discarded[0]["data"]["problem"], events
    json.dumps(discarded)


def test_another_programs_commits_survive_warm_runners(tmp_path_factory, backends, tmp_path):
    """The application writes its SQLite database between jobs, in SQLite's default journal
    mode, whose commit deletes the journal: a warm runner that bound the old journal must
    never take its bytes for a hot journal and roll the application's commit back."""
    import sqlite3

    from tests.helpers import chain_bundle

    server = start_serve(tmp_path_factory, "bwrap")  # warm runners, as in production
    try:
        c = server.client
        target = tmp_path / "app.db"
        project, _ = setup_project(c, chain_bundle(6))
        db = register_db(c, project, f"sqlite:///{target}")
        app = sqlite3.connect(target)
        app.execute("CREATE TABLE app_data (n INTEGER)")
        app.commit()
        for i in range(1, 7):
            job = run_job(c, db, target=f"t{i:03d}")
            assert job["state"] == "succeeded", job
            app.execute("INSERT INTO app_data VALUES (?)", (i,))
            app.commit()  # journal_mode DELETE: the journal file is deleted here
            assert not os.path.exists(f"{target}-journal")
        rows = [n for (n,) in app.execute("SELECT n FROM app_data ORDER BY n")]
        assert rows == [1, 2, 3, 4, 5, 6]
        assert app.execute("SELECT version_num FROM alembic_version").fetchone() == ("t006",)
        assert app.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        app.close()
    finally:
        server.stop()
