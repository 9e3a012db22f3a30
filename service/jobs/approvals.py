"""Approving or rejecting a job the lint parked (state waiting_for_approval).

Who may decide: an admin token, or a token the project names in
`settings.lint.approvers`; never the job's own requester unless the project
allows it (`settings.lint.self_approve`). The requester may always reject
(withdraw) its own job. An approval accepts the codes of the
findings it saw and puts the job back in the queue: it runs from the
database's heads as they are then, linted again, and parks again only for a
blocking code the approval did not cover. Every decision is audited with who,
when and which findings.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from service.audit.actions import AuditAction
from service.audit.ops import record_event
from service.databases.models import Database
from service.db import iso, utcnow
from service.errors import ConflictError, NotAnApproverError
from service.jobs.models import Job
from service.jobs.ops import check_approver, get_job
from service.jobs.states import JobState
from service.principal import Principal
from service.projects.models import Project


def decide(
    session: Session,
    job_id: int,
    decision: str,
    who: Principal,
    comment: str | None = None,
    dispatch: bool = True,
) -> Job:
    """Approve (back to the queue) or reject (cancelled) a job waiting for approval."""
    job = get_job(session, job_id, who)
    project = session.get(Project, job.project_id)
    db = session.get(Database, job.database_id)
    if job.state != JobState.WAITING_FOR_APPROVAL:
        raise ConflictError(
            f"job {job_id} is {job.state}, not waiting for an approval",
            {"job": job_id, "state": job.state},
            code="not_waiting_for_approval",
        )
    if not (decision == "rejected" and who.name == job.requested_by):
        check_decider(project, job, who)  # a requester may withdraw, never approve, its job
    blocking = (job.findings or {}).get("blocking") or []
    codes = sorted({f.get("code") for f in blocking if isinstance(f, dict)})
    if decision == "approved" and job.approval and job.approval.get("decision") == "approved":
        # An earlier approval of this job still stands for the codes it covered.
        codes = sorted(set(codes) | set(job.approval.get("codes") or ()))
    approval: dict[str, Any] = {
        "decision": decision,
        "by": who.name,
        "at": iso(utcnow()),
        "codes": codes,
        "comment": comment,
    }
    if decision == "approved":
        values: dict[str, Any] = {
            "state": JobState.QUEUED,
            "approval": approval,
            # Sent by the caller after the commit; the sweeper resends if that fails.
            "dispatched_at": utcnow() if dispatch else None,
        }
    else:
        error = {
            "code": "rejected",
            "message": f"{who.name} rejected the job's blocking findings "
            f"({', '.join(codes)})" + (f": {comment}" if comment else ""),
            "revision": None,
            "statement": None,
        }
        values = {"state": JobState.CANCELLED, "approval": approval, "error": error}
        values["finished_at"] = utcnow()
    done = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.WAITING_FOR_APPROVAL)
        .values(values)
    ).rowcount
    if not done:
        raise ConflictError(
            f"job {job_id} was decided meanwhile", {"job": job_id}, code="not_waiting_for_approval"
        )
    record_event(
        session,
        AuditAction.JOB_APPROVED if decision == "approved" else AuditAction.JOB_REJECTED,
        actor=who.name,
        project=project.name,
        database=db.name,
        job_id=job.id,
        data={
            "codes": codes,
            "comment": comment,
            "findings": [
                {k: f.get(k) for k in ("code", "revision", "table", "message")} for f in blocking
            ],
        },
    )
    if decision == "rejected":
        record_event(
            session,
            AuditAction.JOB_CANCELLED,
            actor=who.name,
            project=project.name,
            database=db.name,
            job_id=job.id,
            data={"reason": "rejected"},
        )
    session.refresh(job)
    return job


def check_decider(project: Project, job: Job, who: Principal) -> None:
    """Refuse (403) a token that may not approve this job: not an approver, or its requester."""
    check_approver(project, who, "approve or reject")
    lint = (project.settings or {}).get("lint") or {}
    if who.name == job.requested_by and not lint.get("self_approve"):
        raise NotAnApproverError(
            f"{who.name} requested job {job.id}: another token must approve it (or set the "
            "project's settings.lint.self_approve)",
            {"project": project.name, "token": who.name, "requested_by": job.requested_by},
        )
