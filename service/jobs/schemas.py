from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from service.jobs.states import JOB_STATES
from service.projects.schemas import Name, Out


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    database: Name
    action: Literal["upgrade", "downgrade", "stamp"] = "upgrade"
    target: str = Field(default="head", min_length=1, max_length=200)
    bundle: str | None = Field(default=None, max_length=64)
    # Attach to an identical job still waiting to start instead of queuing another.
    coalesce: bool = True
    # A plan: show what the action would run (each step's SQL and the lint's
    # findings) and change nothing (docs/plan.md).
    dry_run: bool = False
    # How a plan renders: auto (rolled_back on PostgreSQL, copy on SQLite,
    # offline on MySQL/MariaDB), offline, rolled_back, copy.
    plan_mode: Literal["auto", "offline", "rolled_back", "copy"] = "auto"
    # Lint codes this request accepts although the policy blocks them (audited).
    allow: list[Annotated[str, StringConstraints(max_length=64)]] = Field(
        default_factory=list, max_length=50
    )

    @field_validator("allow")
    @classmethod
    def _known(cls, codes: list[str]) -> list[str]:
        from service.lint import CODES

        unknown = [c for c in codes if c not in CODES]
        if unknown:
            raise ValueError(f"unknown lint code(s): {', '.join(unknown)} (see docs/lint.md)")
        return sorted(set(codes))

    @model_validator(mode="after")
    def _plan_mode(self) -> JobCreate:
        if self.plan_mode != "auto" and not self.dry_run:
            raise ValueError("plan_mode applies to a plan: send dry_run: true with it")
        return self


class JobDecision(BaseModel):
    """An approval or rejection of a job waiting for one."""

    model_config = ConfigDict(extra="forbid")

    comment: str | None = Field(default=None, max_length=2000)


class JobShow(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Hold the request until the job changes, at most this many seconds (capped).
    wait: float = Field(default=0, ge=0)


class HistoryList(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(default=50, ge=1, le=500)
    cursor: str | None = None


class JobList(BaseModel):
    model_config = ConfigDict(extra="forbid")

    database: str | None = None
    kind: Literal["migrate", "plan", "drift"] | None = None
    state: Literal[JOB_STATES] | None = None  # type: ignore[valid-type] - JobState's values
    limit: int = Field(default=50, ge=1, le=500)
    cursor: str | None = None


class JobError(BaseModel):
    """Why a job failed: `code` and `message` always, more where known (revision, statement)."""

    model_config = ConfigDict(extra="allow")

    code: str
    message: str
    revision: str | None = None
    statement: str | None = None


class JobLock(Out):
    fencing_token: int | None
    waited_ms: int | None
    held_by_job: int | None = None
    # While parked with no worker: "lease" (another job holds the database) or
    # "project_slot" (the project's settings.max_running_jobs are running).
    waiting_for: str | None = None


class StepOut(Out):
    revisions: list[str]
    direction: str
    state: str
    message: str | None
    started_at: str | None
    finished_at: str | None
    duration_ms: float
    sql: list[str]
    sha256: str | None
    fencing_token: int


class JobOut(Out):
    id: int
    database: str
    project: str
    bundle: str
    # "migrate", "plan" (a dry run, dry_run: true) or "drift" (a drift check).
    kind: str = "migrate"
    action: str
    target: str
    state: str
    # 1, then 2, 3... when a lost worker's job is run again from the target's heads.
    attempt: int
    from_heads: list[str] | None
    to_heads: list[str] | None
    error: JobError | None
    lock: JobLock
    requested_by: str
    # host:pid of the worker process that claimed the job (its latest attempt).
    worker: str | None
    # Which sandbox ran the revision code: "bwrap" (namespaces) or "process"
    # (a clean exec'd process, not isolated from the worker's machine).
    sandbox: str | None = None
    # What ran the revisions: the project's environment (its key, None: the
    # worker's own) and the versions in it; while the environment is built,
    # {"environment", "state": "building", "requirements"}.
    runtime: dict[str, Any] | None = None
    created_at: str
    started_at: str | None
    finished_at: str | None
    # The lint's findings of the job's look at its database, by the policy's
    # action: {mode, blocking, allowed, warnings} (None: not linted).
    findings: dict[str, Any] | None = None
    # Who approved or rejected the blocking findings: {decision, by, at, codes, comment}.
    approval: dict[str, Any] | None = None
    # What the request asked besides action and target ({plan_mode, allow}).
    options: dict[str, Any] | None = None
    # A plan's answer (kind "plan") or a drift check's (kind "drift").
    result: dict[str, Any] | None = None
    # The rollout this job is one database's part of (docs/rollouts.md).
    rollout: int | None = None
    steps: list[StepOut] | None = None
    # On `POST /v1/jobs`: the id of the pending job this request attached to, if any.
    coalesced_into: int | None = None


class DriftOut(Out):
    database: str
    # The newest drift check that finished (null: never checked).
    checked_at: str | None
    drifted: bool | None
    job: int | None
    # {drifted, heads, dialect, scratch, differences, operations, ignored}
    result: dict[str, Any] | None
    # A check queued or running now, if any.
    pending_job: int | None = None


class JobPage(Out):
    jobs: list[JobOut]
    next_cursor: str | None


class HistoryEntry(Out):
    job: int
    action: str
    direction: str
    revisions: list[str]
    message: str | None
    state: str
    applied_at: str | None
    duration_ms: float
    requested_by: str
    fencing_token: int
    sha256: str | None


class HistoryPage(Out):
    history: list[HistoryEntry]
    next_cursor: str | None
