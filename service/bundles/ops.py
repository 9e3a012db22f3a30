"""Bundles: immutable, content-addressed revision scripts of one project."""

from __future__ import annotations

import hashlib
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.audit.ops import record_event
from service.bundles.archive import ParsedBundle
from service.bundles.models import Bundle, BundleFile
from service.bundles.notices import scan
from service.db import iso
from service.errors import NotFoundError
from service.projects.models import Project


def store_bundle(
    session: Session, project: Project, parsed: ParsedBundle, actor: str
) -> tuple[Bundle, bool]:
    """Store a validated bundle; return it and whether it is new."""
    existing = session.scalar(
        select(Bundle).where(Bundle.project_id == project.id, Bundle.digest == parsed.digest)
    )
    if existing is not None:
        return existing, False
    bundle = Bundle(
        project_id=project.id,
        digest=parsed.digest,
        versions_path=parsed.versions_path,
        python_path=parsed.python_path or None,
        revisions=parsed.revisions,
        heads=parsed.heads,
        bases=parsed.bases,
        file_count=len(parsed.files),
        size=parsed.size,
        created_by=actor,
    )
    session.add(bundle)
    session.flush()
    session.add_all(
        BundleFile(
            bundle_pk=bundle.pk,
            path=path,
            sha256=hashlib.sha256(content).hexdigest(),
            content=content,
        )
        for path, content in parsed.files.items()
    )
    record_event(
        session,
        "bundle.uploaded",
        actor=actor,
        project=project.name,
        data={"bundle": bundle.digest, "heads": bundle.heads, "revisions": len(bundle.revisions)},
    )
    return bundle, True


def get_bundle(session: Session, project: Project, ref: str) -> Bundle:
    """Find a bundle by id, unique id prefix (≥ 8 chars) or `latest`."""
    query = select(Bundle).where(Bundle.project_id == project.id)
    if ref == "latest":
        bundle = session.scalar(query.order_by(Bundle.pk.desc()).limit(1))
        if bundle is None:
            raise NotFoundError(
                f"project {project.name!r} has no bundles yet: upload one first",
                {"project": project.name},
            )
        return bundle
    if len(ref) >= 8 and all(c in "0123456789abcdef" for c in ref):
        found = list(session.scalars(query.where(Bundle.digest.startswith(ref)).limit(2)))
        if len(found) == 1:
            return found[0]
    raise NotFoundError(
        f"no bundle {ref!r} in project {project.name!r}", {"project": project.name, "bundle": ref}
    )


def bundle_files(session: Session, bundle: Bundle) -> dict[str, bytes]:
    rows = session.execute(
        select(BundleFile.path, BundleFile.content).where(BundleFile.bundle_pk == bundle.pk)
    )
    return {path: content for path, content in rows}


def upload_notices(parsed: ParsedBundle, project: Project) -> list[dict[str, Any]]:
    """What the uploader should know (env.py is not run, settings it sets, …): never stored."""
    return scan(
        {**parsed.files, **parsed.scanned},
        parsed.versions_path,
        project.settings or {},
        parsed.python_path,
    )


def serialize_bundle(
    bundle: Bundle,
    project: Project,
    graph: bool,
    notices: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": bundle.digest,
        "project": project.name,
        "heads": bundle.heads,
        "bases": bundle.bases,
        "versions_path": bundle.versions_path,
        "python_path": list(bundle.python_path or []),
        "files": bundle.file_count,
        "size": bundle.size,
        "created_by": bundle.created_by,
        "created_at": iso(bundle.created_at),
    }
    if graph:
        out["revisions"] = [
            {
                k: r[k]
                for k in (
                    "id",
                    "down_revisions",
                    "branch_labels",
                    "depends_on",
                    "message",
                    "sha256",
                    "has_downgrade",
                    "path",
                )
            }
            for r in bundle.revisions
        ]
    else:
        out["revisions"] = [r["id"] for r in bundle.revisions]
    if notices is not None:
        out["notices"] = notices
    return out
