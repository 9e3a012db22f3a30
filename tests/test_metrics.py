"""Metrics (`GET /metrics`, docs/metrics.md) and JSON log lines, on real processes."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from contextvars import copy_context

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service import logs
from service.errors import UnauthorizedError
from service.metrics import COUNTED_STATES, check_scraper
from tests.conftest import _base_env
from tests.helpers import ROOT, Retort, free_port, register_db, revision, setup_project, unique

METRICS_TOKEN = "scrape-me-" + unique("t")
JOB_ROUTE = "/v1/jobs/<id:job_id>"


def scrape(base: str, token: str | None = None) -> tuple[int, dict, str]:
    """GET base/metrics: (status, {(sample name, frozenset(labels)): value}, raw body)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(base + "/metrics", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            body = resp.read().decode()
            assert resp.headers["Content-Type"].startswith("text/plain"), resp.headers
    except urllib.error.HTTPError as exc:
        return exc.code, {}, exc.read().decode()
    samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return 200, samples, body


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def _bundle(sleep_s: float) -> dict[str, str]:
    return {
        "versions/m1.py": revision("m1", None, f"import time; time.sleep({sleep_s})"),
        "versions/m2.py": revision("m2", "m1", "pass"),
    }


# ---------------------------------------------------------------- the production layout


def test_metrics_sum_every_process_and_count_jobs_from_the_table(prod, new_db):
    c = prod.client
    base = c.base
    project, _ = setup_project(c, _bundle(2.5))
    d1 = register_db(c, project, new_db("sqlite"))
    d2 = register_db(c, project, new_db("sqlite"))
    first = c.post("/v1/jobs", {"database": d1}).body["id"]
    second = c.post("/v1/jobs", {"database": d2}).body["id"]
    c.wait_state(first, "running")
    c.wait_state(second, "running")
    # Both workers are busy (one job each, one slot each): the third stays queued
    # (and has nothing left to apply once it runs).
    third = c.post("/v1/jobs", {"database": d1, "coalesce": False}).body["id"]
    status, samples, _ = scrape(base)
    assert status == 200  # public: RETORT_METRICS_TOKEN is not set here
    assert value(samples, "retort_state_database_up") == 1
    # Every counted state of the project is there, zeros included.
    counted = {s: value(samples, "retort_jobs", project=project, state=s) for s in COUNTED_STATES}
    assert counted == {
        "queued": 1,
        "waiting_for_lock": 0,
        "running": 2,
        "waiting_for_approval": 0,
    }, counted

    jobs = [c.wait_job(j) for j in (first, second, third)]
    assert all(j["state"] == "succeeded" for j in jobs), jobs
    # Two worker processes (each with its pool process) ran them...
    assert jobs[0]["worker"] != jobs[1]["worker"], jobs
    steps = sum(1 for j in jobs for s in j["steps"] if s["state"] == "applied")
    assert steps == 4
    status, samples, body = scrape(base)
    assert status == 200
    # ...and /metrics sums what each of them observed.
    assert value(samples, "retort_job_finished_total", project=project, state="succeeded") == 3
    for name in ("queue_wait", "lock_wait", "duration"):
        count = value(samples, f"retort_job_{name}_seconds_count", project=project)
        assert count == 3, (name, count)
    assert value(samples, "retort_job_duration_seconds_sum", project=project) >= 2 * 2.5
    up = {"project": project, "direction": "up"}
    assert value(samples, "retort_revision_duration_seconds_count", **up) == steps
    assert value(samples, "retort_revision_duration_seconds_sum", **up) >= 2 * 2.5
    assert all(value(samples, "retort_jobs", project=project, state=s) == 0 for s in COUNTED_STATES)
    # Request latency by route (the URL rule), never by path; /metrics is not observed.
    reads = value(
        samples,
        "retort_http_request_duration_seconds_count",
        method="GET",
        route=JOB_ROUTE,
        status="200",
    )
    assert reads and reads >= 3
    routes = {dict(labels).get("route") for (_, labels) in samples}
    assert "/metrics" not in routes and f"/v1/jobs/{first}" not in routes
    # Never a label per database or per job.
    assert all("database" not in dict(labels) for (_, labels) in samples)
    assert d1 not in body and d2 not in body


# ---------------------------------------------------------------- a stack of its own


@pytest.fixture(scope="module")
def observed(backends, tmp_path_factory):
    """`retort serve` with JSON logs and a scrape token, plus a worker with --metrics-port."""
    data_dir = tmp_path_factory.mktemp("observed")
    stale = data_dir / "metrics" / "counter_999999999.db"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"left by a stack that stopped")
    port, metrics_port = free_port(), free_port()
    env = _base_env(data_dir)
    env.pop("RETORT_ADMIN_TOKEN")
    env.update({"RETORT_LOG_FORMAT": "json", "RETORT_METRICS_TOKEN": METRICS_TOKEN})
    server = Retort(env, port, "", data_dir)
    try:
        serve = [sys.executable, "-m", "service.cli", "serve", "--port", str(port)]
        server.spawn("serve", [*serve, "--data-dir", str(data_dir)])
        server.wait_ready()
        server.token = (data_dir / "admin-token").read_text().strip()
        # `retort serve` starts every process of the machine: it clears the folder first.
        assert not stale.exists()
        worker = [sys.executable, "-m", "service.cli", "worker", "--concurrency", "1"]
        server.spawn(
            "extra-worker", [*worker, "--name", "extra", "--metrics-port", str(metrics_port)]
        )
        server.metrics_base = f"http://127.0.0.1:{metrics_port}"  # type: ignore[attr-defined]
        deadline = time.monotonic() + 60
        while True:  # it listens once the worker is ready
            try:
                if scrape(server.metrics_base, METRICS_TOKEN)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, server.logs()[-3000:]
            time.sleep(0.2)
        yield server
    finally:
        server.stop()


def test_a_scrape_token_refuses_other_scrapers_with_the_api_error_document(observed):
    base = observed.client.base
    for token in (None, "wrong", observed.token):  # the admin token is not the scrape token
        status, _, body = scrape(base, token)
        assert status == 401, body
        assert json.loads(body)["error"]["code"] == "unauthorized"
    status, samples, _ = scrape(base, METRICS_TOKEN)
    assert status == 200 and value(samples, "retort_state_database_up") == 1
    # A worker's own port asks for the same token.
    status, _, body = scrape(observed.metrics_base, "wrong")
    assert status == 401 and json.loads(body)["error"]["code"] == "unauthorized"


def test_json_log_lines_name_the_job_project_and_database(observed, new_db):
    c = observed.client
    project, _ = setup_project(c, _bundle(30), settings={"max_duration_s": 1})
    db = register_db(c, project, new_db("sqlite"))
    job = c.post("/v1/jobs", {"database": db}).body["id"]
    done = c.wait_job(job, timeout=60)
    assert done["state"] == "failed" and done["error"]["code"] == "timeout", done

    # Counted once, whichever of the machine's workers ran it; both ports agree.
    for base in (c.base, observed.metrics_base):
        _, samples, _ = scrape(base, METRICS_TOKEN)
        assert value(samples, "retort_job_finished_total", project=project, state="failed") == 1
    _, samples, _ = scrape(observed.metrics_base, METRICS_TOKEN)
    assert not any(name == "retort_jobs" for name, _ in samples)  # the table: the API's

    # `retort serve`'s processes write to logs/ (Redis, not Python, aside); the extra
    # worker to the harness's file.
    serve_logs = observed.log_dir / "logs"
    python_logs = [serve_logs / f"{n}.log" for n in ("api", "worker", "sweeper", "webhooks")]
    python_logs.append(observed.log_dir / "extra-worker.log")
    lines = []
    for log in python_logs:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                lines.append(json.loads(line))
    assert lines and all({"ts", "level", "logger", "message"} <= set(d) for d in lines)
    about_job = [d for d in lines if d.get("job") == job and d["logger"] == "retort.worker"]
    assert about_job, lines[-20:]
    assert all(d["project"] == project and d["database"] == db for d in about_job), about_job
    assert any("killing its runner" in d["message"] for d in about_job), about_job
    loggers = {d["logger"] for d in lines}
    assert {"gunicorn.access", "retort.sweeper"} <= loggers, loggers
    # gunicorn's lines, Celery's, Python's warnings and the sweeper's are JSON too:
    # the only text lines are Celery's shutdown notices.
    for log in python_logs:
        text = [
            line
            for line in log.read_text(errors="replace").splitlines()
            if line.strip() and not line.startswith("{")
        ]
        assert all(line.startswith("worker: ") for line in text), (log, text[:20])
    # And the terminal has serve's own lines only.
    own = ("Retort is ", "  ", "Next, ", "Press Ctrl-C")
    terminal = (observed.log_dir / "serve.log").read_text(errors="replace").splitlines()
    assert all(line.startswith(own) for line in terminal), terminal


def test_api_lines_name_the_database_or_job_of_the_url(observed):
    from service.app import create_app
    from service.config import Config

    app = create_app(Config.from_env(env=observed.env))
    seen = []

    @app.get("/v1/databases/<name>/log-probe")
    def probe(name):
        seen.append(logs.context())
        return {}

    client = app.test_client()
    r = client.get("/v1/databases/orders/log-probe", headers={"Authorization": "Bearer x"})
    assert r.status_code == 401 and seen == []
    headers = {"Authorization": f"Bearer {observed.token}"}
    assert client.get("/v1/databases/orders/log-probe", headers=headers).status_code == 200
    assert seen == [{"database": "orders"}]
    assert logs.context() == {}  # nothing left for the thread's next request
    app.extensions["retort"].engine.dispose()


# ---------------------------------------------------------------- units


def test_the_json_formatter_writes_one_object_with_the_bound_fields():
    formatter = logs.formatter("json")
    logger = logging.getLogger("retort.test")

    def line(msg: str, **kw) -> dict:
        record = logger.makeRecord(logger.name, logging.WARNING, __file__, 1, msg, (), None, **kw)
        return json.loads(formatter.format(record))

    assert set(line("plain")) == {"ts", "level", "logger", "message"}
    with logs.bound(job=7, project="shop"):
        logs.bind(database="orders")
        doc = line("step %s\nnext")
        assert doc["job"] == 7 and doc["project"] == "shop" and doc["database"] == "orders"
        assert doc["level"] == "WARNING" and doc["logger"] == "retort.test"
        assert doc["message"] == "step %s\nnext" and doc["ts"].endswith("Z")
        # A thread started in the job's context (the lease heartbeat) says so too.
        in_thread = []
        ctx = copy_context()
        t = threading.Thread(target=ctx.run, args=(lambda: in_thread.append(line("hb")),))
        t.start()
        t.join()
        assert in_thread[0]["job"] == 7
        assert line("x", extra={"job": 8})["job"] == 8
    assert "job" not in line("after") and logs.context() == {}
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logger.makeRecord(
            logger.name, logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    assert "RuntimeError: boom" in json.loads(formatter.format(record))["exception"]
    with pytest.raises(ValueError, match="RETORT_LOG_FORMAT"):
        logs.formatter("xml")


def test_a_scrape_token_is_checked_only_when_set():
    check_scraper("", "")
    check_scraper("s3cret", "Bearer s3cret")
    for sent in ("", "Bearer nope", "Basic s3cret", "s3cret"):
        with pytest.raises(UnauthorizedError):
            check_scraper("s3cret", sent)


def test_forked_processes_write_their_own_files_and_a_scrape_sums_them(tmp_path):
    """What gunicorn and Celery prefork do: configure once, fork, observe in each child."""
    script = textwrap.dedent(
        f"""
        import os
        from service.config import Config
        from service import metrics

        config = Config.from_env(env={{"RETORT_DATA_DIR": {str(tmp_path)!r}}})
        metrics.configure(config)
        children = []
        for i in range(3):
            pid = os.fork()
            if pid == 0:
                metrics.revision_applied("shop", "up", 10.0 * (i + 1))
                metrics.lease_takeovers({{"recovering": [1], "failed": []}})
                metrics.webhook_delivery(True, None)
                os._exit(0)
            children.append(pid)
        for pid in children:
            os.waitpid(pid, 0)
            metrics.process_exited(pid)
        body, _ = metrics.render(config, None)
        print(body.decode())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    samples = {}
    for family in text_string_to_metric_families(out.stdout):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    up = {"project": "shop", "direction": "up"}
    assert value(samples, "retort_revision_duration_seconds_count", **up) == 3
    assert value(samples, "retort_revision_duration_seconds_sum", **up) == pytest.approx(0.06)
    assert value(samples, "retort_lease_takeovers_total", outcome="recovering") == 3
    assert value(samples, "retort_webhook_deliveries_total", outcome="delivered") == 3
    assert len(list((tmp_path / "metrics").glob("histogram_*.db"))) == 3  # one per child
