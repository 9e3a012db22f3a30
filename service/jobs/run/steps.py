"""Recording the steps a runner reports: checked, scrubbed, fenced, batched.

A runner's report is data about its own job, never authority: a step may
only name revisions of the job's own bundle, its SQL is scrubbed of the
target's password and bounded, and every write is fenced by the job's lease.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import bindparam, insert, select
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session

from service import metrics, targets
from service.audit.actions import AuditAction
from service.databases.models import AppliedRevision
from service.db import utcnow
from service.jobs.models import JobStep
from service.jobs.run.context import JobContext

# Steps that follow each other faster than this share one state transaction:
# a 30-revision chain costs one write instead of 30, while a slow migration
# still shows each step as it lands.
STEP_FLUSH_S = 0.25
MAX_STATEMENTS = 10_000
MAX_STATEMENT_CHARS = 100_000
_DIRECTIONS = ("up", "down", "stamp")

_applied = AppliedRevision.__table__
_APPLIED_CHECKSUMS = select(_applied.c.revision, _applied.c.sha256).where(
    _applied.c.database_id == bindparam("database_id")
)
_UNAPPLY = _applied.delete().where(
    _applied.c.database_id == bindparam("database_id"),
    _applied.c.revision.in_(bindparam("revisions", expanding=True)),
)
_INSERT_APPLIED = insert(_applied)
_INSERT_STEPS = insert(JobStep.__table__)


# Fields of a failure a runner may report (anything else is dropped).
ERROR_FIELDS = (
    "code",
    "message",
    "revision",
    "statement",
    "database_message",
    "database_heads",
    "file",
    "line",
    "source",
    "traceback",
    "module",
    "revisions",
)


class BadReport(Exception):
    """A runner sent a report that is not about its own job (or not well formed)."""


def applied_checksums(s: Session, database_id: int) -> dict[str, str]:
    rows = s.connection().execute(_APPLIED_CHECKSUMS, {"database_id": database_id})
    return dict(rows.tuples().all())


def _when(value: Any) -> dt.datetime:
    """A runner's timestamp, if it is a plausible one; else now."""
    now = utcnow()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        at = dt.datetime.fromtimestamp(value, dt.UTC)
        if abs((at - now).total_seconds()) < 7 * 24 * 3600:
            return at
    return now


def checked_step(message: dict[str, Any], known: dict[str, str], url: URL | None) -> dict[str, Any]:
    """The fields of a reported step, checked against the job's bundle and scrubbed."""
    revisions = message.get("revisions")
    if not isinstance(revisions, list) or not all(
        isinstance(r, str) and r in known for r in revisions
    ):
        raise BadReport(f"a step names revisions outside the job's bundle: {revisions!r:.200}")
    direction = message.get("direction", "up")
    if direction not in _DIRECTIONS:
        raise BadReport(f"a step with direction {direction!r:.50}")
    sql = message.get("sql") or []
    if not isinstance(sql, list):
        raise BadReport("a step whose sql is not a list")
    sql = [targets.scrub(str(q)[:MAX_STATEMENT_CHARS], url) for q in sql[:MAX_STATEMENTS]]
    doc = message.get("message")
    duration = message.get("duration_ms")
    if not isinstance(duration, (int, float)) or isinstance(duration, bool) or duration < 0:
        duration = 0.0
    return {
        "revisions": revisions,
        "direction": direction,
        "upgrade": bool(message.get("upgrade", direction == "up")),
        "message": targets.scrub(str(doc)[:2000], url) if doc is not None else None,
        "sql": sql,
        "started_at": _when(message.get("started_at")),
        "finished_at": _when(message.get("finished_at")),
        "duration_ms": float(duration),
    }


@dataclass
class StepRecorder:
    """The steps of one job, written as they land (batched within STEP_FLUSH_S)."""

    ctx: JobContext
    sha_by_revision: dict[str, str]
    url: URL | None
    applied: int = 0
    pending: list[dict[str, Any]] = field(default_factory=list)
    flushed_at: float = field(default_factory=time.monotonic)

    def on_step(self, message: dict[str, Any], check: bool = True) -> None:
        """A step the runner applied and is about to commit: fence it, keep its record.

        `check`: the runner waits for the answer (it was past the time the
        lease is surely held); raises FencedOutError when this job no longer
        holds the lease: the runner is then told to stop, and the target rolls
        the step back. Otherwise the runner committed within that time, and
        the record is fenced when it is written.
        """
        step = checked_step(message, self.sha_by_revision, self.url)
        revisions = step["revisions"]
        sha = self.sha_by_revision.get(revisions[0]) if revisions else None
        record = {
            "job_id": self.ctx.job_id,
            "revisions": revisions,
            "direction": step["direction"],
            "state": "applied",
            "message": step["message"],
            "sql": step["sql"],
            "sha256": sha,
            "fencing_token": self.ctx.token,
            "started_at": step["started_at"],
            "finished_at": step["finished_at"],
            "duration_ms": step["duration_ms"],
            "_upgrade": step["upgrade"],
            "_event": {
                "revisions": revisions,
                "direction": step["direction"],
                "duration_ms": round(step["duration_ms"], 3),
                "statements": len(step["sql"]),
                "sha256": sha,
            },
        }
        if time.monotonic() - self.flushed_at >= STEP_FLUSH_S:
            # A slow migration: record this step now (fenced), so it shows at once.
            self.pending.append(record)
            self.flush()
        else:
            # Fast steps: check the fence before this COMMIT (if the runner
            # asks), write the records together a little later (or with the
            # job's end), fenced again then.
            if check:
                self.ctx.check_fence(AuditAction.STEP_APPLIED)
            self.pending.append(record)
        self.applied += 1
        metrics.revision_applied(self.ctx.project, step["direction"], step["duration_ms"])

    def due(self) -> bool:
        """Whether buffered steps have waited long enough to be written now."""
        return bool(self.pending) and time.monotonic() - self.flushed_at >= STEP_FLUSH_S

    def write_pending(self, s: Session) -> None:
        """Write the buffered step records in the caller's (fenced) transaction.

        A few statements whatever the number of steps: the steps in one INSERT,
        the checksums of what is now applied in one DELETE and one INSERT.
        """
        if not self.pending:  # kept until committed: the write may be retried
            return
        applied: dict[str, dict[str, Any]] = {}
        unapplied: set[str] = set()
        steps = []
        for record in self.pending:
            row = {k: v for k, v in record.items() if not k.startswith("_")}
            steps.append(row)
            for rev in row["revisions"]:
                if record["_upgrade"]:
                    unapplied.discard(rev)
                    applied[rev] = {
                        "database_id": self.ctx.database_id,
                        "revision": rev,
                        "sha256": self.sha_by_revision.get(rev, ""),
                        "job_id": self.ctx.job_id,
                        "applied_at": row["finished_at"],
                    }
                else:
                    applied.pop(rev, None)
                    unapplied.add(rev)
            self.ctx.audit(s, AuditAction.STEP_APPLIED, record["_event"])
        conn = s.connection()
        conn.execute(_INSERT_STEPS, steps)
        if applied or unapplied:
            revisions = sorted(unapplied | set(applied))
            conn.execute(_UNAPPLY, {"database_id": self.ctx.database_id, "revisions": revisions})
        if applied:
            conn.execute(_INSERT_APPLIED, list(applied.values()))

    def flush(self) -> None:
        if self.pending:
            self.ctx.write(self.write_pending, what=AuditAction.STEP_APPLIED)
            self.pending.clear()
        self.flushed_at = time.monotonic()

    def failed_step(self, s: Session, message: dict[str, Any] | None) -> None:
        """Record the step that failed (its SQL up to the failure), in the caller's transaction."""
        if not isinstance(message, dict):
            return
        try:
            step = checked_step(message, self.sha_by_revision, self.url)
        except BadReport:
            return
        revisions = step["revisions"]
        s.add(
            JobStep(
                job_id=self.ctx.job_id,
                revisions=revisions,
                direction=step["direction"],
                state="failed",
                message=step["message"],
                sql=step["sql"],
                sha256=self.sha_by_revision.get(revisions[0]) if revisions else None,
                fencing_token=self.ctx.token,
                started_at=step["started_at"],
                finished_at=step["finished_at"],
                duration_ms=step["duration_ms"],
            )
        )


def checked_heads(value: Any) -> list[str]:
    """A runner's list of heads, if it is one (revision ids are short strings)."""
    if isinstance(value, list) and all(isinstance(h, str) and len(h) <= 255 for h in value):
        return sorted(value)[:1000]
    raise BadReport(f"heads that are not a list of revision ids: {value!r:.200}")


def checked_error(error: Any, url: URL | None) -> dict[str, Any]:
    """A runner's failure report, reduced to the fields a job's error has."""
    if not isinstance(error, dict):
        return {"code": "runner_protocol", "message": "the runner failed without saying why"}
    out: dict[str, Any] = {}
    for key in ERROR_FIELDS:
        value = error.get(key)
        if isinstance(value, str):
            out[key] = targets.scrub(value[:20_000], url)
        elif isinstance(value, (int, float, bool)):
            out[key] = value
        elif value is None and key in ("revision", "statement"):
            out[key] = None
        elif isinstance(value, list):
            out[key] = [str(v)[:255] for v in value[:1000]]
    code = out.get("code")
    out["code"] = code[:64] if isinstance(code, str) and code else "internal_error"
    out["message"] = out.get("message") or out["code"]
    return out
