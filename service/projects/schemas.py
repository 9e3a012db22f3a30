from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_.\-]{0,99}$")]
SqlIdentifier = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")]


class ProjectSettings(BaseModel):
    """What a user's env.py would otherwise carry."""

    model_config = ConfigDict(extra="forbid")

    naming_convention: dict[str, str] | None = None
    version_table: SqlIdentifier = "alembic_version"
    version_table_schema: SqlIdentifier | None = None
    lock_timeout_ms: int | None = Field(default=None, ge=0, le=24 * 3600 * 1000)
    statement_timeout_ms: int | None = Field(default=None, ge=0, le=7 * 24 * 3600 * 1000)
    # A job's wall-clock limit (default RETORT_JOB_MAX_DURATION_S): past it the
    # job fails with `timeout`, its running step rolled back, the lease freed.
    max_duration_s: float | None = Field(default=None, gt=0, le=7 * 24 * 3600)


class ProjectCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    settings: ProjectSettings = ProjectSettings()


class Out(BaseModel):
    """Base of response documents: the OpenAPI contract forbids fields it does not name."""

    model_config = ConfigDict(extra="forbid")


class ProjectOut(Out):
    name: str
    settings: ProjectSettings
    created_at: str


class ProjectPage(Out):
    projects: list[ProjectOut]
