from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from service.projects.schemas import Name, Out


class DatabaseCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    project: Name
    url: str = Field(min_length=1, max_length=2000)
    tags: dict[str, str] = Field(default_factory=dict)


class DatabasePatch(BaseModel):
    """A change of a registration: a new URL (validated as on registration), tags (whole)."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(default=None, min_length=1, max_length=2000)
    tags: dict[str, str] | None = None


class RepairCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # An applied revision whose file changed: the latest bundle's file is accepted.
    revision: str = Field(min_length=1, max_length=64)


class RepairOut(Out):
    database: str
    revision: str
    # The bundle whose file is accepted (the project's latest).
    bundle: str
    old_sha256: str
    new_sha256: str


class Block(Out):
    """Something that stops jobs on a database now."""

    code: str
    message: str
    revision: str | None = None
    # drifted: when the check that found the differences ran.
    drift_checked_at: str | None = None


class DatabaseLock(Out):
    fencing_token: int
    held_by_job: int | None


class DatabaseOut(Out):
    name: str
    project: str
    dialect: str
    url: str
    tags: dict[str, str]
    created_at: str
    # Only on `GET /v1/databases/{name}` (unless ?live=false): read from the target.
    current: list[str] | None = None
    current_error: str | None = None
    head: list[str] | None = None
    bundle: str | None = None
    pending: list[str] | None = None
    unknown_current: list[str] | None = None
    lock: DatabaseLock | None = None
    # What ran this database's latest job: {environment, python, sqlalchemy, alembic}.
    runtime: dict[str, Any] | None = None
    # Only on `GET /v1/databases/{name}`: what stops jobs on it now (empty: nothing).
    # revision_changed, drifted; unknown_current_revision only when read live.
    blocked_by: list[Block] | None = None


class DatabasePage(Out):
    databases: list[DatabaseOut]


class DatabaseList(BaseModel):
    model_config = ConfigDict(extra="forbid")

    project: str | None = None
    # `key` or `key=value`
    tag: str | None = None


class DatabaseShow(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # false: do not connect to the target (no current/pending)
    live: bool = True


class ReleasedLease(Out):
    job: int
    worker: str | None
    fencing_token: int
    expired_s_ago: float | None


class UnlockOut(Out):
    database: str
    released: ReleasedLease
    # The state of the job that held the lease, after the unlock.
    job_state: str | None
