from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.projects.schemas import Name, Out


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    database: Name
    action: Literal["upgrade", "downgrade", "stamp"] = "upgrade"
    target: str = Field(default="head", min_length=1, max_length=200)
    bundle: str | None = Field(default=None, max_length=64)
    # Attach to an identical job still waiting to start instead of queuing another.
    coalesce: bool = True


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
    state: (
        Literal["queued", "waiting_for_lock", "running", "succeeded", "failed", "cancelled"] | None
    ) = None
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
    steps: list[StepOut] | None = None
    # On `POST /v1/jobs`: the id of the pending job this request attached to, if any.
    coalesced_into: int | None = None


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
