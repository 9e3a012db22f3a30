"""Bundles: immutable, content-addressed revision scripts of one project."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from service.audit.actions import AuditAction
from service.audit.ops import record_event
from service.bundles.archive import ParsedBundle
from service.bundles.models import Bundle, BundleFile
from service.bundles.notices import scan
from service.db import iso, utcnow
from service.errors import InvalidError, NotFoundError
from service.projects.models import Project


def store_bundle(
    session: Session, project: Project, parsed: ParsedBundle, actor: str
) -> tuple[Bundle, bool]:
    """Store a validated bundle and make it the project's latest; return it and whether it
    is new."""
    _lock_project(session, project)
    existing = session.scalar(
        select(Bundle).where(Bundle.project_id == project.id, Bundle.digest == parsed.digest)
    )
    if existing is not None:
        # Pushing content again is a deploy of it: it becomes latest.
        make_latest(session, project, existing, actor, "pushed again")
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
    project.latest_bundle_pk = bundle.pk
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
        AuditAction.BUNDLE_UPLOADED,
        actor=actor,
        project=project.name,
        data={"bundle": bundle.digest, "heads": bundle.heads, "revisions": len(bundle.revisions)},
    )
    return bundle, True


def make_latest(
    session: Session, project: Project, bundle: Bundle, actor: str, reason: str
) -> bool:
    """Make `bundle` the project's latest (what a job without `bundle` runs); audit a change.

    Its `pushed_at` moves to now either way (it tops the bundle list); False
    when it was latest already (nothing is audited then).
    """
    previous = _lock_project(session, project)
    bundle.pushed_at = utcnow()
    if previous == bundle.pk:
        return False
    project.latest_bundle_pk = bundle.pk
    before = session.get(Bundle, previous) if previous is not None else None
    record_event(
        session,
        AuditAction.BUNDLE_PROMOTED,
        actor=actor,
        project=project.name,
        data={
            "from": before.digest if before is not None else None,
            "to": bundle.digest,
            "reason": reason,
        },
    )
    return True


def _lock_project(session: Session, project: Project) -> int | None:
    """Lock the project's row, so pushes and promotions take turns; return its latest pk.

    FOR NO KEY UPDATE on PostgreSQL: rows inserted meanwhile that refer to the
    project (bundles, jobs) take a key-share lock on it, which this one lets be.
    """
    return session.scalar(
        select(Project.latest_bundle_pk)
        .where(Project.id == project.id)
        .with_for_update(key_share=True)
    )


def promote_bundle(session: Session, project: Project, ref: str, actor: str) -> tuple[Bundle, bool]:
    """Make a bundle (id or prefix) the project's latest; return it and whether it changed."""
    bundle = get_bundle(session, project, ref)
    return bundle, make_latest(session, project, bundle, actor, "promoted")


HEX = frozenset("0123456789abcdef")
MIN_PREFIX = 8
DIGEST_LENGTH = 64
# How many bundles an ambiguous prefix lists.
MAX_CANDIDATES = 10


def get_bundle(session: Session, project: Project, ref: str) -> Bundle:
    """Find a bundle by `latest`, its id (sha256) or a unique prefix of it (≥ 8 hex chars).

    A shorter or non-hex reference is a 422; a prefix several bundles share is
    a 422 `ambiguous_bundle` naming them; none matching is a 404.
    """
    if ref == "latest":
        bundle = latest_bundle(session, project)
        if bundle is None:
            raise NotFoundError(
                f"project {project.name!r} has no bundles yet: upload one first",
                {"project": project.name},
            )
        return bundle
    ref = ref.lower()
    if not MIN_PREFIX <= len(ref) <= DIGEST_LENGTH or not set(ref) <= HEX:
        raise InvalidError(
            f"a bundle is named by its id (a sha256: {DIGEST_LENGTH} hex characters), a "
            f"prefix of it of at least {MIN_PREFIX}, or `latest`; not {ref[:80]!r}",
            {"bundle": ref[:80], "min_prefix": MIN_PREFIX},
            code="invalid_bundle_ref",
        )
    found = list(
        session.scalars(
            select(Bundle)
            .where(Bundle.project_id == project.id, Bundle.digest.startswith(ref))
            .order_by(Bundle.pk.desc())
            .limit(MAX_CANDIDATES + 1)
        )
    )
    if len(found) == 1:
        return found[0]
    if found:
        raise InvalidError(
            f"bundle prefix {ref!r} matches {'more than ' if len(found) > MAX_CANDIDATES else ''}"
            f"{min(len(found), MAX_CANDIDATES)} bundles of project {project.name!r}: "
            "give more of the id",
            {
                "bundle": ref,
                "candidates": [
                    {"id": b.digest, "created_at": iso(b.created_at)}
                    for b in found[:MAX_CANDIDATES]
                ],
            },
            code="ambiguous_bundle",
        )
    raise NotFoundError(
        f"no bundle {ref!r} in project {project.name!r}", {"project": project.name, "bundle": ref}
    )


def latest_bundle(session: Session, project: Project) -> Bundle | None:
    """The project's latest bundle: the one pushed or promoted last (None: none yet)."""
    if project.latest_bundle_pk is None:
        return None
    return session.get(Bundle, project.latest_bundle_pk)


def list_bundles(
    session: Session, project: Project, limit: int, cursor: str | None
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of a project's bundles, the last pushed or promoted first, and the next cursor."""
    pushed = func.coalesce(Bundle.pushed_at, Bundle.created_at)
    query = select(
        Bundle.pk,
        Bundle.digest,
        Bundle.heads,
        Bundle.revisions,
        Bundle.created_by,
        Bundle.created_at,
        pushed.label("pushed_at"),
    ).where(Bundle.project_id == project.id)
    if cursor:
        at, pk = _decode_cursor(cursor)
        query = query.where(or_(pushed < at, and_(pushed == at, Bundle.pk < pk)))
    rows = session.execute(query.order_by(pushed.desc(), Bundle.pk.desc()).limit(limit + 1)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    page = [
        {
            "id": row.digest,
            "heads": row.heads,
            "revision_count": len(row.revisions),
            "created_by": row.created_by,
            "created_at": iso(row.created_at),
            "pushed_at": iso(row.pushed_at),
            "latest": row.pk == project.latest_bundle_pk,
        }
        for row in rows
    ]
    return page, _encode_cursor(rows[-1].pushed_at, rows[-1].pk) if more else None


def _encode_cursor(at: dt.datetime, pk: int) -> str:
    raw = f"{iso(at)}|{pk}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[dt.datetime, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, pk = raw.split("|")
        when = dt.datetime.fromisoformat(at.replace("Z", "+00:00"))
        value = int(pk)
        if when.tzinfo is None or not 0 < value < 2**63:
            raise ValueError(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidError("cursor is not one this server gave out", {"field": "cursor"}) from None
    return when, value


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
        "pushed_at": iso(bundle.pushed_at or bundle.created_at),
        "latest": bundle.pk == project.latest_bundle_pk,
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
