"""Issue 17: projects' chains run with their own requirements, SQLAlchemy and variables.

Environments are built from the package index (this machine reaches PyPI); each
requirement set is built once per run (the `prod` server is shared), so the
suite pays for each build once.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import sqlalchemy as sa

from tests.helpers import register_db, revision, run_job, setup_project, tables

ENUM_EXT = "alembic-postgresql-enum==1.11.0"


PLAIN_ENV_PY = """\
from alembic import context
from sqlalchemy import create_engine

url = context.config.get_main_option("sqlalchemy.url")
with create_engine(url).connect() as connection:
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()
"""


def plain_alembic(env_python: str, files: dict[str, str], url: str, workdir) -> None:
    """`alembic upgrade head` of the same chain, with the same environment's interpreter."""
    import subprocess

    workdir.mkdir()
    for name, text in files.items():
        (workdir / name).parent.mkdir(parents=True, exist_ok=True)
        (workdir / name).write_text(text)
    (workdir / "env.py").write_text(PLAIN_ENV_PY)
    (workdir / "script.py.mako").write_text("")
    ini = workdir / "alembic.ini"
    ini.write_text(f"[alembic]\nscript_location = {workdir}\nsqlalchemy.url = {url}\n")
    out = subprocess.run(
        [env_python, "-m", "alembic", "-c", str(ini), "upgrade", "head"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr


def schema(url: str) -> dict[str, list[tuple[str, str]]]:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        inspector = sa.inspect(engine)
        return {
            t: [(col["name"], str(col["type"])) for col in inspector.get_columns(t)]
            for t in sorted(inspector.get_table_names())
        }
    finally:
        engine.dispose()


def _events(c, job_id: int) -> list[dict]:
    return c.get(f"/v1/audit?job={job_id}&limit=1000").body["events"][::-1]


def test_a_chain_that_needs_an_alembic_extension_runs_in_its_environment(prod, new_db):
    c = prod.client
    body = (
        "import alembic_postgresql_enum  # noqa: F401\n"
        "op.create_table('ext', sa.Column('id', sa.Integer, primary_key=True))"
    )
    project, _ = setup_project(
        c, {"versions/e1.py": revision("e1", None, body)}, settings={"requirements": [ENUM_EXT]}
    )
    ran = []
    for dialect in ("postgresql", "sqlite"):
        url = new_db(dialect)
        job = run_job(c, register_db(c, project, url), timeout=300)
        assert job["state"] == "succeeded", job
        assert "ext" in tables(url)
        ran.append(job)
    runtime = ran[0]["runtime"]
    assert runtime["environment"] and runtime["sqlalchemy"] and runtime["alembic"], runtime
    assert ran[1]["runtime"]["environment"] == runtime["environment"]
    # Built once for both jobs (the second found it ready).
    building = [
        e for j in ran for e in _events(c, j["id"]) if e["action"] == "environment.building"
    ]
    assert len(building) <= 1, building


def test_a_chain_written_for_sqlalchemy_1_4_runs_with_sqlalchemy_lt_2(prod, new_db, tmp_path):
    c = prod.client
    # SQLAlchemy 1.4 style: a plain string to Connection.execute (2.x refuses it).
    body = (
        "conn = op.get_bind()\n"
        "conn.execute('CREATE TABLE legacy (id INTEGER PRIMARY KEY, name VARCHAR(20))')\n"
        "conn.execute(\"INSERT INTO legacy (id, name) VALUES (1, 'one')\")"
    )
    # Both old ends of the documented range: SQLAlchemy 1.4 and Alembic 1.12.
    files = {"versions/l1.py": revision("l1", None, body)}
    project, _ = setup_project(
        c,
        files,
        settings={"requirements": ["sqlalchemy>=1.4,<2", "alembic==1.12.1", "psycopg2-binary"]},
    )
    for dialect in ("postgresql", "sqlite"):
        url = new_db(dialect)
        job = run_job(c, register_db(c, project, url), timeout=300)
        assert job["state"] == "succeeded", job
        # The same chain through plain Alembic, in the same environment: the same schema.
        env_python = prod.log_dir / "envs" / job["runtime"]["environment"] / "bin" / "python"
        plain = new_db(dialect)
        plain_url = plain.replace("postgresql+psycopg://", "postgresql+psycopg2://")
        plain_alembic(str(env_python), files, plain_url, tmp_path / f"plain-{dialect}")
        assert schema(url) == schema(plain), (schema(url), schema(plain))
        assert job["state"] == "succeeded", job
        assert job["runtime"]["sqlalchemy"].startswith("1.4."), job["runtime"]
        assert job["runtime"]["alembic"] == "1.12.1", job["runtime"]
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT name FROM legacy")).scalar() == "one"
        engine.dispose()


def test_two_projects_with_conflicting_pins_run_side_by_side(prod, new_db):
    c = prod.client
    body = "op.create_table('pins', sa.Column('id', sa.Integer, primary_key=True))"
    old, _ = setup_project(
        c,
        {"versions/p1.py": revision("p1", None, body)},
        settings={"requirements": ["sqlalchemy>=1.4,<2", "psycopg2-binary"]},
    )
    new, _ = setup_project(
        c, {"versions/p1.py": revision("p1", None, body)}, settings={"requirements": [ENUM_EXT]}
    )
    dbs = [register_db(c, p, new_db("sqlite")) for p in (old, new, old, new)]
    with ThreadPoolExecutor(4) as pool:
        jobs = list(pool.map(lambda db: run_job(c, db, timeout=300), dbs))
    assert [j["state"] for j in jobs] == ["succeeded"] * 4, jobs
    versions = [j["runtime"]["sqlalchemy"] for j in jobs]
    assert versions[0].startswith("1.4.") and versions[2].startswith("1.4.")
    assert versions[1].startswith("2.") and versions[3].startswith("2.")


def test_revisions_read_their_projects_variables_and_secrets(prod, new_db):
    c = prod.client
    body = (
        "import os\n"
        "assert os.environ['APP_SECRET'] == 'hunter2-not-shown', 'secret missing'\n"
        "op.create_table(os.environ['APP_TABLE'], sa.Column('id', sa.Integer, primary_key=True))"
    )
    name = "envproj-" + new_db("sqlite").rsplit("/", 1)[-1].split(".")[0][-8:]
    r = c.post(
        "/v1/projects",
        {
            "name": name,
            "settings": {"env": {"APP_TABLE": "from_env"}},
            "secret_env": {"APP_SECRET": "hunter2-not-shown"},
        },
    )
    assert r.status == 201, r
    assert r.body["secret_env_names"] == ["APP_SECRET"]
    assert "hunter2" not in json.dumps(r.body)
    from tests.helpers import make_tar

    up = c.post(
        f"/v1/projects/{name}/bundles",
        raw=make_tar({"versions/v1.py": revision("v1", None, body)}),
        content_type="application/gzip",
    )
    assert up.status == 201, up
    url = new_db("postgresql")
    job = run_job(c, register_db(c, name, url))
    assert job["state"] == "succeeded", job
    assert "from_env" in tables(url)
    audit = c.get(f"/v1/audit?project={name}&limit=1000")
    assert "hunter2" not in json.dumps(audit.body)
    assert "hunter2" not in json.dumps(c.get(f"/v1/projects/{name}").body)


def test_a_requirement_that_does_not_exist_fails_the_job_with_pips_message(prod, new_db):
    c = prod.client
    project, _ = setup_project(
        c,
        {"versions/n1.py": revision("n1", None)},
        settings={"requirements": ["retort-no-such-package-zz9==1.0"]},
    )
    job = run_job(c, register_db(c, project, new_db("sqlite")), timeout=300)
    assert job["state"] == "failed", job
    assert job["error"]["code"] == "environment_failed"
    assert "retort-no-such-package-zz9" in job["error"]["message"]
    assert "pip could not install" in job["error"]["message"]


def test_bad_requirement_lines_and_reserved_variables_are_refused(prod):
    c = prod.client
    r = c.post(
        "/v1/projects",
        {"name": "badreq", "settings": {"requirements": ["alembic>=1.12", "not a requirement!"]}},
    )
    assert r.status == 422, r
    assert "requirement line 2" in json.dumps(r.body)
    r = c.post("/v1/projects", {"name": "badreq", "settings": {"requirements": ["-e ."]}})
    assert r.status == 422 and "pip options" in json.dumps(r.body)
    r = c.post("/v1/projects", {"name": "badenv", "settings": {"env": {"PATH": "/x"}}})
    assert r.status == 422 and "reserved" in json.dumps(r.body)
    r = c.post("/v1/projects", {"name": "badenv", "secret_env": {"LD_PRELOAD": "/x"}})
    assert r.status == 422 and "reserved" in json.dumps(r.body)


def test_a_bundles_requirements_txt_is_used_when_the_settings_name_none(prod, new_db):
    from tests.helpers import make_tar

    c = prod.client
    body = (
        "import alembic_postgresql_enum  # noqa: F401\n"
        "op.create_table('fromfile', sa.Column('id', sa.Integer, primary_key=True))"
    )
    files = {
        "versions/f1.py": revision("f1", None, body),
        "requirements.txt": f"# the revisions' own needs\n{ENUM_EXT}\n",
    }
    project, bundle = setup_project(c, files)
    url = new_db("sqlite")
    job = run_job(c, register_db(c, project, url), timeout=300)
    assert job["state"] == "succeeded", job
    assert job["runtime"]["environment"] and "fromfile" in tables(url)
    bad = c.post(
        f"/v1/projects/{project}/bundles",
        raw=make_tar({**files, "requirements.txt": "alembic\nno such thing ==\n"}),
        content_type="application/gzip",
    )
    assert bad.status == 422, bad
    assert bad.body["error"]["details"]["line"] == 2, bad.body


def test_two_processes_needing_one_new_environment_build_it_once(tmp_path):
    """The second waits for the first's build, then uses it (no second build, no deadlock)."""
    import threading

    from service.config import Config
    from service.jobs.run.environments import Environments, spec_for

    config = Config("sqlite://", "redis://x", tmp_path, "x", ("k",), env_build_timeout_s=300)
    spec = spec_for({"requirements": [ENUM_EXT]}, None)
    seen: list[tuple[int, str]] = []
    pythons: list[str] = []

    def one(i: int) -> None:
        envs = Environments(config)
        pythons.append(str(envs.ensure(spec, lambda state, _d: seen.append((i, state)))))
        # The first holds its environment (shared) while the other finishes.
        time.sleep(1)
        envs.release_all()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(pythons) == 2 and pythons[0] == pythons[1], pythons
    assert [state for _, state in seen].count("built") == 1, seen
    assert time.monotonic() - started < 200


def test_a_source_distribution_is_refused_and_its_setup_code_never_runs(tmp_path):
    """Building an sdist would run tenant-chosen code in the worker, outside the sandbox."""
    import io
    import tarfile

    import pytest

    from service.config import Config
    from service.jobs.run.environments import EnvironmentFailed, Environments, spec_for

    marker = tmp_path / "setup-ran"
    setup = (
        f"open({str(marker)!r}, 'w').write('x')\n"
        "from setuptools import setup\n"
        "setup(name='sdistonly', version='1.0')\n"
    )
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with tarfile.open(wheels / "sdistonly-1.0.tar.gz", "w:gz") as tar:
        for name, text in {"sdistonly-1.0/setup.py": setup, "sdistonly-1.0/PKG-INFO": ""}.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    config = Config(
        "sqlite://", "redis://x", tmp_path / "data", "x", ("k",),
        env_find_links=str(wheels),
    )  # fmt: skip
    spec = spec_for({"requirements": ["sdistonly==1.0"]}, None)
    with pytest.raises(EnvironmentFailed, match="pip could not install"):
        Environments(config).ensure(spec)
    assert not marker.exists(), "the sdist's setup.py ran in the worker"
