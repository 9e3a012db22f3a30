"""Log lines: text (the default) or one JSON object per line (RETORT_LOG_FORMAT=json).

A JSON line carries the job, project and database it is about whenever the
code that logs it works for one: the worker binds them around each job
(run_job), the API around each request whose URL names one. They live in a
context variable, so each thread (an API request, a job's lease heartbeat)
sees its own.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# The fields a line may be about, in the order they are written.
FIELDS = ("job", "project", "database")

# Never mutated: enter() sets a new dict, so a reset restores the one before.
_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "retort_log_context", default=None
)


def enter(**fields: Any) -> contextvars.Token:
    """Add fields (job, project, database) to this thread's lines until leave(token)."""
    known = {k: v for k, v in fields.items() if k in FIELDS and v is not None}
    return _context.set({**(_context.get() or {}), **known})


def leave(token: contextvars.Token) -> None:
    _context.reset(token)


@contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """Put these fields on every line logged within (fields added later go with them)."""
    token = enter(**fields)
    try:
        yield
    finally:
        leave(token)


def bind(**fields: Any) -> None:
    """Add fields to the current context: they go when the enclosing bound() ends."""
    enter(**fields)


def context() -> dict[str, Any]:
    """The fields of this thread's lines now."""
    return dict(_context.get() or {})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, and job, project, database."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        bound_fields = _context.get() or {}
        for name in FIELDS:
            # A field passed with the call (extra={"job": ...}) wins over the context.
            value = getattr(record, name, None)
            if value is None:
                value = bound_fields.get(name)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def formatter(fmt: str) -> logging.Formatter:
    """The formatter of RETORT_LOG_FORMAT's value."""
    if fmt == "json":
        return JsonFormatter()
    if fmt == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"RETORT_LOG_FORMAT is {fmt!r}: use one of {', '.join(FORMATS)}")


def configure(fmt: str, level: int | str = logging.INFO) -> None:
    """Log to stderr in this format: one handler on the root logger (none added twice)."""
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(fmt))
    logging.basicConfig(level=level, handlers=[handler])
    if fmt == "json":
        logging.captureWarnings(True)  # Python's warnings as lines too, not raw text


def reformat(fmt: str, *loggers: logging.Logger) -> None:
    """Write the lines of these loggers' own handlers (gunicorn's, say) in this format."""
    for logger in loggers:
        for handler in logger.handlers:
            handler.setFormatter(formatter(fmt))
