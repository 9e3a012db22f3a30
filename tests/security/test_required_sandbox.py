"""RETORT_SANDBOX=bwrap refuses to run tenant code where bubblewrap cannot run."""

from __future__ import annotations

import time

from tests.helpers import chain_bundle, register_db, setup_project
from tests.security.conftest import start_serve


def test_a_required_sandbox_that_cannot_run_refuses_every_job(backends, tmp_path_factory, new_db):
    missing = tmp_path_factory.mktemp("nobwrap") / "no-bwrap"
    server = start_serve(tmp_path_factory, "bwrap", ready=False, bwrap_path=missing)
    data_dir = server.log_dir
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                ready = server.client.get("/readyz", token=None)
                if ready.status in (200, 503) and "sandbox" in ready.body:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "retort serve did not answer"
            time.sleep(0.3)
        assert ready.status == 503, ready
        assert ready.body["sandbox"]["mode"] == "process"
        assert ready.body["sandbox"]["required"] == "bwrap"
        assert "bwrap" in ready.body["checks"]["sandbox"]
        server.token = (data_dir / "admin-token").read_text().strip()
        c = server.client
        project, _ = setup_project(c, chain_bundle(2))
        db = register_db(c, project, new_db("postgresql"))
        job = c.wait_job(c.post("/v1/jobs", {"database": db}).body["id"], timeout=60)
        assert job["state"] == "failed", job
        assert job["error"]["code"] == "sandbox_unavailable", job["error"]
        assert "bwrap" in job["error"]["message"]
        assert job["steps"] == []
        assert "REQUIRED bwrap is unavailable" in (data_dir / "serve.log").read_text()
    finally:
        server.stop()
