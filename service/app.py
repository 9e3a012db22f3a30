"""The Flask application factory: the app, its hooks and error handlers (views: service.web)."""

from __future__ import annotations

import hashlib
import hmac
import importlib.metadata
import logging
import time
from typing import Any

from flask import Flask, Response, g, jsonify, request
from sqlalchemy import text
from werkzeug.exceptions import HTTPException
from werkzeug.routing import IntegerConverter

from service import logs, metrics, notify
from service.config import Config
from service.crypto import SecretBox
from service.db import PING_IDLE_AFTER_S, make_engine, transaction
from service.errors import (
    ServiceError,
    UnauthorizedError,
)
from service.jobs.cache import FinishedJobs
from service.jobs.run.sandbox import probe
from service.jobs.wakeups import Wakeups
from service.jobs.watch import JobWatcher
from service.limits import RequestLimits, hold_request
from service.openapi import DOCS_PAGE, build_spec
from service.principal import ADMIN
from service.queue import Dispatcher
from service.sessions import make_state_sessions
from service.tokens.ops import authenticate
from service.web import Services, audit_refusal, record_refusal, services
from service.webhooks import outbox

log = logging.getLogger("retort.api")


class IdConverter(IntegerConverter):
    """A row id in a URL: a positive 64-bit integer; anything larger is simply not found."""

    def __init__(self, url_map, *args, **kwargs):
        super().__init__(url_map, min=1, max=2**63 - 1)


def create_app(config: Config | None = None) -> Flask:
    config = config or Config.from_env()
    app = Flask("retort")
    app.url_map.converters["id"] = IdConverter
    app.config["MAX_CONTENT_LENGTH"] = config.max_bundle_bytes
    app.json.sort_keys = False
    # A pre-ping per checkout doubled the round trips of a job read: the API
    # checks its connections without one (see service.db._check_on_checkout).
    engine = make_engine(
        config.database_url, ping_idle_after_s=PING_IDLE_AFTER_S, pool_size=config.api_state_pool
    )
    sessions = make_state_sessions(engine, config.audit_keys)
    dispatcher = Dispatcher(config)
    limits = RequestLimits(config, lambda data: record_refusal(sessions, "anonymous", data))
    app.wsgi_app = limits.wrap(app.wsgi_app)
    outbox.attach(sessions, config, dispatcher)
    app.extensions["retort"] = Services(
        config=config,
        engine=engine,
        sessions=sessions,
        box=SecretBox(config.secret_keys),
        dispatcher=dispatcher,
        watcher=JobWatcher(
            sessions,
            config.watch_interval_s,
            config.max_waiters,
            lambda on_job, on_live: notify.listen(config.broker_url, config.queue, on_job, on_live),
            config.watch_live_interval_s,
        ),
        finished_jobs=FinishedJobs(),
        limits=limits,
        wakeups=Wakeups(config.broker_url, config.queue),
    )

    from service.audit.api import bp as audit_bp
    from service.bundles.api import bp as bundles_bp
    from service.databases.api import bp as databases_bp
    from service.jobs.api import bp as jobs_bp
    from service.projects.api import bp as projects_bp
    from service.rollouts.api import bp as rollouts_bp
    from service.tokens.api import bp as tokens_bp
    from service.webhooks.api import bp as webhooks_bp

    for bp in (
        projects_bp,
        bundles_bp,
        databases_bp,
        jobs_bp,
        rollouts_bp,
        audit_bp,
        webhooks_bp,
        tokens_bp,
    ):
        app.register_blueprint(bp, url_prefix="/v1")

    app.before_request(_request_started)  # first: the clock runs through authentication
    app.after_request(_request_finished)
    app.teardown_request(_request_torn_down)

    @app.before_request
    def _authenticate():
        g.principal = None
        public = not request.path.startswith("/v1/") or request.path == "/v1/openapi.json"
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if public or scheme.lower() != "bearer" or not token:
            # Requests without a token count against their source address.
            hold_request(f"addr:{request.remote_addr}")
            if public:
                return None
            raise UnauthorizedError("send `Authorization: Bearer <token>`")
        if hmac.compare_digest(token.encode(), config.admin_token.encode()):
            g.principal = ADMIN
        else:
            with transaction(services().sessions) as s:
                g.principal = authenticate(s, token)
            if g.principal is None:
                raise UnauthorizedError("the token is not valid (unknown, revoked or expired)")
        # Idempotency keys belong to the token that sent them, stored as a digest.
        g.token_digest = hashlib.sha256(token.encode()).hexdigest()
        hold_request(f"token:{g.token_digest}")
        return None

    spec = build_spec(app, _version())

    @app.get("/v1/openapi.json")
    def openapi_document():
        return spec

    @app.get("/docs")
    def docs_page():
        return DOCS_PAGE, 200, {"Content-Type": "text/html; charset=utf-8"}

    @app.get("/")
    def root():
        # A person who opens Retort's address finds the API's pages.
        return "", 302, {"Location": "/docs"}

    @app.get("/healthz")
    def healthz():
        return {"ok": True}

    @app.get("/metrics")
    def metrics_page():
        """Prometheus metrics: this machine's processes and the job table (docs/metrics.md)."""
        metrics.check_scraper(config.metrics_token, request.headers.get("Authorization", ""))
        accept = request.headers.get("Accept", "")
        body, content_type = metrics.render(config, services().engine, accept)
        return body, 200, {"Content-Type": content_type}

    @app.get("/readyz")
    def readyz():
        checks: dict[str, Any] = {}
        try:
            with services().sessions() as s:
                s.execute(text("SELECT 1"))
            checks["state_db"] = "ok"
        except Exception as exc:  # noqa: BLE001 - report any failure as not ready
            checks["state_db"] = f"error: {type(exc).__name__}"
        try:
            services().dispatcher.ping()
            checks["broker"] = "ok"
        except Exception as exc:  # noqa: BLE001
            checks["broker"] = f"error: {type(exc).__name__}"
        ok = all(v == "ok" for v in checks.values())
        found = probe(config.sandbox, config.bwrap_path)
        sandbox = {"mode": found.mode, "required": config.sandbox, "reason": found.reason}
        if config.sandbox == "bwrap" and found.mode != "bwrap":
            checks["sandbox"] = f"error: bwrap required and unavailable: {found.reason}"
            ok = False
        # What this host gives runners; each job says which sandbox actually ran it.
        return {"ok": ok, "checks": checks, "sandbox": sandbox}, 200 if ok else 503

    @app.errorhandler(ServiceError)
    def _service_error(exc: ServiceError):
        audit_refusal(exc.status, exc.code, exc.message)
        return jsonify(exc.to_dict()), exc.status, exc.headers

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            exc.code or 500, (exc.name or "error").lower().replace(" ", "_")
        )
        body = {"error": {"code": code, "message": exc.description, "details": {}}}
        audit_refusal(exc.code or 500, code, exc.description or "")
        # Keep what the exception adds (Allow on a 405), not its HTML body's type.
        headers = [(k, v) for k, v in exc.get_headers() if k.lower() != "content-type"]
        return jsonify(body), exc.code, headers

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.path)
        body = {"error": {"code": "internal_error", "message": "internal error", "details": {}}}
        return jsonify(body), 500

    return app


def _request_started() -> None:
    """Start the request's clock; name its job, project or database on its log lines."""
    g.request_clock = time.perf_counter()
    args = request.view_args or {}
    rule = request.url_rule.rule if request.url_rule else ""
    name = args.get("name")
    g.log_token = logs.enter(
        job=args.get("job_id"),
        database=name if rule.startswith("/v1/databases/") else None,
        project=name if rule.startswith("/v1/projects/") else None,
    )


def _request_finished(response: Response) -> Response:
    """Observe the request's latency by route: the URL rule, never the path (cardinality)."""
    if request.endpoint != "metrics_page" and "request_clock" in g:
        route = request.url_rule.rule if request.url_rule else "unmatched"
        seconds = time.perf_counter() - g.request_clock
        metrics.request_done(request.method, route, response.status_code, seconds)
    return response


def _request_torn_down(exc: BaseException | None) -> None:
    token = g.pop("log_token", None)
    if token is not None:
        logs.leave(token)


def _version() -> str:
    try:
        return importlib.metadata.version("retort")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"
