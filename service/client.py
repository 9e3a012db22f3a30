"""A small client of Retort's HTTP API for deploy pipelines (stdlib urllib only).

Exit codes of the pipeline commands (`retort push`, `migrate`, `status`, `wait`, ...):

    0  succeeded, or nothing to do
    1  the migration failed (the job failed or was cancelled)
    2  usage or request error (any other 4xx, a redirect, a token or key that cannot be sent)
    3  refused by a safety check (`multiple_heads`, `revision_changed`,
       `unknown_current_revision`) or waiting for approval
    4  timed out waiting; the job goes on
    5  cannot reach Retort (connection, DNS, timeout, HTTP 5xx, an answer that is not
       Retort's), authentication failed, or an unexpected error in this client
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import json
import os
import re
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_TIMEOUT = 4
EXIT_UNAVAILABLE = 5

DEFAULT_URL = "http://127.0.0.1:8080"
# Where `retort serve` writes its admin token (relative to the working directory).
EMBEDDED_TOKEN_FILE = Path("retort-data") / "admin-token"

FINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
# Error codes that mean "Retort refused to do something unsafe", not "it broke".
SAFETY_CODES = frozenset({"multiple_heads", "revision_changed", "unknown_current_revision"})
# What POST /v1/rollouts/{id}/ACTION accepts (docs/rollouts.md).
ROLLOUT_ACTIONS = frozenset({"pause", "resume", "abort", "retry-failed"})

MAX_LONG_POLL_S = 30
# Connection errors and 502/503/504 are retried this many times in all, with backoff.
ATTEMPTS = 3
BACKOFF_S = 0.5
RETRYABLE_STATUS = frozenset({502, 503, 504})
# While waiting on a job, a lost connection (an API restart, say) is retried until
# the wait's deadline: every second at first, doubling up to this.
RECONNECT_FIRST_S = 1.0
RECONNECT_MAX_S = 10.0
# What the server accepts as an Idempotency-Key: 1-200 visible ASCII characters.
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,200}")


class ApiError(Exception):
    """Retort answered with an error document ({"error": {"code", "message", "details"}})."""

    def __init__(
        self, status: int, document: dict[str, Any], headers: dict[str, str] | None = None
    ):
        self.status = status
        self.document = document
        self.headers = headers or {}
        error = document.get("error") or {}
        self.code: str = error.get("code") or f"http_{status}"
        self.message: str = error.get("message") or f"HTTP {status}"
        super().__init__(f"{self.message} ({self.code})")

    @property
    def exit_code(self) -> int:
        """Map the refusal to the documented exit code."""
        if self.status in (401, 403) or self.status >= 500:
            return EXIT_UNAVAILABLE
        if self.code in SAFETY_CODES:
            return EXIT_REFUSED
        return EXIT_USAGE


class Unreachable(Exception):
    """No answer from Retort: connection refused, DNS, timeout or a broken response."""

    exit_code = EXIT_UNAVAILABLE
    code = "unreachable"

    @property
    def document(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": str(self), "details": {}}}


class OutputError(Exception):
    """Writing what Retort sent failed on this side (a closed pipe, a full disk)."""

    def __init__(self, error: OSError):
        super().__init__(str(error))
        self.error = error


class InvalidInput(Exception):
    """A URL, token or key this client cannot send: nothing was sent (exit 2)."""

    exit_code = EXIT_USAGE

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code

    @property
    def document(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": str(self), "details": {}}}


class PackError(Exception):
    """A scripts directory that cannot become a bundle."""


class WaitTimeout(Exception):
    """The wait ended before the job did; `job` is the last state seen."""

    def __init__(self, job: dict[str, Any] | None, timeout: float, lost: str | None = None):
        super().__init__(f"timed out after {timeout:g} s")
        self.job = job
        self.timeout = timeout
        # Why the last requests failed, when the connection was lost at the end.
        self.lost = lost


@dataclass
class Reply:
    status: int
    body: Any
    headers: dict[str, str]


def check_url(url: str) -> str:
    """Return URL without its trailing slash, or raise InvalidInput if it is no http(s) URL."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError as exc:
        raise InvalidInput("invalid_url", f"--url/RETORT_URL {url!r} is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput(
            "invalid_url",
            f"--url/RETORT_URL {url!r} is not an http:// or https:// URL "
            "(e.g. https://retort.internal)",
        )
    if not (url.isascii() and _sendable(url)) or " " in url:
        raise InvalidInput(
            "invalid_url",
            f"--url/RETORT_URL {url!r} has a space, control or non-ASCII character "
            "(write a host in its xn-- form, percent-encode a path)",
        )
    return url.rstrip("/")


def check_token(token: str | None) -> str | None:
    """Strip the token (a secret mounted from a file ends with a newline); check it can be sent.

    The token is never echoed: only the position of the character at fault.
    """
    token = (token or "").strip()
    for position, char in enumerate(token, 1):
        if not _sendable(char):
            # Anything Latin-1 that cannot be sent is a control character (C0 or C1).
            kind = "a character outside Latin-1" if ord(char) > 0xFF else "a control character"
            raise InvalidInput(
                "invalid_token",
                f"the token (--token/RETORT_TOKEN) has {kind} at position {position}: "
                "check how the secret is stored",
            )
    return token or None


def check_idempotency_key(key: str) -> str:
    """Return KEY, or raise InvalidInput unless it is 1-200 visible ASCII characters."""
    if not IDEMPOTENCY_KEY.fullmatch(key):
        raise InvalidInput(
            "invalid_idempotency_key",
            f"--idempotency-key {key!r} is not 1 to 200 visible ASCII characters "
            "(letters, digits, punctuation; no spaces), which is what Retort accepts",
        )
    return key


def _sendable(text: str) -> bool:
    """Tell whether TEXT can go in an HTTP request line or header (Latin-1, no controls)."""
    return all(0x20 <= ord(c) <= 0x7E or 0xA0 <= ord(c) <= 0xFF for c in text)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Follow no redirect: a 3xx becomes an HTTPError, and the token goes nowhere else."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001
        return None


def default_token() -> str | None:
    """Read the embedded server's admin token from ./retort-data, if it is there."""
    try:
        return EMBEDDED_TOKEN_FILE.read_text().strip() or None
    except OSError:
        return None


class RetortClient:
    """JSON over HTTP with bearer auth, error documents and retries of safe requests."""

    def __init__(self, url: str, token: str | None):
        self.base = check_url(url)
        self.token = check_token(token)
        # urllib's default opener follows redirects, with the Authorization header,
        # to any host, and turns a redirected POST into a GET: this one follows none.
        self.opener = urllib.request.build_opener(_NoRedirect)
        # Whether Retort has answered this client yet: a wait that has seen it
        # answer outlasts an outage (a restart); one that never has fails fast.
        self.answered = False

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        data: bytes | None = None,
        content_type: str | None = None,
        query: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 30,
    ) -> Reply:
        """Send one request; retry it on connection errors and 502/503/504.

        Only call this for requests that are safe to repeat: GETs, and POSTs that
        carry an Idempotency-Key (the server answers a repeat with the first result).
        """
        req = self._build(method, path, json_body, data, content_type, query, headers)
        attempt = 1
        while True:
            try:
                return self._send(req, timeout)
            except (Unreachable, ApiError) as exc:
                if not _retryable(exc) or attempt >= ATTEMPTS:
                    raise
                pause = BACKOFF_S * 2 ** (attempt - 1)
                if isinstance(exc, ApiError):
                    pause = _retry_after(exc.headers) or pause
            time.sleep(min(pause, 10))
            attempt += 1

    def _build(
        self,
        method: str,
        path: str,
        json_body: Any = None,
        data: bytes | None = None,
        content_type: str | None = None,
        query: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> urllib.request.Request:
        hdrs = {"Accept": "application/json", "User-Agent": "retort-cli", **(headers or {})}
        if json_body is not None:
            data = json.dumps(json_body).encode()
            hdrs["Content-Type"] = "application/json"
        if content_type:
            hdrs["Content-Type"] = content_type
        if self.token:
            hdrs["Authorization"] = f"Bearer {self.token}"
        url = self.base + path
        params = {k: v for k, v in (query or {}).items() if v is not None}
        if params:
            url += "?" + urllib.parse.urlencode(params)
        for name, value in hdrs.items():
            # urllib would raise a bare ValueError or UnicodeEncodeError mid-request.
            if not _sendable(value):
                raise InvalidInput(
                    "invalid_header", f"the {name} header has a character HTTP cannot carry"
                )
        return urllib.request.Request(url, data, hdrs, method=method)

    def _send(self, req: urllib.request.Request, timeout: float) -> Reply:
        """Send once; turn every failure into ApiError or Unreachable."""
        try:
            with self.opener.open(req, timeout=timeout) as resp:
                reply = Reply(resp.status, _decode(resp.read()), dict(resp.headers))
            if not isinstance(reply.body, dict) and reply.status != 204:
                raise Unreachable(
                    f"{req.full_url} answered HTTP {reply.status} with "
                    f"{_describe(reply)}, not Retort's JSON: is --url/RETORT_URL right "
                    "(a proxy or login page in the way)?"
                )
            self.answered = True
            return reply
        except urllib.error.HTTPError as exc:
            return self._http_error(req, exc)
        except urllib.error.URLError as exc:
            raise Unreachable(f"cannot reach Retort at {self.base}: {exc.reason}") from None
        except (OSError, http.client.HTTPException) as exc:  # timeouts, resets, bad responses
            raise Unreachable(
                f"cannot reach Retort at {self.base}: {type(exc).__name__}: {exc}"
            ) from None

    def _http_error(self, req: urllib.request.Request, exc: urllib.error.HTTPError) -> Reply:
        """A 304 as its Reply; any other status as ApiError with Retort's error document."""
        headers = dict(exc.headers or {})
        try:
            body = _decode(exc.read())
        except (OSError, http.client.HTTPException):
            body = None
        if exc.code == 304:  # Not Modified: the answer to If-None-Match, not an error
            self.answered = True
            return Reply(304, None, headers)
        if 300 <= exc.code < 400:
            raise ApiError(exc.code, self._redirect(req, exc.code, headers), headers) from None
        if not (isinstance(body, dict) and isinstance(body.get("error"), dict)):
            # Not Retort's answer (a proxy's, say): wrap it in the same error shape.
            message = f"HTTP {exc.code} {exc.reason} from {self.base}"
            body = {"error": {"code": f"http_{exc.code}", "message": message, "details": {}}}
        raise ApiError(exc.code, body, headers) from None

    def _redirect(self, req: urllib.request.Request, status: int, headers: dict[str, str]) -> Any:
        """The error document for a redirect, which is never followed."""
        location = _header(headers, "Location")
        if not location:
            message = f"Retort answered HTTP {status} (a redirect) without a Location"
            return {"error": {"code": "redirected", "message": message, "details": {}}}
        location = urllib.parse.urljoin(req.full_url, location)
        message = f"Retort answered with a redirect to {location}: use that URL in --url/RETORT_URL"
        # Name the base URL to use when the redirect kept the path (http -> https, say).
        suffix = req.full_url[len(self.base) :]
        if suffix and location.endswith(suffix) and len(location) > len(suffix):
            message += f"; here that is --url {location[: -len(suffix)]}"
        details = {"status": status, "location": location}
        return {"error": {"code": "redirected", "message": message, "details": details}}

    def get(self, path: str, **query: Any) -> Any:
        """GET a JSON document; None-valued query parameters are left out."""
        return self.request("GET", path, query=query).body

    def download(self, path: str, out: Any, timeout: float = 60) -> int:
        """GET a body that is not one JSON document (JSON lines) into `out`; return its bytes."""
        req = self._build("GET", path, headers={"Accept": "application/jsonl"})
        try:
            with self.opener.open(req, timeout=timeout) as resp:
                size = 0
                while chunk := resp.read(64 * 1024):
                    try:
                        out.write(chunk)
                    except OSError as exc:  # our own output (a closed pipe): not Retort's
                        raise OutputError(exc) from exc
                    size += len(chunk)
                return size
        except OutputError as exc:
            raise exc.error from None
        except urllib.error.HTTPError as exc:
            self._http_error(req, exc)
            raise Unreachable(
                f"{req.full_url} answered 304 to a request without a validator"
            ) from None
        except urllib.error.URLError as exc:
            raise Unreachable(f"cannot reach Retort at {self.base}: {exc.reason}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise Unreachable(f"cannot reach Retort at {self.base}: {exc}") from None

    # ------------------------------------------------------------ the API

    def push(
        self,
        project: str,
        tar_gz: bytes,
        versions_path: str | None = None,
        python_path: list[str] | tuple[str, ...] = (),
    ) -> tuple[dict[str, Any], bool]:
        """Upload a bundle; return (bundle, True if this upload made it).

        `versions_path` and `python_path` give the bundle's shape (docs/bundles.md).
        """
        # The key is the content's, qualified by the project: the server keeps one
        # request per key, so the same scripts pushed to two projects need two keys
        # (and the same archive in another shape is another bundle).
        shape = b""
        if versions_path is not None or python_path:
            shape = b"\n" + json.dumps([versions_path, list(python_path)]).encode()
        key = hashlib.sha256(project.encode() + shape + b"\n" + tar_gz).hexdigest()
        query = {"versions_path": versions_path}
        if python_path:
            query["python_path"] = ",".join(python_path)
        reply = self.request(
            "POST",
            f"/v1/projects/{segment(project)}/bundles",
            data=tar_gz,
            content_type="application/gzip",
            query=query,
            headers={"Idempotency-Key": key},
            timeout=120,
        )
        # A replay repeats the first upload's 201: the bundle was there already.
        return reply.body, reply.status == 201 and not _replayed(reply)

    def create_job(self, body: dict[str, Any], idempotency_key: str) -> tuple[dict[str, Any], bool]:
        """Ask for a job; return (job, True if the key had already asked for it).

        The key makes a retried POST return the same job instead of a second one.
        """
        check_idempotency_key(idempotency_key)
        reply = self.request(
            "POST", "/v1/jobs", json_body=body, headers={"Idempotency-Key": idempotency_key}
        )
        return reply.body, _replayed(reply)

    def watch_job(
        self,
        job_id: int,
        timeout: float | None,
        notify: Callable[[str], None] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Yield the job each time it changes, until it is final; raise WaitTimeout.

        Long-polls `GET /v1/jobs/{id}?wait=W` with the last ETag as If-None-Match,
        so the server answers as soon as something changes and nothing is missed.
        An answer that brings no change (an older server ignores `wait`, a busy one
        sets Retry-After) is followed by a pause: this never loops tightly.

        Once Retort has answered, a lost connection or a 502/503/504 (an API
        restart, a proxy in between) is retried until the deadline, or forever
        without one: every second at first, doubling up to RECONNECT_MAX_S, or as
        Retry-After says. `notify` hears one line when the connection is lost and
        one when it is back. Before Retort has answered at all, the usual bounded
        retries apply: a wrong URL fails at once instead of waiting.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        etag: str | None = None
        last: dict[str, Any] | None = None
        link = _Link(notify, deadline is not None, f"job {job_id}")
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise WaitTimeout(last, timeout or 0, link.reason)
            query: dict[str, Any] = {}
            headers: dict[str, str] = {}
            wait = 0.0
            # The first request only fetches the current state, and so does each one
            # after a lost connection: it reports the reconnection at once.
            if last is not None and not link.down:
                limit = MAX_LONG_POLL_S if remaining is None else remaining
                wait = round(max(0.1, min(MAX_LONG_POLL_S, limit)), 1)
                query["wait"] = wait
                if etag:
                    headers["If-None-Match"] = etag
            # Give up on a silent server soon after the deadline, not 30 s later.
            limit_s = wait + 30 if remaining is None else min(wait + 30, remaining + 5)
            path = f"/v1/jobs/{job_id}"
            started = time.monotonic()
            try:
                if not self.answered:
                    reply = self.request("GET", path, query=query, headers=headers, timeout=limit_s)
                else:
                    req = self._build("GET", path, query=query, headers=headers)
                    reply = self._send(req, limit_s)
            except (Unreachable, ApiError) as exc:
                if not (self.answered and _retryable(exc)):
                    raise
                pause = link.lost(exc)
                if deadline is not None:
                    pause = min(pause, deadline - time.monotonic())
                if pause > 0:
                    time.sleep(pause)
                continue
            link.back()
            new_etag = _header(reply.headers, "ETag")
            changed = reply.status != 304 and (
                reply.body != last if not (new_etag and etag) else new_etag != etag
            )
            etag = new_etag or etag
            if changed:
                last = reply.body
                yield last
                if last["state"] in FINAL_STATES:
                    return
            pause = _retry_after(reply.headers)
            if pause is None and (not changed or not new_etag):
                # An unchanged or ETag-less answer may have come back at once: space
                # requests at least a second apart.
                pause = 1.0 - (time.monotonic() - started)
            if pause is not None and deadline is not None:
                pause = min(pause, deadline - time.monotonic())
            if pause is not None and pause > 0:
                time.sleep(min(pause, MAX_LONG_POLL_S))

    # ------------------------------------------------------------ rollouts (docs/rollouts.md)

    def start_rollout(
        self, body: dict[str, Any], idempotency_key: str | None = None
    ) -> tuple[dict[str, Any], bool]:
        """Start a rollout; return (rollout, True if the key had already started it).

        Without a key, one is made for this call: its retries never start a second one.
        """
        key = check_idempotency_key(idempotency_key or str(uuid.uuid4()))
        reply = self.request(
            "POST", "/v1/rollouts", json_body=body, headers={"Idempotency-Key": key}
        )
        return reply.body, _replayed(reply)

    def rollout(self, rollout_id: int) -> dict[str, Any]:
        """The rollout: its state, counts and waves."""
        return self.get(f"/v1/rollouts/{rollout_id}")

    def rollout_databases(
        self,
        rollout_id: int,
        state: str | None = None,
        wave: int | None = None,
        cursor: str | None = None,
        limit: int | None = None,
    ) -> dict[str, Any]:
        """One page of the rollout's databases ({"databases": [...], "next_cursor": ...})."""
        return self.get(
            f"/v1/rollouts/{rollout_id}/databases",
            state=state,
            wave=wave,
            cursor=cursor,
            limit=limit,
        )

    def rollout_action(self, rollout_id: int, action: str) -> dict[str, Any]:
        """POST pause, resume, abort or retry-failed; return the rollout.

        Sent once, never retried: a repeat that the first one answered would be
        refused (409) for the state the first one made.
        """
        if action not in ROLLOUT_ACTIONS:
            raise ValueError(f"not a rollout action: {action}")
        req = self._build("POST", f"/v1/rollouts/{rollout_id}/{action}", json_body={})
        return self._send(req, 30).body

    def list_rollouts(self, project: str) -> dict[str, Any]:
        """A project's rollouts, newest first ({"rollouts": [...], ...})."""
        return self.get("/v1/rollouts", project=project)

    def poll_rollout(
        self,
        rollout_id: int,
        timeout: float | None,
        notify: Callable[[str], None] | None = None,
        interval: float = 1.0,
    ) -> Iterator[dict[str, Any]]:
        """Yield the rollout about every `interval` seconds until the caller stops; raise
        WaitTimeout (its `job` is the last rollout seen) at the deadline.

        A lost connection once Retort has answered is retried until the deadline, as
        in watch_job, with one `notify` line when it is lost and one when it is back.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        path = f"/v1/rollouts/{rollout_id}"
        last: dict[str, Any] | None = None
        link = _Link(notify, deadline is not None, f"rollout {rollout_id}")
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise WaitTimeout(last, timeout or 0, link.reason)
            limit_s = 30.0 if remaining is None else min(30.0, remaining + 5)
            started = time.monotonic()
            try:
                if not self.answered:
                    reply = self.request("GET", path, timeout=limit_s)
                else:
                    reply = self._send(self._build("GET", path), limit_s)
            except (Unreachable, ApiError) as exc:
                if not (self.answered and _retryable(exc)):
                    raise
                pause = link.lost(exc)
            else:
                link.back()
                last = reply.body
                yield last
                pause = _retry_after(reply.headers) or interval - (time.monotonic() - started)
            if deadline is not None:
                pause = min(pause, deadline - time.monotonic())
            if pause > 0:
                time.sleep(min(pause, MAX_LONG_POLL_S))


class _Link:
    """A waiting client's connection to Retort: lost (one line, doubling pauses), then back."""

    def __init__(self, notify, bounded: bool, what: str) -> None:
        self._notify, self._bounded, self._what = notify, bounded, what
        self._lost_at: float | None = None  # when it was lost; None while it is up
        self._reason = ""
        self._backoff = RECONNECT_FIRST_S

    @property
    def down(self) -> bool:
        return self._lost_at is not None

    @property
    def reason(self) -> str | None:
        """Why it is down (None while it is up)."""
        return self._reason if self.down else None

    def lost(self, exc: Exception) -> float:
        """A request failed: say so the first time; return how long to pause."""
        if self._lost_at is None:
            self._lost_at, self._backoff = time.monotonic(), RECONNECT_FIRST_S
            if self._notify:
                until = "until the timeout" if self._bounded else "until it answers"
                self._notify(f"lost the connection to Retort ({exc}); retrying {until}")
        self._reason = str(exc)
        pause = self._backoff
        if isinstance(exc, ApiError):
            pause = min(_retry_after(exc.headers) or pause, MAX_LONG_POLL_S)
        self._backoff = min(self._backoff * 2, RECONNECT_MAX_S)
        return pause

    def back(self) -> None:
        """A request was answered: say so if the connection had been lost."""
        if self._lost_at is not None and self._notify:
            self._notify(
                f"connection to Retort back after {time.monotonic() - self._lost_at:.0f} s; "
                f"still waiting for {self._what}"
            )
        self._lost_at = None


def job_exit_code(job: dict[str, Any]) -> int:
    """Map a job's state to the documented exit code (a job still going is 0)."""
    state = job.get("state")
    if state == "succeeded":
        return EXIT_OK
    if state == "waiting_for_approval":
        return EXIT_REFUSED
    if state in ("failed", "cancelled"):
        code = (job.get("error") or {}).get("code")
        return EXIT_REFUSED if code in SAFETY_CODES else EXIT_FAILED
    return EXIT_OK


# ---------------------------------------------------------------- bundles


def pack_scripts(directory: Path) -> bytes:
    """Pack an Alembic directory or versions directory into a deterministic .tar.gz.

    An Alembic directory (env.py and versions/) is packed as it is; a bare versions
    directory is packed under `versions/`, the name the server looks for. Names are
    sorted, times and owners zeroed, caches and dotfiles left out: the same scripts
    always make the same bytes, whose sha256 is the upload's idempotency key.
    """
    directory = Path(directory)
    if (directory / "versions").is_dir():
        prefix = ""
    elif any(p.is_file() for p in directory.glob("*.py")):
        prefix = "versions/"
    else:
        raise PackError(
            f"{directory}: neither an Alembic directory (env.py and versions/) nor a versions "
            "directory (*.py revision scripts)"
        )
    return _tar_gz({prefix + rel: (directory / rel).read_bytes() for rel in _walk(directory)})


@dataclass
class Checkout:
    """A repository checkout packed in its own shape: the versions folder and the helper
    folders its revisions import from, bundle-relative; what Retort will not use, scanned."""

    tar_gz: bytes
    versions_path: str
    python_path: list[str]
    files: list[str]  # what was packed
    scanned: dict[str, bytes]  # env.py and alembic.ini: read for notices, never uploaded


# Never packed from a checkout: Retort does not read them, and alembic.ini's
# sqlalchemy.url often carries a password.
_NOT_PACKED = frozenset({"alembic.ini"})
_SKIPPED_DIRS = frozenset({"__pycache__", "node_modules", "site-packages"})


def pack_checkout(
    directory: Path,
    versions: str,
    python_path: list[str] | tuple[str, ...] = (),
    requirements: Path | None = None,
) -> Checkout:
    """Pack a checkout as Retort runs it: `versions` (the folder of revision scripts) and
    each `python_path` folder (put on the runner's import path), all relative to
    `directory`, plus `requirements` as the bundle's requirements.txt; nothing else.

    Not packed: alembic.ini, the env.py beside `versions` (both scanned for notices),
    dotfiles and dot-folders (.git), caches, virtual environments. Deterministic, as
    pack_scripts.
    """
    directory = Path(directory)
    versions_path = _inside(directory, versions, "--versions")
    if not any(p.is_file() for p in (directory / versions_path).glob("*.py")):
        raise PackError(f"{directory / versions_path}: no .py revision scripts in it (--versions)")
    folders: list[str] = []
    for entry in python_path:
        folder = _inside(directory, entry, "--python-path") or "."
        if folder not in folders:
            folders.append(folder)
    env_py = (versions_path.rpartition("/")[0] + "/env.py").lstrip("/")
    scanned: dict[str, bytes] = {}
    if (directory / env_py).is_file():
        scanned[env_py] = (directory / env_py).read_bytes()
    # alembic.ini: in the checkout's root, or in a folder on the way to versions/.
    parts = versions_path.split("/")
    for depth in range(len(parts)):
        ini = "/".join([*parts[:depth], "alembic.ini"])
        if (directory / ini).is_file():
            scanned[ini] = (directory / ini).read_bytes()
    packed: dict[str, bytes] = {}
    for folder in [versions_path, *folders]:
        base = "" if folder == "." else folder
        for rel in _walk(directory / base, skip_venvs=True):
            path = f"{base}/{rel}" if base else rel
            if path in scanned or Path(path).name in _NOT_PACKED:
                continue
            packed[path] = (directory / path).read_bytes()
    if requirements is not None:
        packed["requirements.txt"] = Path(requirements).read_bytes()
    return Checkout(_tar_gz(packed), versions_path, folders, sorted(packed), scanned)


def _inside(directory: Path, given: str, option: str) -> str:
    """A folder of the checkout as a bundle-relative path ("" for the checkout itself)."""
    path = Path(given)
    full = path if path.is_absolute() else directory / path
    try:
        rel = full.resolve().relative_to(directory.resolve())
    except ValueError:
        raise PackError(f"{option} {given}: not inside {directory}") from None
    if not full.is_dir():
        raise PackError(f"{option} {given}: no such folder in {directory}")
    return "" if str(rel) == "." else rel.as_posix()


def _tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name in sorted(files):
                data = files[name]
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _walk(root: Path, skip_venvs: bool = False) -> Iterator[str]:
    """Yield the relative paths of the files to pack: no caches, no dotfiles."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        if skip_venvs:  # a checkout's virtual environments and node_modules stay home
            dirnames[:] = [
                d
                for d in dirnames
                if d not in _SKIPPED_DIRS and not (Path(dirpath) / d / "pyvenv.cfg").exists()
            ]
        for name in filenames:
            path = Path(dirpath) / name
            if name.startswith(".") or name.endswith((".pyc", ".pyo")) or not path.is_file():
                continue
            yield path.relative_to(root).as_posix()


# ---------------------------------------------------------------- helpers


def segment(name: str) -> str:
    """Quote a name for use as one path segment of a URL."""
    return urllib.parse.quote(name, safe="")


def _retryable(exc: Exception) -> bool:
    """Connection errors and 502/503/504: what a restart or a proxy in between gives."""
    return isinstance(exc, Unreachable) or (
        isinstance(exc, ApiError) and exc.status in RETRYABLE_STATUS
    )


def _describe(reply: Reply) -> str:
    """Name an answer that is not a JSON object, for an error message."""
    if reply.body is None:
        return "an empty body"
    kind = _header(reply.headers, "Content-Type") or "no Content-Type"
    if isinstance(reply.body, str):
        what = "an HTML page" if "html" in kind.lower() else "a body"
        return f"{what} ({kind}: {_snippet(reply.body)!r})"
    return f"JSON that is not an object ({_snippet(json.dumps(reply.body))})"


def _snippet(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _decode(data: bytes) -> Any:
    if not data:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return data.decode("utf-8", "replace")


def _header(headers: dict[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name.lower():
            return value
    return None


def _replayed(reply: Reply) -> bool:
    return (_header(reply.headers, "Idempotent-Replayed") or "").lower() == "true"


def _retry_after(headers: dict[str, str] | None) -> float | None:
    value = _header(headers or {}, "Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date: not worth parsing for a pause this short
        return 1.0
