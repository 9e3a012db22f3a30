"""A small client of Retort's HTTP API for deploy pipelines (stdlib urllib only).

Exit codes of the pipeline commands (`retort push`, `migrate`, `status`, `wait`, ...):

    0  succeeded, or nothing to do
    1  the migration failed (the job failed or was cancelled)
    2  usage or request error (any other 4xx)
    3  refused by a safety check (`multiple_heads`, `revision_changed`,
       `unknown_current_revision`) or waiting for approval
    4  timed out waiting; the job goes on
    5  cannot reach Retort (connection, DNS, timeout, HTTP 5xx) or authentication failed
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import json
import os
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
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

MAX_LONG_POLL_S = 30
# Connection errors and 502/503/504 are retried this many times in all, with backoff.
ATTEMPTS = 3
BACKOFF_S = 0.5
RETRYABLE_STATUS = frozenset({502, 503, 504})


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


class PackError(Exception):
    """A scripts directory that cannot become a bundle."""


class WaitTimeout(Exception):
    """The wait ended before the job did; `job` is the last state seen."""

    def __init__(self, job: dict[str, Any] | None, timeout: float):
        super().__init__(f"timed out after {timeout:g} s")
        self.job = job
        self.timeout = timeout


@dataclass
class Reply:
    status: int
    body: Any
    headers: dict[str, str]


def default_token() -> str | None:
    """Read the embedded server's admin token from ./retort-data, if it is there."""
    try:
        return EMBEDDED_TOKEN_FILE.read_text().strip() or None
    except OSError:
        return None


class RetortClient:
    """JSON over HTTP with bearer auth, error documents and retries of safe requests."""

    def __init__(self, url: str, token: str | None):
        self.base = url.rstrip("/")
        self.token = token

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
        req = urllib.request.Request(url, data, hdrs, method=method)
        attempt = 1
        while True:
            try:
                return self._send(req, timeout)
            except (Unreachable, ApiError) as exc:
                retry = isinstance(exc, Unreachable) or exc.status in RETRYABLE_STATUS
                if not retry or attempt >= ATTEMPTS:
                    raise
                pause = BACKOFF_S * 2 ** (attempt - 1)
                if isinstance(exc, ApiError):
                    pause = _retry_after(exc.headers) or pause
            time.sleep(min(pause, 10))
            attempt += 1

    def _send(self, req: urllib.request.Request, timeout: float) -> Reply:
        """Send once; turn every failure into ApiError or Unreachable."""
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return Reply(resp.status, _decode(resp.read()), dict(resp.headers))
        except urllib.error.HTTPError as exc:
            headers = dict(exc.headers or {})
            try:
                body = _decode(exc.read())
            except (OSError, http.client.HTTPException):
                body = None
            if exc.code == 304:  # Not Modified: the answer to If-None-Match, not an error
                return Reply(304, None, headers)
            if not (isinstance(body, dict) and isinstance(body.get("error"), dict)):
                # Not Retort's answer (a proxy's, say): wrap it in the same error shape.
                message = f"HTTP {exc.code} {exc.reason} from {self.base}"
                body = {"error": {"code": f"http_{exc.code}", "message": message, "details": {}}}
            raise ApiError(exc.code, body, headers) from None
        except urllib.error.URLError as exc:
            raise Unreachable(f"cannot reach Retort at {self.base}: {exc.reason}") from None
        except (OSError, http.client.HTTPException) as exc:  # timeouts, resets, bad responses
            raise Unreachable(
                f"cannot reach Retort at {self.base}: {type(exc).__name__}: {exc}"
            ) from None

    def get(self, path: str, **query: Any) -> Any:
        """GET a JSON document; None-valued query parameters are left out."""
        return self.request("GET", path, query=query).body

    # ------------------------------------------------------------ the API

    def push(self, project: str, tar_gz: bytes) -> tuple[dict[str, Any], bool]:
        """Upload a bundle; return (bundle, True if this upload made it)."""
        # The key is the content's, qualified by the project: the server keeps one
        # request per key, so the same scripts pushed to two projects need two keys.
        key = hashlib.sha256(project.encode() + b"\n" + tar_gz).hexdigest()
        reply = self.request(
            "POST",
            f"/v1/projects/{segment(project)}/bundles",
            data=tar_gz,
            content_type="application/gzip",
            headers={"Idempotency-Key": key},
            timeout=120,
        )
        # A replay repeats the first upload's 201: the bundle was there already.
        return reply.body, reply.status == 201 and not _replayed(reply)

    def create_job(self, body: dict[str, Any], idempotency_key: str) -> tuple[dict[str, Any], bool]:
        """Ask for a job; return (job, True if the key had already asked for it).

        The key makes a retried POST return the same job instead of a second one.
        """
        reply = self.request(
            "POST", "/v1/jobs", json_body=body, headers={"Idempotency-Key": idempotency_key}
        )
        return reply.body, _replayed(reply)

    def watch_job(self, job_id: int, timeout: float | None) -> Iterator[dict[str, Any]]:
        """Yield the job each time it changes, until it is final; raise WaitTimeout.

        Long-polls `GET /v1/jobs/{id}?wait=W` with the last ETag as If-None-Match,
        so the server answers as soon as something changes and nothing is missed.
        An answer that brings no change (an older server ignores `wait`, a busy one
        sets Retry-After) is followed by a pause: this never loops tightly.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        etag: str | None = None
        last: dict[str, Any] | None = None
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise WaitTimeout(last, timeout or 0)
            query: dict[str, Any] = {}
            headers: dict[str, str] = {}
            wait = 0.0
            if last is not None:  # the first request only fetches the current state
                limit = MAX_LONG_POLL_S if remaining is None else remaining
                wait = round(max(0.1, min(MAX_LONG_POLL_S, limit)), 1)
                query["wait"] = wait
                if etag:
                    headers["If-None-Match"] = etag
            started = time.monotonic()
            reply = self.request(
                "GET", f"/v1/jobs/{job_id}", query=query, headers=headers, timeout=wait + 30
            )
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
    files = sorted(_walk(directory))
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for rel in files:
                data = (directory / rel).read_bytes()
                info = tarfile.TarInfo(prefix + rel)
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _walk(root: Path) -> Iterator[str]:
    """Yield the relative paths of the files to pack: no caches, no dotfiles."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        for name in filenames:
            path = Path(dirpath) / name
            if name.startswith(".") or name.endswith((".pyc", ".pyo")) or not path.is_file():
                continue
            yield path.relative_to(root).as_posix()


# ---------------------------------------------------------------- helpers


def segment(name: str) -> str:
    """Quote a name for use as one path segment of a URL."""
    return urllib.parse.quote(name, safe="")


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
