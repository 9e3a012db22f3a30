from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from service.projects.schemas import Out


class RevisionOut(Out):
    id: str
    down_revisions: list[str]
    branch_labels: list[str]
    depends_on: list[str]
    message: str
    sha256: str
    has_downgrade: bool
    path: str


class NoticeOut(Out):
    """Something the uploader should know: env.py is not run, a setting it sets differs, …"""

    code: str
    level: Literal["info", "warning"]
    message: str
    file: str | None = None
    line: int | None = None
    setting: str | None = None


class BundleUpload(BaseModel):
    """Query parameters of an upload: the bundle's shape (docs/bundles.md)."""

    model_config = ConfigDict(extra="forbid")

    versions_path: str | None = Field(
        default=None,
        max_length=500,
        description="the folder of revision scripts, relative to the archive's root "
        "(default: the one folder named versions/ holding .py files)",
    )
    python_path: list[str] = Field(
        default_factory=list,
        description="folders put first on the runner's import path, relative to the "
        "archive's root ('.' is the root); repeat the parameter or separate with commas",
    )


class BundleOut(Out):
    id: str
    project: str
    heads: list[str]
    bases: list[str]
    versions_path: str
    python_path: list[str] = Field(default_factory=list)
    files: int
    size: int
    created_by: str
    created_at: str
    # When it was last pushed (uploaded, new or again) or promoted.
    pushed_at: str
    # Whether it is the project's latest: what a job without `bundle` runs.
    latest: bool
    # Upload answers list revision ids; `GET …/bundles/{ref}` describes each revision.
    revisions: list[str] | list[RevisionOut]
    # Upload answers only: computed from what was uploaded, never stored.
    notices: list[NoticeOut] | None = None


class BundleList(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(default=50, ge=1, le=500)
    cursor: str | None = None


class BundleSummary(Out):
    id: str
    heads: list[str]
    revision_count: int
    created_by: str
    created_at: str
    pushed_at: str
    latest: bool


class BundlePage(Out):
    """A project's bundles, the last pushed or promoted first (the latest is first)."""

    bundles: list[BundleSummary]
    next_cursor: str | None
