"""What a rollout request may say, and what its answers look like (docs/rollouts.md)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from service.projects.schemas import Name, Out

TagText = Annotated[str, StringConstraints(min_length=1, max_length=200)]
MAX_DATABASES = 100_000
# A database's state in a rollout: its job's, in short (docs/rollouts.md).
DATABASE_STATES = (
    "pending",
    "queued",
    "waiting",
    "running",
    "succeeded",
    "failed",
    "cancelled",
    "skipped",
)


class Selector(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Databases having every one of these tags.
    tags: dict[TagText, Annotated[str, StringConstraints(max_length=200)]] = Field(
        default_factory=dict, max_length=50
    )
    # Only these databases (each must be the project's).
    names: list[Name] | None = Field(default=None, min_length=1, max_length=MAX_DATABASES)


class RolloutCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    project: Name
    selector: Selector = Field(default_factory=Selector)
    action: Literal["upgrade", "downgrade", "stamp"] = "upgrade"
    target: str = Field(default="head", min_length=1, max_length=200)
    bundle: str | None = Field(default=None, max_length=64)
    # A number of databases (the first by name) or a list of names, run alone first.
    canary: int | list[Name] = Field(default=0)
    wave_size: int | None = Field(default=None, ge=1, le=MAX_DATABASES)
    waves: list[Annotated[int, Field(ge=1, le=MAX_DATABASES)]] | None = Field(
        default=None, min_length=1, max_length=100
    )
    max_parallel: int = Field(default=10, ge=1, le=1000)
    max_parallel_per_server: int | None = Field(default=None, ge=1, le=1000)
    halt_on_failure_ratio: float | None = Field(default=None, ge=0, lt=1)
    halt_after_failures: int | None = Field(default=None, ge=1, le=MAX_DATABASES)
    pause_between_waves_s: float = Field(default=0, ge=0, le=7 * 24 * 3600)
    approve_between_waves: bool = False

    @model_validator(mode="after")
    def _shape(self) -> RolloutCreate:
        if self.wave_size is not None and self.waves is not None:
            raise ValueError("send wave_size or waves, not both")
        if isinstance(self.canary, int) and not 0 <= self.canary <= MAX_DATABASES:
            raise ValueError("canary: a number of databases (0 or more) or a list of names")
        if isinstance(self.canary, list) and not 1 <= len(self.canary) <= 1000:
            raise ValueError("canary: a list of 1 to 1000 database names")
        if self.action == "downgrade" and self.target == "head":
            raise ValueError("a downgrade needs a target: a revision, -N or base")
        return self


class RolloutList(BaseModel):
    model_config = ConfigDict(extra="forbid")

    project: Name | None = None
    limit: int = Field(default=50, ge=1, le=200)
    cursor: str | None = Field(default=None, max_length=100)


class RolloutDatabasesQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # A database state, or not_at_target (every one whose job did not succeed).
    state: Literal[(*DATABASE_STATES, "not_at_target")] | None = None  # type: ignore[valid-type]
    wave: int | None = Field(default=None, ge=0, le=100_000)
    limit: int = Field(default=100, ge=1, le=1000)
    cursor: str | None = Field(default=None, max_length=100)


class WaveOut(Out):
    wave: int
    name: str
    size: int
    state: str  # pending, running, finished
    counts: dict[str, int]


class RolloutOut(Out):
    id: int
    project: str
    bundle: str
    action: str
    target: str
    state: str
    # Why it halted: {reason, message, wave} (reason: canary_failed, failure_ratio, failures).
    halted: dict[str, Any] | None
    selector: dict[str, Any]
    options: dict[str, Any]
    requested_by: str
    created_at: str
    finished_at: str | None
    resume_at: str | None
    wave: int
    total: int
    counts: dict[str, int]
    at_target: int
    not_at_target: int
    waves: list[WaveOut]


class RolloutPage(Out):
    rollouts: list[RolloutOut]
    next_cursor: str | None


class RolloutDatabaseOut(Out):
    database: str
    wave: int
    server: str
    job: int | None
    state: str
    heads: list[str] | None
    error: str | None


class RolloutDatabasePage(Out):
    databases: list[RolloutDatabaseOut]
    next_cursor: str | None
