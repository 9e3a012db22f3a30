"""run_job: read a queued job, and run it on this worker (a second delivery does nothing)."""

from __future__ import annotations

import logging

from sqlalchemy import update

from service import logs, metrics
from service.db import autocommit, transaction
from service.jobs.models import Job
from service.jobs.run import admission
from service.jobs.run.bundles import bundle_info
from service.jobs.run.context import JobContext, WorkerProcess
from service.jobs.run.supervise import JobRun, Plan
from service.jobs.run.transitions import QUEUED_JOB
from service.jobs.states import JobState
from service.rollouts.drive import drive

log = logging.getLogger("retort.worker")


def run_job(process: WorkerProcess, job_id: int) -> str:
    """Run a job to its end; return what became of it ("done", "not_claimed", "not_started",
    "parked")."""
    with logs.bound(job=job_id):  # every line logged meanwhile says which job (JSON logs)
        return _run_job(process, job_id)


def _run_job(process: WorkerProcess, job_id: int) -> str:
    if process.shutdown_deadline is not None:
        # Shutting down: leave the job queued, marked unsent, so the sweeper
        # hands it to another worker at its next round.
        with transaction(process.sessions) as s:
            s.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == JobState.QUEUED)
                .values(dispatched_at=None)
            )
        return "not_claimed"
    with autocommit(process.sessions.kw["bind"]) as conn:  # a read: no BEGIN/COMMIT round trips
        job = conn.execute(QUEUED_JOB, {"job_id": job_id}).one_or_none()
        # Queued, or parked: waiting with no worker (see admission).
        queued = job is not None and (
            job.state == JobState.QUEUED
            or (job.state == JobState.WAITING_FOR_LOCK and job.worker is None)
        )
        bundle = bundle_info(process, conn, job.bundle_pk) if queued else None
    if bundle is None:
        log.info("job %s not claimed (state %s)", job_id, job.state if job else "missing")
        return "not_claimed"
    plan = Plan(
        action=job.action,
        target=job.resolved_target or job.target,
        attempt=job.attempt,
        previously_started=job.started_at is not None,
        from_heads=job.from_heads,
        bundle=bundle,
        url_encrypted=job.url_encrypted,
        secret_env=job.secret_env or {},
        kind=job.kind or "migrate",
        options=job.options or {},
        approval=job.approval,
        requested_by=job.requested_by,
        tags=job.tags or {},
        drifted=bool(job.drifted),
        waiting_for=job.waiting_for,
        waiting_on=job.waiting_on_job_id,
        waiting_since=job.waiting_since,
        rollout_id=job.rollout_id,
    )
    logs.bind(project=job.project, database=job.database)
    ctx = JobContext(
        job_id=job_id,
        database_id=job.database_id,
        database=job.database,
        project=job.project,
        project_id=job.project_id,
        settings=job.settings,
        process=process,
    )
    outcome = JobRun(ctx, plan).run()
    metrics.job_ended(ctx)  # if this run ended it (ctx.ended)
    if outcome == "done":
        after_job(ctx, plan.rollout_id)
    return outcome


def after_job(ctx: JobContext, rollout_id: int | None) -> None:
    """The job ended: send the jobs it kept waiting, and move its rollout on.

    On the process's scheduler thread, so that this worker takes its next
    message at once (a rollout keeps jobs queued ahead: its next one is there).
    """
    process = ctx.process

    def wake() -> None:
        sender = process.scheduler.dispatcher
        try:
            for job_id in admission.wake_waiters(ctx):
                sender.send_job(job_id)
            if rollout_id is not None:
                drive(process.sessions, sender, process.wakeups, rollout_id)
        except Exception:  # noqa: BLE001 - the sweeper's rounds do it when this fails
            log.exception("job %s: waking its waiters or its rollout failed", ctx.job_id)

    process.scheduler.submit(wake)
