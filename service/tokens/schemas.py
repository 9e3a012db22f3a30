from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from service.projects.schemas import Name, Out


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    role: Literal["admin", "deployer", "viewer"]
    # "*" for every project (now and later), else a list of existing project names.
    projects: Literal["*"] | list[Name] = Field(min_length=1)
    expires_at: dt.datetime | None = None


class TokenOut(Out):
    id: int
    name: str
    role: str
    projects: Literal["*"] | list[str]
    created_by: str
    created_at: str
    expires_at: str | None
    revoked_at: str | None
    # Only in the answer to its creation: the bearer token, shown this once.
    token: str | None = None


class TokenPage(Out):
    tokens: list[TokenOut]
