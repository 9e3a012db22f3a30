"""Bundles shaped like their repository: versions_path, python_path, and what env.py becomes."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import sqlalchemy as sa

from tests.helpers import (
    ROOT,
    chain_bundle,
    make_tar,
    register_db,
    revision,
    run_job,
    setup_project,
)

VERSIONS = "app/db/migrations/versions"

TYPES_PY = '''"""The application's own column types."""
import sqlalchemy as sa


class Money(sa.types.TypeDecorator):
    impl = sa.Numeric(12, 2)
    cache_ok = True
'''

MODELS_PY = """from myapp.types import Money  # noqa: F401

INVOICES = "invoices"
"""

ENV_PY = """from alembic import context

target_metadata = None


def run_migrations_online():
    connectable = None
    with connectable.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            version_table='custom',
            transaction_per_migration=False,
        )
        with context.begin_transaction():
            context.run_migrations()
"""

ALEMBIC_INI = """[alembic]
script_location = app/db/migrations
prepend_sys_path = .
sqlalchemy.url = postgresql://app:s3cret@db.internal/app
"""


def repo_revisions(prefix: str = VERSIONS) -> dict[str, str]:
    """Two revisions that use the application's Money type: imported at load and inside upgrade."""
    return {
        f"{prefix}/r1_invoices.py": revision(
            "r1",
            None,
            "op.create_table('invoices', sa.Column('id', sa.Integer, primary_key=True), "
            "sa.Column('total', Money()))",
            "op.drop_table('invoices')",
            head="from myapp.types import Money",
        ),
        f"{prefix}/r2_tax.py": revision(
            "r2",
            "r1",
            """
            from myapp.models import INVOICES
            from myapp.types import Money
            op.add_column(INVOICES, sa.Column('tax', Money()))
            """,
            "op.drop_column('invoices', 'tax')",
        ),
    }


def repository(**extra: str) -> dict[str, str]:
    """An archive shaped like the repository: helpers at the root, versions three folders down."""
    return {
        "README.md": "# the service\n",
        "myapp/__init__.py": "",
        "myapp/types.py": TYPES_PY,
        "myapp/models.py": MODELS_PY,
        "app/__init__.py": "",
        "app/db/migrations/script.py.mako": "${upgrades}\n",
        **repo_revisions(),
        **extra,
    }


def upload(client, project, files, **query):
    params = "&".join(
        f"{k}={v}"
        for k, values in query.items()
        for v in ([values] if isinstance(values, str) else values)
    )
    path = f"/v1/projects/{project}/bundles" + (f"?{params}" if params else "")
    return client.post(path, raw=make_tar(files), content_type="application/gzip")


def columns(url: str, table: str) -> dict[str, str]:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        return {c["name"]: str(c["type"]) for c in sa.inspect(engine).get_columns(table)}
    finally:
        engine.dispose()


# ---------------------------------------------------------------- the API


def test_a_repository_shaped_bundle_runs_on_sqlite_and_postgresql(retort, new_db):
    c = retort.client
    project, _ = setup_project(c)
    r = upload(c, project, repository(), versions_path=VERSIONS, python_path=".")
    assert r.status == 201, r
    bundle = r.body
    assert bundle["versions_path"] == VERSIONS and bundle["python_path"] == ["."]
    assert bundle["revisions"] == ["r1", "r2"] and bundle["notices"] == []
    assert c.get(f"/v1/projects/{project}/bundles/latest").body["python_path"] == ["."]

    for dialect in ("sqlite", "postgresql"):
        url = new_db(dialect)
        db = register_db(c, project, url)
        job = run_job(c, db, action="upgrade", target="head")
        assert job["state"] == "succeeded", job
        assert [s["revisions"] for s in job["steps"]] == [["r1"], ["r2"]]
        cols = columns(url, "invoices")
        assert set(cols) == {"id", "total", "tax"}, cols
        assert cols["total"].startswith("NUMERIC(12") and cols["tax"].startswith("NUMERIC(12")
        # Again, from the warm runner, down and up: the helpers are found every time.
        job = run_job(c, db, action="downgrade", target="base")
        assert job["state"] == "succeeded", job
        job = run_job(c, db, action="upgrade", target="head")
        assert job["state"] == "succeeded", job


def test_the_digest_covers_the_shape_and_keeps_old_ids(prod):
    c = prod.client
    project, _ = setup_project(c)
    # Without python_path the digest is what it always was: every file's path and sha256.
    files = chain_bundle(2, prefix="d")
    plain = upload(c, project, files)
    assert plain.status == 201, plain
    data = {name: content.encode() for name, content in files.items()}
    old = hashlib.sha256(
        "".join(f"{p}\0{hashlib.sha256(data[p]).hexdigest()}\n" for p in sorted(data)).encode()
    ).hexdigest()
    assert plain.body["id"] == old
    # Naming the versions folder auto-detection finds changes nothing.
    same = upload(c, project, files, versions_path="versions")
    assert same.status == 200 and same.body["id"] == old

    # The same files with another python_path are another bundle.
    repo = repository()
    found = upload(c, project, repo)  # the only versions/ folder: found, but no helpers path
    assert found.status == 201 and found.body["versions_path"] == VERSIONS
    root = upload(c, project, repo, python_path=".")
    assert root.status == 201 and root.body["id"] != found.body["id"]
    both = upload(c, project, repo, python_path=[".", "app"])
    assert both.status == 201 and both.body["python_path"] == [".", "app"]
    assert both.body["id"] not in (found.body["id"], root.body["id"])
    # Comma-separated is the same as repeated.
    again = upload(c, project, repo, python_path=".,app")
    assert again.status == 200 and again.body["id"] == both.body["id"]


def test_an_ambiguous_archive_is_refused_until_versions_path_names_one(prod):
    c = prod.client
    project, _ = setup_project(c)
    files = repository(**{"tests/fixtures/old/versions/x1.py": revision("x1", None)})
    r = upload(c, project, files)
    assert r.status == 422, r
    error = r.body["error"]
    assert error["code"] == "ambiguous_versions_path"
    assert VERSIONS in error["message"] and "tests/fixtures/old/versions" in error["message"]
    assert "versions_path" in error["message"] and error["details"]["field"] == "versions_path"
    assert error["details"]["versions_dirs"] == [VERSIONS, "tests/fixtures/old/versions"]

    r = upload(c, project, files, versions_path=VERSIONS, python_path=".")
    assert r.status == 201 and r.body["revisions"] == ["r1", "r2"], r

    r = upload(c, project, files, versions_path="app/db/nowhere")
    assert r.status == 422 and "no such folder" in r.body["error"]["message"], r
    r = upload(c, project, files, versions_path="app/db")
    assert r.status == 422 and "holds no revision scripts" in r.body["error"]["message"], r


def test_python_path_entries_must_be_folders_with_python_files(prod):
    c = prod.client
    project, _ = setup_project(c)
    cases = {
        "missing": ("lib", "no such folder"),
        "a file": ("README.md", "no such folder"),
        "no .py": ("docs", "holds no .py files"),
        "escape": ("../outside", "'..' is not allowed"),
        "absolute": ("/etc", "relative to the archive's root"),
    }
    files = repository(**{"docs/guide.md": "# guide\n"})
    for label, (entry, text) in cases.items():
        r = upload(c, project, files, versions_path=VERSIONS, python_path=[".", entry])
        assert r.status == 422, (label, r)
        assert r.body["error"]["details"]["field"] == "python_path", (label, r)
        assert text in r.body["error"]["message"], (label, r)
    r = upload(c, project, files, versions_path=VERSIONS, nonsense="1")
    assert r.status == 422 and r.body["error"]["details"]["field"] == "nonsense", r
    assert c.get(f"/v1/projects/{project}/bundles/latest").status == 404


def test_a_missing_module_names_the_revision_the_module_and_the_fixes(prod, new_db):
    c = prod.client
    project, _ = setup_project(c)
    files = repository(
        **{
            f"{VERSIONS}/r3_report.py": revision(
                "r3", "r2", head="\nimport myapp.reports\nfrom billing_shared.money import cents"
            ),
        }
    )
    # myapp is on the path; billing_shared is in neither the bundle nor the environment.
    r = upload(c, project, files, python_path=".")
    assert r.status == 201, r
    db = register_db(c, project, new_db("sqlite"))
    job = run_job(c, db, action="upgrade", target="head")
    assert job["state"] == "failed", job
    error = job["error"]
    assert error["code"] == "bundle_load_failed", error
    assert error["revision"] == "r3"
    assert error["file"] == f"{VERSIONS}/r3_report.py"
    source = files[f"{VERSIONS}/r3_report.py"].splitlines()
    assert source[error["line"] - 1].startswith("import myapp.reports"), error
    message = error["message"]
    assert f"revision r3 ({VERSIONS}/r3_report.py, line {error['line']})" in message
    assert "'myapp.reports'" in message
    assert (
        "add it to the project's requirements (settings.requirements or the bundle's "
        "requirements.txt), or include the folder that holds it with --python-path"
    ) in message
    assert "import path: ." in message
    # The runner names the module; the job's error keeps it where the worker passes it on.
    assert error.get("module", "myapp.reports") == "myapp.reports"
    assert not job["steps"]

    # Without python_path the folder holding versions/ is the one on the path: myapp is not found.
    other, _ = setup_project(c)
    r = upload(c, other, repository())
    assert r.status == 201, r
    db = register_db(c, other, new_db("sqlite"))
    job = run_job(c, db, action="upgrade", target="head")
    error = job["error"]
    assert error["code"] == "bundle_load_failed" and error["revision"] == "r1", error
    assert error["file"] == f"{VERSIONS}/r1_invoices.py"
    assert "'myapp'" in error["message"] and "--python-path" in error["message"]
    assert "import path: app/db/migrations" in error["message"]


def test_the_upload_answer_says_env_py_is_not_run_and_what_it_sets(prod):
    c = prod.client
    project, _ = setup_project(c, settings={"version_table": "alembic_version"})
    files = repository(
        **{"app/db/migrations/env.py": ENV_PY, "alembic.ini": ALEMBIC_INI},
    )
    r = upload(c, project, files, versions_path=VERSIONS, python_path=".")
    assert r.status == 201, r
    notices = {n["code"] + ":" + (n["setting"] or ""): n for n in r.body["notices"]}
    ignored = notices["env_py_ignored:"]
    assert ignored["level"] == "info" and ignored["file"] == "app/db/migrations/env.py"
    for setting in (
        "version_table",
        "version_table_schema",
        "naming_convention",
        "lock_timeout_ms",
        "statement_timeout_ms",
        "requirements",
        "env",
    ):
        assert setting in ignored["message"]
    assert "never executed" in ignored["message"]
    table = notices["setting_differs:version_table"]
    assert (
        table["level"] == "warning"
        and table["line"] == ENV_PY.splitlines().index("            version_table='custom',") + 1
    )
    assert "'custom'" in table["message"] and "'alembic_version'" in table["message"]
    assert notices["setting_unsupported:transaction_per_migration"]["file"].endswith("env.py")
    url = notices["sqlalchemy_url_ignored:sqlalchemy.url"]
    assert url["file"] == "alembic.ini" and url["line"] == 4
    assert "password" in url["message"] and "s3cret" not in json.dumps(r.body)
    # alembic.ini is read for the notices only: not one of the bundle's files.
    assert r.body["files"] == len(files) - 1
    # The same bundle with the project's version_table set to env.py's: no warning about it.
    c.request("PATCH", f"/v1/projects/{project}", {"settings": {"version_table": "custom"}})
    again = upload(c, project, files, versions_path=VERSIONS, python_path=".")
    assert again.status == 200 and again.body["id"] == r.body["id"]
    codes = {(n["code"], n["setting"]) for n in again.body["notices"]}
    assert ("setting_differs", "version_table") not in codes
    assert ("env_py_ignored", None) in codes


# ---------------------------------------------------------------- retort push


def retort_cli(server, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETORT_")}
    env.update({"RETORT_URL": f"http://127.0.0.1:{server.port}", "RETORT_TOKEN": server.token})
    out = subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert "Traceback" not in out.stdout + out.stderr, out.stderr
    return out


def checkout(root: Path) -> Path:
    """A repository as it is checked out: alembic.ini with a URL, env.py, a helper package."""
    files = {
        "README.md": "# the service\n",
        "alembic.ini": ALEMBIC_INI,
        ".git/config": "[core]\n",
        ".env": "SECRET=1\n",
        "app/__init__.py": "",
        "app/views.py": "VIEWS = []\n",
        "app/db/migrations/env.py": ENV_PY,
        "app/db/migrations/script.py.mako": "${upgrades}\n",
        "src/myapp/__init__.py": "",
        "src/myapp/types.py": TYPES_PY,
        "src/myapp/models.py": MODELS_PY,
        "src/myapp/__pycache__/types.cpython-311.pyc": "x",
        **repo_revisions(),
    }
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    return root


def test_push_packs_a_checkout_in_its_shape_and_prints_the_notices(prod, new_db, tmp_path):
    from service.client import pack_checkout

    repo = checkout(tmp_path / "repo")
    packed = pack_checkout(repo, VERSIONS, ["src"])
    with tarfile.open(fileobj=io.BytesIO(packed.tar_gz)) as tar:
        names = sorted(tar.getnames())
    assert names == sorted(
        [
            f"{VERSIONS}/r1_invoices.py",
            f"{VERSIONS}/r2_tax.py",
            "src/myapp/__init__.py",
            "src/myapp/models.py",
            "src/myapp/types.py",
        ]
    )
    assert set(packed.scanned) == {"app/db/migrations/env.py", "alembic.ini"}

    project, _ = setup_project(prod.client)
    out = retort_cli(
        prod, "push", project, str(repo), "--versions", VERSIONS, "--python-path", "src"
    )
    assert out.returncode == 0, out.stderr
    assert "(new)" in out.stdout and "2 revisions" in out.stdout and "heads: r2" in out.stdout
    assert "notice: app/db/migrations/env.py: Retort does not run env.py" in out.stderr
    assert "not uploaded" in out.stderr
    assert "version_table='custom'" in out.stderr and "warning:" in out.stderr
    assert "alembic.ini line 4 sets sqlalchemy.url" in out.stderr
    assert "s3cret" not in out.stdout + out.stderr

    bundle = prod.client.get(f"/v1/projects/{project}/bundles/latest").body
    assert bundle["versions_path"] == VERSIONS and bundle["python_path"] == ["src"]
    assert bundle["files"] == 5

    doc = retort_cli(
        prod, "push", project, str(repo), "--versions", VERSIONS, "--python-path", "src", "--json"
    )
    assert doc.returncode == 0, doc.stderr
    body = json.loads(doc.stdout)
    assert body["id"] == bundle["id"] and body["created"] is False
    codes = {(n["code"], n["setting"]) for n in body["notices"]}
    assert ("env_py_ignored", None) in codes and ("setting_differs", "version_table") in codes

    # What was pushed runs: the helper package is found on the runner's path.
    db = register_db(prod.client, project, new_db("sqlite"))
    job = run_job(prod.client, db, action="upgrade", target="head")
    assert job["state"] == "succeeded", job

    # Usage errors: exit 2, nothing pushed.
    bad = retort_cli(prod, "push", project, str(repo), "--python-path", "src")
    assert bad.returncode == 2 and "--versions" in bad.stderr
    bad = retort_cli(prod, "push", project, str(repo), "--versions", "nowhere")
    assert bad.returncode == 2 and "nowhere" in bad.stderr


# ---------------------------------------------------------------- the runner


def test_a_warm_runner_switching_bundles_forgets_the_previous_ones_modules(tmp_path):
    from service.jobs.run.migrate import Runner

    def bundle(name: str, value: str) -> dict:
        root = tmp_path / name
        (root / "lib/shared").mkdir(parents=True)
        (root / "lib/shared/__init__.py").write_text(f"VALUE = {value!r}\n")
        (root / "versions").mkdir()
        (root / "versions/a.py").write_text(
            revision("a", None, "pass", head="from shared import VALUE")
        )
        return {
            "dir": str(root),
            "digest": name,
            "versions_path": "versions",
            "helpers": True,
            "python_path": ["lib"],
        }

    runner = Runner(None)  # type: ignore[arg-type]
    first, second = bundle("one", "first"), bundle("two", "second")
    before = list(sys.path)
    try:
        script = runner.scripts({"bundle": first})
        assert sys.path[0] == str(tmp_path / "one/lib")
        assert script.get_revision("a").module.VALUE == "first"
        runner.import_path.leave()
        assert sys.path == before
        assert sys.modules["shared"].VALUE == "first"  # kept for this bundle's next job

        script = runner.scripts({"bundle": second})
        assert script.get_revision("a").module.VALUE == "second"
        assert (
            sys.path[0] == str(tmp_path / "two/lib") and str(tmp_path / "one/lib") not in sys.path
        )
        runner.import_path.leave()
        assert "one" not in runner._scripts  # its scripts held the forgotten modules
        script = runner.scripts({"bundle": first})
        assert script.get_revision("a").module.VALUE == "first"
    finally:
        runner.import_path.leave()
        sys.modules.pop("shared", None)
        sys.path[:] = before
