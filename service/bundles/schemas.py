from __future__ import annotations

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


class BundleOut(Out):
    id: str
    project: str
    heads: list[str]
    bases: list[str]
    versions_path: str
    files: int
    size: int
    created_by: str
    created_at: str
    # Upload answers list revision ids; `GET …/bundles/{ref}` describes each revision.
    revisions: list[str] | list[RevisionOut]
