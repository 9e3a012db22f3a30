from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_.\-]{0,99}$")]
SqlIdentifier = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")]
EnvName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")]
EnvValue = Annotated[str, StringConstraints(max_length=32 * 1024)]
# What the runner's interpreter and sandbox depend on: never a project's to set.
_RESERVED_ENV = re.compile(r"^(PATH|HOME|LANG|LC_.*|TMPDIR|PYTHON.*|LD_.*|RETORT_.*)$")


def check_env_names(env: dict[str, str]) -> dict[str, str]:
    reserved = sorted(name for name in env if _RESERVED_ENV.match(name))
    if reserved:
        raise ValueError(
            f"{', '.join(reserved)}: reserved for the runner's interpreter and sandbox "
            "(PATH, HOME, LANG, LC_*, TMPDIR, PYTHON*, LD_*, RETORT_*)"
        )
    return env


LintAction = Literal["block", "warn", "off"]
TagKey = Annotated[str, StringConstraints(pattern=r"^[^=\s]{1,100}=[^\s]{0,200}$")]


class LintSettings(BaseModel):
    """How the lint judges a project's upgrades (docs/lint.md)."""

    model_config = ConfigDict(extra="forbid")

    # Off: upgrades run without a look at their SQL (plans still lint).
    enabled: bool = True
    # Each code's action: block (wait for an approval), warn, off. Codes left
    # out keep their default (docs/lint.md lists them).
    policy: dict[str, LintAction] = Field(default_factory=dict, max_length=100)
    # Per database tag, "key=value": stricter (or laxer) for those databases;
    # applied after `policy`, in sorted key order (a later one wins).
    by_tag: dict[TagKey, dict[str, LintAction]] = Field(default_factory=dict, max_length=50)
    # Token names (besides admin tokens) that may approve this project's jobs.
    approvers: list[Annotated[str, StringConstraints(max_length=100)]] = Field(
        default_factory=list, max_length=100
    )
    # Whether a job's own requester may approve it.
    self_approve: bool = False

    @model_validator(mode="after")
    def _known_codes(self) -> LintSettings:
        from service.lint import resolve_policy

        resolve_policy(self.policy, self.by_tag, {})  # ValueError names an unknown code
        return self


class DriftSettings(BaseModel):
    """Drift checks of a project's databases (docs/drift.md)."""

    model_config = ConfigDict(extra="forbid")

    # Check every database of the project this often (null: only on request).
    check_interval_s: float | None = Field(default=None, ge=60, le=30 * 24 * 3600)
    # An upgrade of a database whose newest check found drift waits for an approval.
    refuse_when_drifted: bool = False


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
    # At most this many of the project's jobs run at once (None: no limit); the
    # others are parked without a worker slot until one ends (docs/rollouts.md).
    max_running_jobs: int | None = Field(default=None, ge=1, le=10_000)
    # Python requirements the revisions need (pip requirement lines). A bundle's
    # requirements.txt is used when this is empty (docs/environments.md).
    requirements: list[Annotated[str, StringConstraints(max_length=1000)]] = Field(
        default_factory=list, max_length=500
    )
    # Environment variables set in the runner for this project's revisions.
    env: dict[EnvName, EnvValue] = Field(default_factory=dict, max_length=200)
    lint: LintSettings = Field(default_factory=LintSettings)
    drift: DriftSettings = Field(default_factory=DriftSettings)

    @field_validator("requirements")
    @classmethod
    def _requirements(cls, lines: list[str]) -> list[str]:
        from service.projects.requirements import check_requirements

        return check_requirements(lines)

    @field_validator("env")
    @classmethod
    def _env(cls, env: dict[str, str]) -> dict[str, str]:
        return check_env_names(env)


class ProjectCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    settings: ProjectSettings = ProjectSettings()
    # Set in the runner like settings.env, stored encrypted, never shown back.
    secret_env: dict[EnvName, EnvValue] = Field(default_factory=dict, max_length=200)

    @field_validator("secret_env")
    @classmethod
    def _secret_env(cls, env: dict[str, str]) -> dict[str, str]:
        return check_env_names(env)


def _nullable(info: FieldInfo) -> tuple[object, FieldInfo]:
    """A setting as a patch may carry it: its own type and bounds, or null (the default)."""
    annotation = info.annotation
    if info.metadata:
        annotation = Annotated[(annotation, *info.metadata)]
    return (
        annotation | None,
        Field(default=None, description="null: back to the default; a value replaces it whole"),
    )


def _at_least_one(model: BaseModel) -> BaseModel:
    if not model.model_fields_set:
        raise ValueError("name at least one setting to change (or leave `settings` out)")
    return model


# Every field of ProjectSettings, each optional and nullable: a setting left out
# stays as it is, null resets it, a value replaces it (maps and lists whole).
# Built from ProjectSettings so a new setting is patchable with the same bounds.
ProjectSettingsPatch = create_model(
    "ProjectSettingsPatch",
    __doc__="Settings to change: each one named replaces the old value; null restores the default.",
    __config__=ConfigDict(extra="forbid", json_schema_extra={"minProperties": 1}),
    __validators__={"_at_least_one": model_validator(mode="after")(_at_least_one)},
    **{name: _nullable(info) for name, info in ProjectSettings.model_fields.items()},
)


def _no_default(schema: dict) -> None:
    schema.pop("default", None)  # absent is not null: the document shows no default


class ProjectPatch(BaseModel):
    """A JSON merge patch (RFC 7386) of a project, one level deep.

    `settings`: each named setting replaces the old value whole (`env`,
    `requirements` and `naming_convention` too); null restores its default;
    the merged settings are validated as ProjectSettings. `secret_env`: a value
    sets (encrypts) that variable, null removes it; the others stay.
    """

    model_config = ConfigDict(extra="forbid", json_schema_extra={"minProperties": 1})

    # Left out: None, never validated. Sent, each must be an object: an explicit
    # null is refused (it would read as "delete them all").
    settings: ProjectSettingsPatch = Field(  # type: ignore[valid-type]
        default=None, json_schema_extra=_no_default
    )
    secret_env: dict[EnvName, EnvValue | None] = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="a value sets that variable (stored encrypted, never shown), null removes it",
        json_schema_extra=_no_default,
    )

    @field_validator("secret_env")
    @classmethod
    def _secret_env(cls, env: dict[str, str | None]) -> dict[str, str | None]:
        check_env_names(env)
        return env

    @model_validator(mode="after")
    def _not_empty(self) -> ProjectPatch:
        if not self.model_fields_set:
            raise ValueError("an empty patch changes nothing: send `settings` and/or `secret_env`")
        return self


class Out(BaseModel):
    """Base of response documents: the OpenAPI contract forbids fields it does not name."""

    model_config = ConfigDict(extra="forbid")


class ProjectOut(Out):
    name: str
    settings: ProjectSettings
    secret_env_names: list[str] = Field(
        default_factory=list, description="names of the encrypted variables (values never shown)"
    )
    created_at: str


class ProjectPage(Out):
    projects: list[ProjectOut]
