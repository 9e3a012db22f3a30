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


class JobList(BaseModel):
    model_config = ConfigDict(extra="forbid")

    database: str | None = None
    state: (
        Literal["queued", "waiting_for_lock", "running", "succeeded", "failed", "cancelled"] | None
    ) = None
    limit: int = Field(default=50, ge=1, le=500)
    cursor: str | None = None
