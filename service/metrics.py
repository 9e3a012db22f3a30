"""Prometheus metrics: what every Retort process of a machine observes, and the job table.

Each process writes what it observes to files of its own in one folder per
machine (RETORT_METRICS_DIR; prometheus_client's multiprocess mode), so the
API's `GET /metrics`, or a worker's `--metrics-port`, sums every gunicorn
process, Celery pool process, webhook sender and sweeper of that machine.
How many jobs are in each active state is read from the state database at
scrape time instead: the job table is the record of truth, and no one
process could keep that count right.

Every hook elsewhere is one call of a function here. Each is a no-op until
`configure` ran in the process (the CLI's other commands, tests' in-process
apps): only a server's entry point turns metrics on, before it forks.
"""

from __future__ import annotations

import datetime as dt
import hmac
import json
import logging
import os
import threading
from collections.abc import Iterator
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from service.db import utcnow
from service.errors import UnauthorizedError
from service.jobs.models import Job
from service.jobs.states import BUSY_STATES
from service.projects.models import Project

if TYPE_CHECKING:
    from service.config import Config
    from service.jobs.run.context import JobContext

log = logging.getLogger("retort.metrics")

# The states `retort_jobs` counts (finished jobs are counted as they end).
COUNTED_STATES = BUSY_STATES
# A scrape's look at the job table gives up after this long (PostgreSQL).
SCRAPE_TIMEOUT_MS = 5000

_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
_JOB_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600)
_STEP_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 5, 10, 60, 300, 1800, 3600)
_HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

_jobs = Job.__table__
_ACTIVE_COUNTS = (
    select(_jobs.c.project_id, _jobs.c.state, func.count())
    .where(_jobs.c.state.in_(COUNTED_STATES))  # ix_jobs_state_id: active jobs only
    .group_by(_jobs.c.project_id, _jobs.c.state)
)
_PROJECT_NAMES = select(Project.__table__.c.id, Project.__table__.c.name)


class _Metrics:
    """This process's counters and histograms (labels: never a job id or a database)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
            return Counter(name, doc, labels, registry=None)

        def histogram(name: str, doc: str, labels: tuple[str, ...], buckets) -> Any:
            return Histogram(name, doc, labels, buckets=buckets, registry=None)

        self.job_finished = counter(
            "retort_job_finished_total", "Jobs a worker ended, by final state", ("project", "state")
        )
        self.queue_wait = histogram(
            "retort_job_queue_wait_seconds",
            "From a job's creation to its start (lease and lock waits included)",
            ("project",),
            _WAIT_BUCKETS,
        )
        self.lock_wait = histogram(
            "retort_job_lock_wait_seconds",
            "Time a job waited for its database's lease and the target's lock",
            ("project",),
            _WAIT_BUCKETS,
        )
        self.job_duration = histogram(
            "retort_job_duration_seconds",
            "From a job's start to its end",
            ("project",),
            _JOB_BUCKETS,
        )
        self.revision_duration = histogram(
            "retort_revision_duration_seconds",
            "Duration of each applied migration step, as its runner measured it",
            ("project", "direction"),
            _STEP_BUCKETS,
        )
        self.takeovers = counter(
            "retort_lease_takeovers_total",
            "Jobs the sweeper took from a lost worker: queued again or failed",
            ("outcome",),
        )
        self.fenced_out = counter(
            "retort_fenced_out_writes_total",
            "Writes refused because the writer no longer held its database's lease",
        )
        self.webhooks = counter(
            "retort_webhook_deliveries_total",
            "Webhook delivery attempts, by outcome",
            ("outcome",),
        )
        self.http = histogram(
            "retort_http_request_duration_seconds",
            "API requests by route (the URL rule), method and status",
            ("method", "route", "status"),
            _HTTP_BUCKETS,
        )


# This process's metrics, as prometheus_client's own values are per process
# (its files are named by pid). None: metrics are off here.
_metrics: _Metrics | None = None


def configure(config: Config) -> None:
    """Write this process's metrics to the machine's folder; call before forking.

    prometheus_client decides where values live when it is first imported:
    PROMETHEUS_MULTIPROC_DIR must be set by then, so a server's entry point
    calls this before anything imports it. Processes forked afterwards (gunicorn
    workers, Celery pool processes) inherit it and write files of their own pid.
    """
    global _metrics
    if _metrics is not None:
        return
    directory = config.metrics_path
    directory.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    from prometheus_client import values

    if not getattr(values.ValueClass, "_multiprocess", False):
        log.error(
            "metrics are off in this process: prometheus_client was imported before "
            "PROMETHEUS_MULTIPROC_DIR was set"
        )
        return
    _metrics = _Metrics()


def clear(config: Config) -> None:
    """Remove every process's metrics files: only while no Retort process of the machine runs."""
    for path in config.metrics_path.glob("*.db"):
        path.unlink(missing_ok=True)


def process_exited(pid: int) -> None:
    """A process of this machine is gone: drop its live gauges (its counts stay summed)."""
    if _metrics is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)


# ------------------------------------------------------------------ hooks


def job_ended(ctx: JobContext) -> None:
    """Count a job this run ended, with its waits and duration, from what its writes set.

    No query: `ctx.ended` is the final state this worker's own write gave the
    job (a duplicate message, a job another worker ended, a hand-over: none),
    `ctx.start_row` the row as the start left it.
    """
    m = _metrics
    if m is None or ctx.ended is None:
        return
    m.job_finished.labels(ctx.project, ctx.ended).inc()
    row = ctx.start_row
    if row is None:  # ended before it started (its lock wait timed out, say)
        return
    m.queue_wait.labels(ctx.project).observe(_seconds(row.created_at, row.started_at))
    m.lock_wait.labels(ctx.project).observe((row.lock_waited_ms or 0) / 1000)
    m.job_duration.labels(ctx.project).observe(_seconds(row.started_at, utcnow()))


def jobs_settled(project: str, count: int) -> None:
    """Count jobs a rollout settled at their target without a run (born succeeded)."""
    if _metrics is not None and count:
        _metrics.job_finished.labels(project, "succeeded").inc(count)


def _seconds(start: dt.datetime, end: dt.datetime) -> float:
    """end - start, in seconds, whether the driver gave both aware (PostgreSQL) or naive."""
    if start.tzinfo is None:
        start = start.replace(tzinfo=dt.UTC)
    if end.tzinfo is None:
        end = end.replace(tzinfo=dt.UTC)
    return max(0.0, (end - start).total_seconds())


def revision_applied(project: str, direction: str, duration_ms: float) -> None:
    if _metrics is not None:
        _metrics.revision_duration.labels(project, direction).observe(duration_ms / 1000)


def lease_takeovers(handed: dict[str, list[int]]) -> None:
    """Count a sweep's hand-overs (committed): {"recovering": [...], "failed": [...]}."""
    if _metrics is not None:
        for outcome, jobs in handed.items():
            if jobs:
                _metrics.takeovers.labels(outcome).inc(len(jobs))


def fenced_out_write() -> None:
    if _metrics is not None:
        _metrics.fenced_out.inc()


def webhook_delivery(ok: bool, next_attempt_in: float | None) -> None:
    """Count one delivery attempt: delivered, retrying (another is scheduled) or failed."""
    if _metrics is not None:
        outcome = "delivered" if ok else "retrying" if next_attempt_in is not None else "failed"
        _metrics.webhooks.labels(outcome).inc()


def request_done(method: str, route: str, status: int, seconds: float) -> None:
    if _metrics is not None:
        _metrics.http.labels(method, route, str(status)).observe(seconds)


# ------------------------------------------------------------------ scraping


def check_scraper(token: str, authorization: str) -> None:
    """Refuse a scrape without `Authorization: Bearer <RETORT_METRICS_TOKEN>`, when one is set."""
    if not token:
        return
    scheme, _, sent = authorization.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(sent.strip().encode(), token.encode()):
        raise UnauthorizedError("send `Authorization: Bearer <RETORT_METRICS_TOKEN>`")


def render(config: Config, engine: Engine | None, accept: str = "") -> tuple[bytes, str]:
    """The machine's metrics in the format the scraper asked for; with `engine`, the job table's."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import choose_encoder
    from prometheus_client.multiprocess import MultiProcessCollector

    directory = config.metrics_path
    directory.mkdir(parents=True, exist_ok=True)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    if engine is not None:
        registry.register(_JobTable(engine))
    encode, content_type = choose_encoder(accept)
    return encode(registry), content_type


class _JobTable:
    """Jobs in each active state, by project: one GROUP BY on the job table per scrape."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        jobs = GaugeMetricFamily(
            "retort_jobs",
            "Jobs in each active state, by project (the state database's count at scrape time)",
            labels=["project", "state"],
        )
        up = GaugeMetricFamily(
            "retort_state_database_up", "1 when this scrape could count the jobs, else 0"
        )
        try:
            counts = active_jobs(self.engine)
        except Exception as exc:  # noqa: BLE001 - the other metrics are still worth a scrape
            log.warning("metrics: could not count the jobs: %s", exc)
            up.add_metric([], 0)
        else:
            for (project, state), n in sorted(counts.items()):
                jobs.add_metric([project, state], n)
            up.add_metric([], 1)
        yield jobs
        yield up


def active_jobs(engine: Engine) -> dict[tuple[str, str], int]:
    """{(project, state): jobs} for every project and active state, zeros included."""
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SET LOCAL statement_timeout = {SCRAPE_TIMEOUT_MS}")
        names = dict(conn.execute(_PROJECT_NAMES).tuples().all())
        counts = {(name, state): 0 for name in names.values() for state in COUNTED_STATES}
        for project_id, state, n in conn.execute(_ACTIVE_COUNTS):
            if project_id in names:
                counts[(names[project_id], state)] = n
    return counts


# ------------------------------------------------------------------ --metrics-port


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve(config: Config) -> None:
    """Serve the machine's metrics on config.metrics_port, from a thread of this process.

    For machines without an API (a worker's, say): the same files, no job table.
    A port already taken is logged, never fatal: the jobs matter more.
    """
    if not config.metrics_port:
        return

    def app(environ: dict[str, Any], start_response) -> list[bytes]:
        try:
            check_scraper(config.metrics_token, environ.get("HTTP_AUTHORIZATION", ""))
        except UnauthorizedError as exc:
            start_response("401 Unauthorized", [("Content-Type", "application/json")])
            return [json.dumps(exc.to_dict()).encode()]
        body, content_type = render(config, None, environ.get("HTTP_ACCEPT", ""))
        start_response("200 OK", [("Content-Type", content_type)])
        return [body]

    try:
        server = make_server(config.host, config.metrics_port, app, _Server, _QuietHandler)
    except OSError as exc:
        log.error("metrics: cannot listen on %s:%s: %s", config.host, config.metrics_port, exc)
        return
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.warning("metrics of this machine at http://%s:%s/metrics", config.host, config.metrics_port)
