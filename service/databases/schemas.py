from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from service.projects.schemas import Name


class DatabaseCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    project: Name
    url: str = Field(min_length=1, max_length=2000)
    tags: dict[str, str] = Field(default_factory=dict)
