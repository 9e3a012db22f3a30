"""How a job ends, as the worker records it: succeeded, failed (with the step the
runner says failed), handed over; and what a recovered attempt finds applied.

Every write is fenced by the job's lease (JobContext.write); a holder that was
fenced out records nothing and leaves the job to the new holder.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session

from service import targets
from service.audit.actions import AuditAction
from service.databases.models import AppliedRevision, Database
from service.db import utcnow
from service.jobs.models import Job, JobStep
from service.jobs.run import safety
from service.jobs.run.context import JobContext
from service.jobs.run.steps import StepRecorder, checked_error, checked_heads
from service.jobs.run.transitions import finish
from service.jobs.states import FINAL_STATES, JobState
from service.jobs.sweeper import hand_over
from service.locks import ops as leases
from service.locks.ops import FencedOutError

log = logging.getLogger("retort.worker")


def is_final(ctx: JobContext) -> bool:
    state = ctx.run(lambda s: s.scalar(select(Job.state).where(Job.id == ctx.job_id)))
    return state in FINAL_STATES


def succeed(ctx: JobContext, recorder: StepRecorder, origin: list[str], to_heads: list[str]):
    """End the job as succeeded, its last steps and the lease's release in one transaction."""

    def write(s: Session):
        leases.release_fenced(s, ctx.database_id, ctx.token)  # also the fence
        recorder.write_pending(s)
        finish(
            s,
            ctx,
            {"state": JobState.SUCCEEDED, "to_heads": to_heads},
            AuditAction.JOB_SUCCEEDED,
            {"from_heads": origin, "to_heads": to_heads, "steps": recorder.applied},
            released=True,
        )

    try:
        ctx.write(write, fenced_by_fn=True, what=AuditAction.JOB_SUCCEEDED)
    except FencedOutError as exc:
        log.error("job %s: %s; not recording its success", ctx.job_id, exc)


# A plan's or drift check's answer larger than this is cut to its summary (the
# state database keeps it in one JSON value).
MAX_RESULT_BYTES = 4 * 1024 * 1024


def succeed_with_result(
    ctx: JobContext, plan: Any, heads: list[str], raw: Any, url: URL | None
) -> None:
    """End a plan or drift check with its answer; the database was not changed.

    The answer is the runner's report: plain JSON, scrubbed of the target's
    password, bounded in size; a drift check must say whether it found drift.
    """
    result = raw if isinstance(raw, dict) else {}
    if plan.kind == "drift" and not isinstance(result.get("drifted"), bool):
        message = "the runner's drift report does not say whether it found drift"
        fail(ctx, None, url, {"code": "runner_protocol", "message": message}, None)
        return
    if plan.kind == "plan":
        verdict = safety.judge(
            {"findings": result.get("findings"), "mode": result.get("mode")},
            ctx.settings,
            plan.tags,
            safety.allowed_codes(plan.options, None),
            drifted=plan.drifted,
        )
        result["findings"] = verdict.blocking + verdict.allowed + verdict.warnings
        result["would_block"] = sorted({f["code"] for f in verdict.blocking})
    result = _scrubbed(result, url)
    text = json.dumps(result, default=str)
    if len(text) <= MAX_RESULT_BYTES:
        result = json.loads(text)  # plain JSON only, as stored
    else:
        keep = ("mode", "dialect", "from_heads", "to_heads", "nothing_to_do", "drifted", "heads")
        keep += ("would_block", "scratch")
        result = {k: result[k] for k in keep if k in result}
        result["truncated"] = f"the answer was {len(text)} bytes; its details were cut"
    drifted = bool(result.get("drifted")) if plan.kind == "drift" else None
    data: dict[str, Any] = {"kind": plan.kind, "from_heads": heads, "to_heads": heads, "steps": 0}

    def write(s: Session):
        leases.release_fenced(s, ctx.database_id, ctx.token)  # also the fence
        s.execute(sa.update(Job).where(Job.id == ctx.job_id).values(result=result))
        if plan.kind == "drift":
            s.execute(
                sa.update(Database)
                .where(Database.id == ctx.database_id)
                .values(drift_checked_at=utcnow(), drifted=drifted, drift_job_id=ctx.job_id)
            )
            differences = result.get("differences")
            count = len(differences) if isinstance(differences, list) else None
            summary = {"drifted": drifted, "differences": count}
            ctx.audit(s, AuditAction.DATABASE_DRIFT_CHECKED, summary)
            if drifted:
                ctx.audit(s, AuditAction.DATABASE_DRIFT_DETECTED, summary)
        finish(
            s,
            ctx,
            {"state": JobState.SUCCEEDED, "to_heads": heads},
            AuditAction.JOB_SUCCEEDED,
            data,
            released=True,
        )

    try:
        ctx.write(write, fenced_by_fn=True, what=AuditAction.JOB_SUCCEEDED)
    except FencedOutError as exc:
        log.error("job %s: %s; not recording its answer", ctx.job_id, exc)


def _scrubbed(value: Any, url: URL | None, depth: int = 0) -> Any:
    """`value` with the target's password scrubbed from every string (JSON data)."""
    if depth > 32:
        return None
    if isinstance(value, str):
        return targets.scrub(value, url)
    if isinstance(value, list):
        return [_scrubbed(v, url, depth + 1) for v in value]
    if isinstance(value, dict):
        return {str(k)[:200]: _scrubbed(v, url, depth + 1) for k, v in value.items()}
    return value


def record_failure(
    ctx: JobContext, recorder: StepRecorder, url: URL | None, reported: Any, sandbox: str | None
) -> None:
    """The runner reports a failure: record the failed step, then end the job."""
    raw = reported if isinstance(reported, dict) else {}
    error = checked_error(raw, url)
    step = raw.get("step")
    if isinstance(step, dict):
        to_heads = raw.get("to_heads")

        def record(s: Session):
            recorder.write_pending(s)
            recorder.failed_step(s, step)
            s.execute(
                sa.update(Job)
                .where(Job.id == ctx.job_id)
                .values(to_heads=checked_heads(to_heads) if to_heads is not None else None)
            )

        try:
            ctx.write(
                record,
                event=AuditAction.STEP_FAILED,
                data={
                    "revision": error.get("revision"),
                    "error": error.get("database_message") or error["message"],
                },
            )
        except FencedOutError:
            return
        recorder.pending.clear()  # written with the failed step
    fail(ctx, recorder, url, error, sandbox)


def fail(
    ctx: JobContext,
    recorder: StepRecorder | None,
    url: URL | None,
    error: dict[str, Any],
    sandbox: str | None,
) -> None:
    """End the job as failed (scrubbed of the target's password), its last steps with it."""
    error = {"revision": None, "statement": None, **error}
    error = {k: targets.scrub(v, url) if isinstance(v, str) else v for k, v in error.items()}
    if sandbox is not None:
        error.setdefault("sandbox", sandbox)

    def mark(s: Session):
        if recorder is not None:
            recorder.write_pending(s)
        finish(
            s,
            ctx,
            {"state": JobState.FAILED, "error": error},
            AuditAction.JOB_FAILED,
            {"error": error},
        )

    try:
        ctx.write(mark)
    except FencedOutError as exc:
        log.error("job %s: %s; not recording its failure", ctx.job_id, exc)


def hand_over_stopped(ctx: JobContext, stopped: bool) -> None:
    """The heartbeat stopped the runner: hand the job over (lease lost, or shutdown)."""
    if is_final(ctx):
        return
    config = ctx.config
    reason = "worker_shutdown" if stopped else "lease_lost"
    message = (
        f"the worker was shut down and its migration did not end within "
        f"{config.shutdown_grace_s:.0f} s; it was stopped and rolled back"
        if stopped
        else "the job lost its lease (its heartbeat could not renew it) and was stopped"
    )
    try:
        ctx.write(
            lambda s: hand_over(
                s,
                ctx.job_id,
                reason=reason,
                message=message,
                max_attempts=config.max_attempts,
                token=ctx.token,
                actor="worker",
                count_attempt=not stopped,
            )
        )
    except FencedOutError:
        log.warning("job %s: fenced out, leaving its state to the new holder", ctx.job_id)


def record_lost_steps(ctx: JobContext, shas: dict[str, str], lost: list[Any]) -> None:
    """Record the steps an earlier attempt committed on the target but not in Retort.

    Steps are written in batches (STEP_FLUSH_S); a worker lost within that
    window leaves the target ahead of the job's records. The target's version
    table is the truth: record what it says was applied, and say so; never a
    revision another job recorded meanwhile (one that took the lease over).
    """
    lost = [
        e
        for e in lost
        if isinstance(e, dict) and isinstance(e.get("revision"), str) and e["revision"] in shas
    ]
    if not lost:
        return

    def record(s: Session) -> None:
        recorded = {
            rev
            for revs in s.scalars(
                select(JobStep.revisions).where(
                    JobStep.job_id == ctx.job_id,
                    JobStep.state == "applied",
                    JobStep.direction == "up",
                )
            )
            for rev in revs
        }
        recorded |= set(
            s.scalars(
                select(AppliedRevision.revision).where(
                    AppliedRevision.database_id == ctx.database_id,
                    AppliedRevision.job_id != ctx.job_id,
                    AppliedRevision.revision.in_([e["revision"] for e in lost]),
                )
            )
        )
        for entry in lost:
            rev = entry["revision"]
            if rev in recorded:
                continue
            at = utcnow()
            doc = entry.get("doc") if isinstance(entry.get("doc"), str) else None
            s.add(
                JobStep(
                    job_id=ctx.job_id,
                    revisions=[rev],
                    direction="up",
                    state="applied",
                    message=f"{doc} (recorded on recovery: applied by an earlier attempt "
                    "whose worker was lost before recording it)",
                    sql=[],
                    sha256=shas.get(rev),
                    fencing_token=ctx.token,
                    started_at=at,
                    finished_at=at,
                    duration_ms=0.0,
                )
            )
            s.merge(
                AppliedRevision(
                    database_id=ctx.database_id,
                    revision=rev,
                    sha256=shas.get(rev, ""),
                    job_id=ctx.job_id,
                    applied_at=at,
                )
            )
            ctx.audit(s, AuditAction.STEP_RECOVERED, {"revisions": [rev], "direction": "up"})

    ctx.write(record)


def fail_lock_timeout(s: Session, ctx: JobContext, holder: int | None) -> None:
    """Fail a job parked for the lease past RETORT_LOCK_WAIT_TIMEOUT_S (the claim's transaction)."""
    timeout = ctx.config.lock_wait_timeout_s
    error = {
        "code": "lock_timeout",
        "message": f"job {holder} held the lease on this database for longer than {timeout:.0f} s",
        "revision": None,
        "statement": None,
        "held_by_job": holder,
    }
    failed = s.execute(
        sa.update(Job)
        .where(Job.id == ctx.job_id, Job.state == JobState.WAITING_FOR_LOCK)
        .values(state=JobState.FAILED, finished_at=utcnow(), claim_expires_at=None, error=error)
    ).rowcount
    if failed:
        ctx.audit(s, AuditAction.JOB_FAILED, {"code": "lock_timeout"})
        ctx.ended = JobState.FAILED
