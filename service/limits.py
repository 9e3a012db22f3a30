"""Request limits (issue 16): bounded bodies, per-token slots, bounded refusal audit.

What one client may cost an API process, whoever it is:

- A JSON body is at most `max_body_bytes` however it arrives: with a
  Content-Length or chunked, at most limit + 1 bytes are read. It nests at most
  `max_json_depth` deep, checked by an iterative scan before json.loads (which
  recurses) sees it.
- Every body arrives within `body_timeout_s` of the request's start, or the
  request is answered 408 and its thread freed. A socket timeout bounds one
  read, not the body: a client sending a byte a second would never trip it.
  So one thread per process (the watchdog) shuts the read side of a socket
  whose read is still waiting at the deadline, which ends the read at once.
- Per token (requests without one: per source address), a process holds at
  most `max_requests_per_token` requests at once and, of those,
  `max_streams_per_token` long polls and event streams; past that, a 429 with
  Retry-After.
- Unauthenticated refusals are counted, and audited as at most one event per
  source address per `refusal_audit_window_s` per process, carrying the count.
"""

from __future__ import annotations

import atexit
import heapq
import itertools
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from flask import g, request
from werkzeug.wsgi import ClosingIterator

from service.errors import (
    BodyTimeoutError,
    InvalidError,
    JsonTooDeepError,
    PayloadTooLargeError,
    ServiceError,
    TooManyRequestsError,
    TooManyStreamsError,
)

log = logging.getLogger("retort.api")

ENVIRON_KEY = "retort.limits"
READ_STEP = 64 * 1024
# A body the handler left unread (a refused request) is discarded while it
# keeps arriving, at most this much for this long, so that the connection can
# be kept and the client reads its answer; otherwise the connection closes.
DRAIN_IDLE_S = 0.1
DRAIN_MAX_S = 1.0
DRAIN_MAX_BYTES = 1024 * 1024
# A read begun after the body's deadline may still wait this long (for bytes
# already on their way); it is never a reason to wait for a slow client.
LATE_READ_S = 0.05
# The shortest socket timeout a read is given. A thread that runs late (a loaded
# machine) may find its read's time already spent: settimeout() refuses a
# negative value (ValueError, which would be a 500), and 0 would make the
# socket non-blocking; a tiny timeout still returns what has arrived.
MIN_READ_TIMEOUT_S = 0.001
# Sources whose refusals one process tracks at once; refusals from further
# sources share one count, under this source.
MAX_SOURCES = 1024
OVERFLOW_SOURCE = "*"
# What an audited refusal keeps of the path.
PATH_CHARS = 200


# ---------------------------------------------------------------- JSON bodies

# A JSON string, escapes included (unrolled: linear, whatever it holds).
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def json_too_deep(text: str, limit: int) -> bool:
    """Whether JSON `text` nests arrays and objects more than `limit` deep; no recursion.

    Strings are cut out first (brackets in them do not count), then the
    brackets left are counted in one loop. A body that is not JSON may be
    counted oddly: json.loads refuses it afterwards anyway.
    """
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    if brackets.count("[") + brackets.count("{") <= limit:
        return False
    depth = 0
    for ch in brackets:
        if ch in "[{":
            depth += 1
            if depth > limit:
                return True
        elif depth:
            depth -= 1
    return False


def read_body(stream, limit: int) -> bytes:
    """Read a whole body, but never more than limit + 1 bytes: 413 past `limit`."""
    parts: list[bytes] = []
    size = 0
    while True:
        data = stream.read(min(READ_STEP, limit + 1 - size))
        if not data:
            return b"".join(parts)
        parts.append(data)
        size += len(data)
        if size > limit:
            raise PayloadTooLargeError("the request body is too large", {"limit_bytes": limit})


def load_json(stream, limit: int, max_depth: int) -> Any:
    """Read and parse a JSON body within the size and depth limits, or raise a 4xx."""
    raw = read_body(stream, limit)
    not_json = InvalidError("the body is not valid JSON", code="invalid_json")
    try:
        text = raw.decode(json.detect_encoding(raw), "surrogatepass")
    except (UnicodeDecodeError, LookupError):
        raise not_json from None
    too_deep = JsonTooDeepError(
        f"the body nests arrays and objects more than {max_depth} deep",
        {"max_depth": max_depth},
    )
    if json_too_deep(text, max_depth):
        raise too_deep
    try:
        data = json.loads(text)
    except RecursionError:  # the scan above makes this unreachable; never a 500 anyway
        raise too_deep from None
    except ValueError:
        raise not_json from None
    if data is None:
        raise not_json
    return data


# ---------------------------------------------------------------- the body deadline


def _shut_read(sock: socket.socket) -> None:
    # socket.socket's own method on purpose: an SSLSocket's would drop its TLS state.
    with suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RD)


class _Watch:
    __slots__ = ("sock", "active", "fired")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.active = True
        self.fired = False


class _Watchdog:
    """One thread per process: at a read's deadline, shut the read side of its socket.

    A recv() waiting on that socket returns at once (end of stream), however
    many bytes trickled in before. watch() and unwatch() bracket one read, in
    the request's thread, so the socket is open all the while it is watched.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Watch]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def watch(self, sock: socket.socket, deadline: float) -> _Watch:
        entry = _Watch(sock)
        with self._cond:
            # gunicorn forks after import: start the thread in the process that reads.
            if self._pid != os.getpid() or self._thread is None or not self._thread.is_alive():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="body-watchdog")
                self._thread.daemon = True
                self._thread.start()
            heapq.heappush(self._heap, (deadline, next(self._seq), entry))
            if self._heap[0][2] is entry:
                self._cond.notify()
        return entry

    def unwatch(self, entry: _Watch) -> bool:
        """Stop watching; True if the deadline came first (the socket's read side is shut)."""
        with self._cond:
            entry.active = False
            return entry.fired

    def _run(self) -> None:
        with self._cond:
            while True:
                while self._heap and not self._heap[0][2].active:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                deadline, _, entry = self._heap[0]
                delay = deadline - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                heapq.heappop(self._heap)
                entry.active, entry.fired = False, True
                _shut_read(entry.sock)


class _Body:
    """wsgi.input, read against the request's deadline, knowing whether it was read to its end."""

    def __init__(self, inner, environ: dict, deadline: float, timeout_s: float, watchdog):
        self._inner = inner
        self._deadline = deadline
        self._timeout_s = timeout_s
        self._watchdog = watchdog
        sock = environ.get("gunicorn.socket")
        # One request per connection (HTTP/1.x): shutting its socket ends only this body.
        http1 = str(environ.get("SERVER_PROTOCOL", "")).startswith("HTTP/1")
        self._sock = sock if isinstance(sock, socket.socket) and http1 else None
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        try:
            length = None if chunked else int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        self._length = length
        self._consumed = 0
        self._eof = False
        self.timed_out = False

    @property
    def complete(self) -> bool:
        if self._length is not None:
            return self._consumed >= self._length
        return self._eof

    def read(self, size: int | None = -1) -> bytes:
        return self._guarded(self._inner.read, size)

    def readline(self, size: int | None = -1) -> bytes:
        return self._guarded(self._inner.readline, size)

    def readlines(self, hint: int = -1) -> list[bytes]:
        lines, total = [], 0
        while line := self.readline():
            lines.append(line)
            total += len(line)
            if 0 < hint <= total:
                break
        return lines

    def __iter__(self):
        while line := self.readline():
            yield line

    def _guarded(self, read: Callable[[Any], bytes], size: int | None) -> bytes:
        if self.timed_out:
            self._time_out()
        # Past the deadline (a slow handler, not a slow client), what has already
        # arrived may still be read: a read that finds it at once is no wait.
        until = max(self._deadline, time.monotonic() + LATE_READ_S)
        sock, watch, prior = self._sock, None, None
        if sock is not None:
            prior = sock.gettimeout()
            sock.settimeout(max(until - time.monotonic(), MIN_READ_TIMEOUT_S))
            watch = self._watchdog.watch(sock, until)
        elif time.monotonic() >= self._deadline:
            self._time_out()
        error: Exception | None = None
        data = b""
        try:
            data = read(size)
        except OSError as exc:  # a timeout, the end of the stream, a reset
            error = exc
        except Exception as exc:  # noqa: BLE001 - the server's parser (a malformed chunk)
            self.abandon()
            raise ServiceError(
                "the request body could not be read",
                {"reason": type(exc).__name__},
                code="malformed_body",
            ) from None
        finally:
            fired = watch is not None and self._watchdog.unwatch(watch)
            if sock is not None:
                with suppress(OSError):
                    sock.settimeout(prior)
        # A socket timeout is ours (set above): the deadline, as when the watchdog fired.
        if fired or isinstance(error, TimeoutError) or (error and time.monotonic() >= until):
            self._time_out()
        if error is not None:
            raise error
        if data:
            self._consumed += len(data)
        elif size is None or size != 0:
            self._eof = True
        return data

    def _time_out(self):
        self.timed_out = True
        self.abandon()
        raise BodyTimeoutError(
            f"the request body did not arrive within {self._timeout_s:g} s",
            {"timeout_s": self._timeout_s},
        )

    def abandon(self) -> None:
        """Give up on the body: the server closes the connection instead of reading on."""
        if self._sock is not None:
            _shut_read(self._sock)
        if hasattr(self._inner, "failed"):  # gunicorn's Body: then it does not drain either
            self._inner.failed = True

    def finish(self) -> None:
        """After the answer: discard an unread body that keeps coming, briefly, or abandon it."""
        if self.complete or self.timed_out or self._sock is None:
            return
        sock = self._sock
        until = time.monotonic() + min(
            DRAIN_MAX_S, max(DRAIN_IDLE_S, self._deadline - time.monotonic())
        )
        prior = sock.gettimeout()
        watch = self._watchdog.watch(sock, until)
        drained = 0
        try:
            sock.settimeout(DRAIN_IDLE_S)
            while drained <= DRAIN_MAX_BYTES and not self.complete:
                data = self._inner.read(READ_STEP)
                if not data:
                    self._eof = True
                    break
                drained += len(data)
                self._consumed += len(data)
        except Exception:  # noqa: BLE001 - silent or broken: the connection closes
            pass
        finally:
            fired = self._watchdog.unwatch(watch)
            with suppress(OSError):
                sock.settimeout(prior)
        if fired or not self.complete:
            self.abandon()


# ---------------------------------------------------------------- per-token slots


class Slots:
    """At most `cap` held at once per key (0: no cap); the map holds only keys in use."""

    def __init__(self, cap: int):
        self.cap = cap
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> bool:
        with self._lock:
            n = self._held.get(key, 0)
            if 0 < self.cap <= n:
                return False
            self._held[key] = n + 1
            return True

    def give(self, key: str) -> None:
        with self._lock:
            n = self._held.get(key, 0) - 1
            if n > 0:
                self._held[key] = n
            else:
                self._held.pop(key, None)

    def held(self, key: str) -> int:
        with self._lock:
            return self._held.get(key, 0)


class _Hold:
    """A taken slot; calling it gives the slot back, once."""

    __slots__ = ("_slots", "_key", "_once")

    def __init__(self, slots: Slots, key: str):
        self._slots, self._key, self._once = slots, key, threading.Lock()

    def __call__(self) -> None:
        if self._once.acquire(blocking=False):
            self._slots.give(self._key)


# ---------------------------------------------------------------- refusals


class _Source:
    __slots__ = ("until", "pending", "first")

    def __init__(self, until: float):
        self.until = until
        self.pending = 0
        self.first: dict[str, Any] | None = None


class RefusalAggregator:
    """Unauthenticated refusals: all counted, audited once per source per window.

    A source's first refused write is recorded at once (count 1) and opens a
    window; those that follow in it are only counted, then recorded as one
    event carrying their count when the window closes, which opens the next
    window if there was any. A source with nothing left to record is
    forgotten, and at most MAX_SOURCES are tracked: refusals from sources
    beyond those share one count (source "*"). A source's events add up to
    its refused writes. `total` counts every unauthenticated refusal (reads
    too) of this process; each record's log line reports it. Windows are
    measured on `clock` (monotonic seconds; a test may pass its own).
    """

    def __init__(
        self,
        window_s: float,
        write: Callable[[dict[str, Any]], None],
        clock: Callable[[], float] = time.monotonic,
    ):
        self.window_s = window_s
        self.total = 0
        self._write = write
        self._clock = clock
        self._cond = threading.Condition()
        self._sources: dict[str, _Source] = {}
        self._thread: threading.Thread | None = None
        self._pid = 0

    def note(self, source: str, event: dict[str, Any] | None) -> None:
        """Count a refusal; `event` (a refused write) is audited, None (a read) only counted."""
        with self._cond:
            self.total += 1
            if event is None:
                return
            entry = self._sources.get(source)
            if entry is None and len(self._sources) >= MAX_SOURCES:
                source = OVERFLOW_SOURCE
                entry = self._sources.get(source)
            if entry is not None:
                entry.pending += 1
                entry.first = entry.first or event
                return
            self._sources[source] = _Source(self._clock() + self.window_s)
            self._ensure_thread()
            self._cond.notify()
        self._record(source, 1, event)

    def flush(self) -> None:
        """Record every count not yet recorded (at exit)."""
        with self._cond:
            due = [(s, e.pending, e.first) for s, e in self._sources.items() if e.pending]
            self._sources.clear()
        for source, count, first in due:
            self._record(source, count, first)

    def _ensure_thread(self) -> None:
        if self._pid != os.getpid() or self._thread is None or not self._thread.is_alive():
            if self._pid != os.getpid():
                atexit.register(self.flush)
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._run, name="refusal-audit")
            self._thread.daemon = True
            self._thread.start()

    def _run(self) -> None:
        while True:
            due = []
            with self._cond:
                now = self._clock()
                for source, entry in list(self._sources.items()):
                    if entry.until > now:
                        continue
                    if entry.pending:
                        due.append((source, entry.pending, entry.first))
                        entry.pending, entry.first = 0, None
                        entry.until = now + self.window_s
                    else:
                        del self._sources[source]
                if not due:
                    soonest = min((e.until for e in self._sources.values()), default=None)
                    self._cond.wait(None if soonest is None else max(0.01, soonest - now))
                    continue
            for source, count, first in due:
                self._record(source, count, first)

    def _record(self, source: str, count: int, event: dict[str, Any] | None) -> None:
        event = event or {}
        log.warning(
            "refused %d unauthenticated request(s) from %s (%s %s: %s); %d in this process",
            count,
            source,
            event.get("method"),
            event.get("path"),
            event.get("code"),
            self.total,
        )
        try:
            self._write({**event, "source": source, "count": count, "window_s": self.window_s})
        except Exception:  # noqa: BLE001 - counted and logged even if it cannot be recorded
            log.exception("could not record %d refusals from %s", count, source)


# ---------------------------------------------------------------- per request


class _Request:
    def __init__(self, limits: RequestLimits, environ: dict):
        self.limits = limits
        deadline = time.monotonic() + limits.body_timeout_s
        self.body = _Body(
            environ["wsgi.input"], environ, deadline, limits.body_timeout_s, limits.watchdog
        )
        environ["wsgi.input"] = self.body
        self._holds: list[_Hold] = []

    def hold(self, slots: Slots, key: str) -> _Hold | None:
        if not slots.take(key):
            return None
        held = _Hold(slots, key)
        self._holds.append(held)
        return held

    def close(self) -> None:
        try:
            self.body.finish()
        finally:
            for held in self._holds:
                held()


class RequestLimits:
    """The limits of one API process, and the WSGI middleware that applies them."""

    def __init__(self, config, write_refusal: Callable[[dict[str, Any]], None]):
        self.body_timeout_s = config.body_timeout_s
        self.requests = Slots(config.max_requests_per_token)
        self.streams = Slots(config.max_streams_per_token)
        self.refusals = RefusalAggregator(config.refusal_audit_window_s, write_refusal)
        self.watchdog = _Watchdog()

    def wrap(self, app):
        def limited(environ, start_response):
            state = _Request(self, environ)
            environ[ENVIRON_KEY] = state
            try:
                body = app(environ, start_response)
            except BaseException:
                state.close()
                raise
            # Closed once the answer is written (a stream: when it ends).
            return ClosingIterator(body, state.close)

        return limited


def _state() -> _Request | None:
    return request.environ.get(ENVIRON_KEY)


def hold_request(key: str) -> None:
    """Count this request against `key` ("token:…" or "addr:…") until it ends, or 429."""
    state = _state()
    if state is None:
        return
    if state.hold(state.limits.requests, key) is None:
        raise TooManyRequestsError(
            "this token has as many requests in flight on this API process as it may; "
            "retry shortly",
            {"limit": state.limits.requests.cap, "retry_after_s": 1},
        )


def hold_stream() -> Callable[[], None]:
    """Take one of this token's long-poll and event-stream slots, or 429; call to give it back."""
    state = _state()
    if state is None:
        return lambda: None
    held = state.hold(state.limits.streams, f"token:{g.token_digest}")
    if held is None:
        raise TooManyStreamsError(
            "this token holds as many long polls and event streams on this API process "
            "as it may; retry shortly",
            {"limit": state.limits.streams.cap, "retry_after_s": 2},
        )
    return held


def refusal_event(method: str, path: str, status: int, code: str, message: str) -> dict:
    """What the audit log keeps of a refused request (the path cut short)."""
    return {
        "method": method,
        "path": path[:PATH_CHARS],
        "status": status,
        "code": code,
        "message": message[:500],
    }
