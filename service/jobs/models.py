from __future__ import annotations

import datetime as dt

from sqlalchemy import BigInteger, DateTime, Float, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from service.db import Base, utcnow
from service.jobs.states import JobState

# What a job does: apply revisions, show what they would run, or compare schemas.
KINDS = ("migrate", "plan", "drift")


class Job(Base):
    """One migration request; the row is the record of truth, not the broker's message."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_database_id_id", "database_id", "id"),
        Index("ix_jobs_state_id", "state", "id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    database_id: Mapped[int] = mapped_column(ForeignKey("databases.id"))
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    bundle_pk: Mapped[int] = mapped_column(ForeignKey("bundles.pk"))
    kind: Mapped[str] = mapped_column(String(10), default="migrate", server_default="migrate")
    action: Mapped[str] = mapped_column(String(20))
    target: Mapped[str] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(20), default=JobState.QUEUED)
    # 1 for the first run; each recovery after a lost worker runs it again from
    # the target's current heads, as the next attempt.
    attempt: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    # A relative target (+N, -N, branch@+N) resolved to a revision when first planned,
    # so that a recovered attempt goes to the same place.
    resolved_target: Mapped[str | None] = mapped_column(String(200), default=None)
    # While claimed but not yet holding the lease: the worker renews this (epoch
    # seconds on the state database's clock); past it, the sweeper recovers the job.
    claim_expires_at: Mapped[float | None] = mapped_column(Float, default=None)
    from_heads: Mapped[list | None] = mapped_column(default=None)
    to_heads: Mapped[list | None] = mapped_column(default=None)
    error: Mapped[dict | None] = mapped_column(default=None)
    fencing_token: Mapped[int | None] = mapped_column(BigInteger, default=None)
    lock_waited_ms: Mapped[int | None] = mapped_column(Integer, default=None)
    waiting_on_job_id: Mapped[int | None] = mapped_column(default=None)
    # A parked job (waiting_for_lock with no worker, see jobs.run.admission):
    # what it waits for ("lease" or "project_slot"), and since when it waits.
    waiting_for: Mapped[str | None] = mapped_column(String(20), default=None)
    waiting_since: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    # The rollout this job is one database's part of (docs/rollouts.md).
    rollout_id: Mapped[int | None] = mapped_column(ForeignKey("rollouts.id"), default=None)
    # When the message was last handed to the broker (None: it never was).
    dispatched_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    worker: Mapped[str | None] = mapped_column(String(200), default=None)
    # Which sandbox ran the job's revision code: "bwrap" or "process" (docs/security.md).
    sandbox: Mapped[str | None] = mapped_column(String(16), default=None)
    # What ran the job: {environment, python, sqlalchemy, alembic} (the runner says).
    runtime: Mapped[dict | None] = mapped_column(default=None)
    # What the request asked besides action and target: plan_mode, allow (lint codes).
    options: Mapped[dict | None] = mapped_column(default=None)
    # A plan's or a drift check's answer (kind "plan" / "drift").
    result: Mapped[dict | None] = mapped_column(default=None)
    # The lint's findings when the job last looked at its database:
    # {"blocking": [...], "warnings": [...], "allowed": [...]}.
    findings: Mapped[dict | None] = mapped_column(default=None)
    # {"decision": "approved"|"rejected", "by", "at", "codes"}: who decided on the findings.
    approval: Mapped[dict | None] = mapped_column(default=None)
    requested_by: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), default=None)


class JobStep(Base):
    """One applied (or failed) Alembic step: its revisions, SQL and duration."""

    __tablename__ = "job_steps"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    revisions: Mapped[list] = mapped_column()
    direction: Mapped[str] = mapped_column(String(10))
    state: Mapped[str] = mapped_column(String(20))
    message: Mapped[str | None] = mapped_column(default=None)
    sql: Mapped[list] = mapped_column(default=list)
    sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    fencing_token: Mapped[int] = mapped_column(BigInteger)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    duration_ms: Mapped[float] = mapped_column()
