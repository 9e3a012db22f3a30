"""The OpenAPI document: generated from the handlers' own schemas, and fuzzed for real."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import _base_env
from tests.helpers import Retort, chain_bundle, free_port, register_db, run_job, setup_project


def test_the_document_describes_every_route_with_the_handlers_schemas(prod):
    from service.jobs.schemas import JobCreate
    from service.openapi import REF

    c = prod.client
    r = c.get("/v1/openapi.json", token=None)  # public: clients generate code from it
    assert r.status == 200 and r.body["openapi"] == "3.1.0"
    spec = r.body
    documented = {(p, m.upper()) for p, ops in spec["paths"].items() for m in ops}
    # Every /v1 route the app serves is in the document.
    from service.app import create_app
    from service.config import Config

    app = create_app(Config.from_env(env=prod.env))
    served = set()
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/v1/") and rule.rule != "/v1/openapi.json":
            path = rule.rule
            for arg in rule.arguments:
                path = path.replace(f"<id:{arg}>", f"{{{arg}}}").replace(f"<{arg}>", f"{{{arg}}}")
            served |= {(path, m) for m in rule.methods - {"HEAD", "OPTIONS"}}
    assert served == documented, served ^ documented
    # The request schema is the class the handler validates with, not a copy.
    expected = JobCreate.model_json_schema(ref_template=REF)
    assert spec["components"]["schemas"]["JobCreate"] == expected
    post_jobs = spec["paths"]["/v1/jobs"]["post"]
    assert post_jobs["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/JobCreate"
    }
    assert post_jobs["x-retort-role"] == "deployer"
    assert "202" in post_jobs["responses"] and "4XX" in post_jobs["responses"]

    page = c.get("/docs", token=None)
    assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
    assert "/v1/openapi.json" in page.body and "<script>" in page.body


@pytest.fixture(scope="module")
def fuzz_target(backends, tmp_path_factory):
    """A Retort of its own (it gets thousands of random writes), with some real objects."""
    data_dir = tmp_path_factory.mktemp("fuzz")
    port = free_port()
    env = _base_env(data_dir)
    env["RETORT_CONNECT_TIMEOUT_S"] = "1"
    env["RETORT_CONNECT_ATTEMPTS"] = "1"
    server = Retort(env, port, env["RETORT_ADMIN_TOKEN"], data_dir)
    cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(port)]
    server.spawn("serve", [*cmd, "--data-dir", str(data_dir)])
    try:
        server.wait_ready()
        c = server.client
        project, _ = setup_project(c, chain_bundle(2), name="fuzz")
        targets = tmp_path_factory.mktemp("fuzz-targets")  # never in the data directory
        db = register_db(c, project, backends.new("sqlite", targets), name="fuzzdb")
        run_job(c, db)
        c.post(
            f"/v1/projects/{project}/webhooks",
            {"url": "http://127.0.0.1:9/h", "events": ["job.failed"]},
        )
        yield server
    finally:
        server.stop()


def test_schemathesis_finds_no_server_error_and_no_nonconforming_response(fuzz_target, tmp_path):
    st = shutil.which("st") or str(Path(sys.executable).parent / "st")
    report = tmp_path / "report.json"
    cmd = [
        st,
        "run",
        f"http://127.0.0.1:{fuzz_target.port}/v1/openapi.json",
        "--header",
        f"Authorization: Bearer {fuzz_target.token}",
        "--checks",
        "all",
        # A random but valid request for an object that does not exist is a
        # correct 404, which this check would count as a failure.
        "--exclude-checks",
        "positive_data_acceptance",
        "--max-examples",
        os.environ.get("RETORT_FUZZ_EXAMPLES", "25"),
        "--phases",
        "examples,coverage,fuzzing,stateful",
        # One worker: with two threads, hypothesis's ast.parse of a filter's lambda
        # crashed CPython 3.11 once in CI ("AST constructor recursion depth mismatch",
        # a SystemError inside schemathesis while every case passed).
        "--workers",
        "1",
        "--seed",
        "20261121",
        "--generation-database",
        "none",
        "--request-timeout",
        "20",
        "--no-color",
        "--report",
        "json",
        "--report-json-path",
        str(report),
    ]
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks",
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    tail = (out.stdout + out.stderr)[-6000:]
    assert out.returncode == 0, tail
    report = json.loads(report.read_text())
    assert report["failures"] == [] and report["errors"] == [], tail
    assert report["operations"]["tested"] == report["operations"]["total"] >= 24
    assert report["test_cases"]["generated"] >= 500, report["test_cases"]
    assert report["phases"]["stateful"]["status"] == "success", report["phases"]
    logs = fuzz_target.logs()
    assert "Traceback" not in logs and "unhandled error" not in logs


def test_the_root_leads_to_the_docs(prod):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", prod.port, timeout=10)
    conn.request("GET", "/")
    resp = conn.getresponse()
    assert resp.status == 302 and resp.getheader("Location") == "/docs"
    conn.close()
    page = prod.client.get("/docs", token=None)
    assert page.status == 200
