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
