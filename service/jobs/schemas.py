from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from service.projects.schemas import Name


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
