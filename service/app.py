"""The Flask application factory and the pieces every view shares."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import importlib.metadata
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, current_app, g, jsonify, request
from pydantic import BaseModel, ValidationError
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.exceptions import HTTPException
from werkzeug.routing import IntegerConverter

from service import logs, metrics, notify
from service.audit.ops import record_event
from service.config import Config
from service.crypto import SecretBox
from service.db import PING_IDLE_AFTER_S, make_engine, make_sessionmaker, transaction
from service.errors import (
    ForbiddenError,
    InvalidError,
    PayloadTooLargeError,
    ServiceError,
    UnauthorizedError,
    UnsupportedMediaTypeError,
)
from service.idempotency import ops as idempotency
from service.idempotency.ops import check_key
from service.jobs.cache import FinishedJobs
from service.jobs.run.sandbox import probe
from service.jobs.wakeups import Wakeups
from service.jobs.watch import JobWatcher
from service.limits import RequestLimits, hold_request, load_json, refusal_event
from service.openapi import DOCS_PAGE, build_spec
from service.principal import ADMIN, Principal
from service.queue import Dispatcher
from service.tokens.ops import authenticate
from service.webhooks import outbox

log = logging.getLogger("retort.api")


class IdConverter(IntegerConverter):
    """A row id in a URL: a positive 64-bit integer; anything larger is simply not found."""

    def __init__(self, url_map, *args, **kwargs):
        super().__init__(url_map, min=1, max=2**63 - 1)


@dataclasses.dataclass
class Services:
    config: Config
    engine: Engine
    sessions: sessionmaker[Session]
    box: SecretBox
    dispatcher: Dispatcher
    watcher: JobWatcher
    finished_jobs: FinishedJobs
    limits: RequestLimits
    wakeups: Wakeups


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
    sessions = make_sessionmaker(engine, config.audit_keys)
    dispatcher = Dispatcher(config)
    limits = RequestLimits(config, lambda data: _record_refusal(sessions, "anonymous", data))
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
        _audit_refusal(exc.status, exc.code, exc.message)
        return jsonify(exc.to_dict()), exc.status, exc.headers

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            exc.code or 500, (exc.name or "error").lower().replace(" ", "_")
        )
        body = {"error": {"code": code, "message": exc.description, "details": {}}}
        _audit_refusal(exc.code or 500, code, exc.description or "")
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


def services() -> Services:
    return current_app.extensions["retort"]


def principal() -> Principal:
    return g.principal


def actor() -> str:
    return g.principal.name


def require(role: str, *, everywhere: bool = False) -> None:
    """Refuse (403) a token whose role is below `role`, or that is not for every project."""
    who = principal()
    if not who.has_role(role):
        raise ForbiddenError(
            f"a {who.role} token cannot do this: it needs the {role} role",
            {"role": who.role, "needs": role},
        )
    if everywhere and not who.everywhere:
        raise ForbiddenError(
            'this needs a token for every project (projects: "*")',
            {"role": who.role, "needs": f"{role} on *"},
        )


def _audit_refusal(status: int, code: str, message: str) -> None:
    """Record a refused write in the audit log: who, what, why (reads are not recorded).

    Without a valid token, refusals are counted per source address and recorded
    as one event per source per window carrying the count (service.limits).
    """
    if not 400 <= status < 500 or not request.path.startswith("/v1/"):
        return
    write = request.method not in ("GET", "HEAD", "OPTIONS")
    event = refusal_event(request.method, request.path, status, code, message)
    who = getattr(g, "principal", None)
    if who is None:
        source = request.remote_addr or "unknown"
        services().limits.refusals.note(source, event if write else None)
    elif write:
        _record_refusal(services().sessions, who.name, event)


def _record_refusal(sessions: sessionmaker[Session], who: str, data: dict[str, Any]) -> None:
    try:
        with transaction(sessions) as s:
            record_event(s, "request.refused", actor=who, data=data)
    except Exception:  # noqa: BLE001 - the refusal is answered even if it cannot be recorded
        log.exception("could not record a refused %s %s", data.get("method"), data.get("path"))


def idempotent(
    scope: str, payload: Any, create: Callable[[Session], tuple[str, int]]
) -> tuple[str, int, bool]:
    """Run `create` in a transaction once per Idempotency-Key; return (resource, status, replayed).

    Without the header this is just a transaction. With it, a repeat of the
    same request from the same token gets the first answer's resource and
    status; the same key with another request is a 422. `create` returns the
    resource it made (a job id, a bundle digest) and the status to answer with.
    """
    key = check_key(request.headers.get("Idempotency-Key"))
    digest = idempotency.request_digest(scope, payload)
    ttl = services().config.idempotency_ttl_s

    def attempt() -> tuple[str, int, bool]:
        with transaction(services().sessions) as s:
            if key is not None:
                prior = idempotency.find_replay(s, g.token_digest, key, digest, ttl)
                if prior is not None:
                    return prior.resource, prior.status_code, True
            resource, status = create(s)
            if key is not None:
                idempotency.remember(s, g.token_digest, key, scope, digest, status, resource)
            return resource, status, False

    try:
        return attempt()
    except IntegrityError:
        if key is None:
            raise
        # A concurrent request with the same key committed first: replay its answer.
        return attempt()


def parse_json(model: type[BaseModel]) -> Any:
    """Parse and validate a JSON body, or raise a 4xx that names the bad field."""
    config = services().config
    if request.content_length and request.content_length > config.max_body_bytes:
        raise PayloadTooLargeError(
            "the request body is too large", {"limit_bytes": config.max_body_bytes}
        )
    if not request.is_json:
        raise UnsupportedMediaTypeError("send the body as JSON (Content-Type: application/json)")
    # However it arrives (chunked too): at most the limit is read, nesting is bounded.
    data = load_json(request.stream, config.max_body_bytes, config.max_json_depth)
    # Strict JSON types, as the OpenAPI document says: `false` is not a number
    # and "5" is not an integer. (Query strings stay lax: everything there is text.)
    return validate(model, json.dumps(data), strict_json=True)


def parse_query(model: type[BaseModel]) -> Any:
    return validate(model, request.args.to_dict())


def validate(model: type[BaseModel], data: Any, strict_json: bool = False) -> Any:
    try:
        if strict_json:
            return model.model_validate_json(data, strict=True)
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [
            {
                "field": ".".join(str(p) for p in err["loc"]) or "(body)",
                "message": err["msg"],
            }
            for err in exc.errors(include_url=False, include_input=False)
        ]
        first = errors[0]
        raise InvalidError(
            f"{first['field']}: {first['message']}", {"errors": errors, "field": first["field"]}
        ) from None
