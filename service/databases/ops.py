"""Target databases: registration, encrypted URLs and their live state."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from service import targets
from service.audit.actions import AuditAction
from service.audit.ops import record_event
from service.bundles.models import Bundle
from service.bundles.ops import get_bundle, latest_bundle
from service.config import Config
from service.crypto import SecretBox
from service.databases.models import AppliedRevision, Database
from service.databases.schemas import DatabaseCreate, DatabasePatch, RepairCreate
from service.db import iso, utcnow
from service.errors import ConflictError, InvalidError, NotFoundError
from service.jobs.models import Job
from service.jobs.states import BUSY_STATES, STARTED_STATES, JobState
from service.locks.models import Lease
from service.principal import Principal
from service.projects.models import Project
from service.projects.ops import get_project


def create_database(
    session: Session,
    body: DatabaseCreate,
    box: SecretBox,
    actor: str,
    who: Principal | None,
    config: Config,
) -> tuple[Database, Project]:
    """Register a target; 422 if it is Retort's own state or a host path (see check_target)."""
    project = get_project(session, body.project, who)
    url = targets.normalize_url(body.url)
    if session.scalar(select(Database.id).where(Database.name == body.name)) is not None:
        raise ConflictError(f"database {body.name!r} already exists", {"name": body.name})
    targets.check_target(url, config)
    db = Database(
        name=body.name,
        project_id=project.id,
        dialect=targets.dialect_of(url),
        url_encrypted=box.encrypt(url.render_as_string(hide_password=False)),
        url_masked=targets.mask_url(url),
        tags=body.tags,
    )
    session.add(db)
    session.flush()
    session.add(Lease(database_id=db.id, token=0))
    record_event(
        session,
        AuditAction.DATABASE_REGISTERED,
        actor=actor,
        project=project.name,
        database=db.name,
        data={"url": db.url_masked, "tags": db.tags},
    )
    return db, project


def get_database(
    session: Session, name: str, who: Principal | None = None, *, for_update: bool = False
) -> Database:
    """Find a registered database by name; one in a project the principal may not see
    (or one removed) answers 404. `for_update`: lock its row (as a job request does)."""
    query = select(Database).where(Database.name == name, Database.removed_at.is_(None))
    if for_update:
        query = query.with_for_update()
    db = session.scalar(query)
    if db is not None and who is not None and not who.everywhere:
        if not who.sees(session.get(Project, db.project_id).name):
            db = None
    if db is None:
        raise NotFoundError(f"no database named {name!r}", {"database": name})
    return db


def list_databases(
    session: Session,
    project: str | None = None,
    tag: str | None = None,
    who: Principal | None = None,
) -> list[tuple[Database, Project]]:
    query = (
        select(Database, Project)
        .join(Project, Project.id == Database.project_id)
        .where(Database.removed_at.is_(None))
    )
    if who is not None and not who.everywhere:
        query = query.where(Project.name.in_(who.projects))
    if project:
        query = query.where(Project.name == project)
    rows = list(session.execute(query.order_by(Database.name)).tuples())
    if tag:
        key, _, value = tag.partition("=")
        rows = [(d, p) for d, p in rows if key in d.tags and (not value or d.tags[key] == value)]
    return rows


NAME_LENGTH = 100  # databases.name: String(100)


def _refuse_busy(session: Session, db: Database, doing: str) -> None:
    """409 `database_busy` while a job of the database is active (call with its row locked)."""
    row = session.execute(
        select(Job.id, Job.state)
        .where(Job.database_id == db.id, Job.state.in_(BUSY_STATES))
        .order_by(Job.id.desc())
        .limit(1)
    ).first()
    if row is not None:
        raise ConflictError(
            f"database {db.name} has an active job ({row.id}, {row.state}): wait for it to "
            f"end or cancel it, then {doing}",
            {"database": db.name, "job": row.id, "state": row.state},
            code="database_busy",
        )


def update_database(
    session: Session,
    name: str,
    body: DatabasePatch,
    box: SecretBox,
    actor: str,
    who: Principal | None,
    config: Config,
) -> tuple[Database, Project]:
    """Change a registration's URL (validated as on registration) and/or its tags (whole).

    The row is locked as a job request locks it, so no job is requested in between;
    refused (409 `database_busy`) while a job is active. Another dialect only
    while no job ever ran on it (422 `dialect_change`): its history is of another
    database then.
    """
    if body.url is None and body.tags is None:
        raise InvalidError("send url, tags or both", {"field": "(body)"})
    db = get_database(session, name, who, for_update=True)
    url = None
    if body.url is not None:
        url = targets.normalize_url(body.url)
        targets.check_target(url, config)
    _refuse_busy(session, db, "change it")
    project = session.get_one(Project, db.project_id)
    data: dict[str, Any] = {}
    if url is not None:
        dialect = targets.dialect_of(url)
        if dialect != db.dialect:
            ran = session.scalar(
                select(Job.id)
                .where(Job.database_id == db.id, Job.started_at.is_not(None))
                .order_by(Job.id.desc())
                .limit(1)
            )
            if ran is not None:
                raise InvalidError(
                    f"database {name} is a {db.dialect} database and jobs ran on it (job "
                    f"{ran}): a {dialect} URL names another database; register that under a "
                    "name of its own",
                    {"field": "url", "dialect": db.dialect, "new_dialect": dialect, "job": ran},
                    code="dialect_change",
                )
        masked = targets.mask_url(url)
        data.update(url=masked, previous_url=db.url_masked)
        if dialect != db.dialect:
            data.update(dialect=dialect, previous_dialect=db.dialect)
        db.url_encrypted = box.encrypt(url.render_as_string(hide_password=False))
        db.url_masked = masked
        db.dialect = dialect
    if body.tags is not None:
        data.update(tags=body.tags, previous_tags=db.tags)
        db.tags = body.tags
    record_event(
        session,
        AuditAction.DATABASE_UPDATED,
        actor=actor,
        project=project.name,
        database=db.name,
        data=data,
    )
    return db, project


def remove_database(
    session: Session, name: str, box: SecretBox, actor: str, who: Principal | None
) -> None:
    """Remove a registration and free its name; refused (409) while a job is active.

    The row stays, for its jobs' history, under a name of its own (`name~id`)
    with `removed_at` set, its URL's credentials dropped (only the masked URL is
    kept) and its lease row deleted: no job can be requested for it again.
    """
    db = get_database(session, name, who, for_update=True)
    _refuse_busy(session, db, "remove it")
    project = session.get_one(Project, db.project_id)
    suffix = f"~{db.id}"
    db.name = name[: NAME_LENGTH - len(suffix)] + suffix
    db.removed_at = utcnow()
    # Not a target any more: nothing may connect to it, nor find its SQLite file.
    db.url_encrypted = box.encrypt("")
    session.execute(delete(Lease).where(Lease.database_id == db.id))
    record_event(
        session,
        AuditAction.DATABASE_REMOVED,
        actor=actor,
        project=project.name,
        database=name,
        data={"url": db.url_masked, "tags": db.tags, "kept_as": db.name},
    )


def repair_database(
    session: Session, name: str, body: RepairCreate, actor: str, who: Principal | None
) -> dict[str, Any]:
    """Accept the latest bundle's file for an applied revision whose file changed.

    The fix for `revision_changed` when the change is harmless (a comment, a
    reformatted line): the applied checksum becomes the bundle's. 422 when the
    revision is not applied on the database or the bundle lacks it; 409
    `nothing_to_repair` when the checksums already match.
    """
    # The applied row is locked, not the database's: a job's steps may write
    # other applied rows meanwhile.
    db = get_database(session, name, who)
    project = session.get_one(Project, db.project_id)
    bundle = get_bundle(session, project, "latest")
    rev = body.revision
    applied = session.get(AppliedRevision, (db.id, rev), with_for_update=True)
    if applied is None:
        raise InvalidError(
            f"revision {rev} is not applied on {name}: there is no checksum to repair",
            {"field": "revision", "revision": rev, "database": name},
            code="revision_not_applied",
        )
    carried = next((r for r in bundle.revisions if r["id"] == rev), None)
    if carried is None:
        raise InvalidError(
            f"the latest bundle of project {project.name} ({bundle.digest[:12]}) does not "
            f"carry revision {rev}: push or promote one that does",
            {"field": "revision", "revision": rev, "bundle": bundle.digest},
            code="revision_not_in_bundle",
        )
    old, new = applied.sha256, carried["sha256"]
    if old == new:
        raise ConflictError(
            f"revision {rev} on {name} was applied from the file the latest bundle carries "
            f"(sha256 {new[:12]}): nothing to repair",
            {"revision": rev, "sha256": new, "bundle": bundle.digest},
            code="nothing_to_repair",
        )
    applied.sha256 = new
    data = {"revision": rev, "old_sha256": old, "new_sha256": new, "bundle": bundle.digest}
    record_event(
        session,
        AuditAction.DATABASE_REPAIRED,
        actor=actor,
        project=project.name,
        database=db.name,
        data=data,
    )
    return {"database": db.name, **data}


def read_live_heads(
    url_encrypted: str, settings: dict[str, Any], box: SecretBox, timeout_s: int
) -> tuple[list[str] | None, str | None]:
    """Read the target's current heads; return (heads, None) or (None, why not).

    Every wait is bounded by `timeout_s` (connecting, then the read). Call it
    with no state transaction open: a silent target must hold up nobody else.
    """
    url = targets.normalize_url(box.decrypt(url_encrypted))
    if url.get_backend_name() == "sqlite":
        if not os.path.exists(url.database):
            return [], None  # not created yet: at base (and a read must not create it)
        # Read-only: a journal the project's code wrote is never played back
        # here (a hot journal's super-journal name could make SQLite delete a
        # file of this process's choosing); such a database answers an error.
        url = url.set(database=f"file:{url.database}?mode=ro", query={"uri": "true"})
    engine = targets.make_target_engine(url, timeout_s, read_timeout_s=timeout_s)
    try:
        with engine.connect() as conn:
            return targets.read_heads(conn, settings), None
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        return None, targets.scrub(reason, url)
    finally:
        engine.dispose()


def pending_revisions(
    revisions: list[dict[str, Any]], current: list[str]
) -> tuple[list[str], list[str]]:
    """Return (revisions of a bundle not yet applied, current heads the bundle lacks)."""
    by_id = {r["id"]: r for r in revisions}
    labels = {label: r["id"] for r in revisions for label in r["branch_labels"]}
    applied: set[str] = set()
    stack = [c for c in current if c in by_id]
    while stack:
        rev = stack.pop()
        if rev in applied:
            continue
        applied.add(rev)
        r = by_id[rev]
        stack.extend(r["down_revisions"])
        stack.extend(labels.get(d, d) for d in r["depends_on"])
    unknown = [c for c in current if c not in by_id]
    pending = [r["id"] for r in revisions if r["id"] not in applied]
    return pending, unknown


def serialize_database(db: Database, project: Project) -> dict[str, Any]:
    """The stored fields of a database (no live state)."""
    return {
        "name": db.name,
        "project": project.name,
        "dialect": db.dialect,
        "url": db.url_masked,
        "tags": db.tags,
        "created_at": iso(db.created_at),
    }


@dataclasses.dataclass(frozen=True)
class DatabaseView:
    """What showing a database live needs from the state database, read in one transaction."""

    stored: dict[str, Any]
    url_encrypted: str
    settings: dict[str, Any]
    head: list[str]
    bundle: str | None
    revisions: list[dict[str, Any]] | None
    lock: dict[str, Any]
    runtime: dict[str, Any] | None = None
    # What stops jobs now, as far as the state database knows (see blocked_by).
    blocked_by: tuple[dict[str, Any], ...] = ()


def view_database(session: Session, name: str, who: Principal | None) -> DatabaseView:
    """Read a database, its project's latest bundle and its lease (state only, no target)."""
    db = get_database(session, name, who)
    project = session.get_one(Project, db.project_id)
    bundle = latest_bundle(session, project)
    lease = session.get(Lease, db.id)
    runtime = session.scalar(
        select(Job.runtime)
        .where(Job.database_id == db.id, Job.started_at.is_not(None), Job.runtime.is_not(None))
        .order_by(Job.id.desc())
        .limit(1)
    )
    blocked = blocked_by(session, db, project, bundle)
    return DatabaseView(
        stored={**serialize_database(db, project), "blocked_by": blocked},
        url_encrypted=db.url_encrypted,
        settings=dict(project.settings),
        head=list(bundle.heads) if bundle else [],
        bundle=bundle.digest if bundle else None,
        revisions=list(bundle.revisions) if bundle else None,
        lock={
            "fencing_token": lease.token if lease else 0,
            "held_by_job": lease.holder_job_id if lease else None,
        },
        runtime=runtime,
        blocked_by=tuple(blocked),
    )


def blocked_by(
    session: Session, db: Database, project: Project, bundle: Bundle | None
) -> list[dict[str, Any]]:
    """What stops jobs on a database now, from the state database alone.

    `revision_changed`: an applied revision's recorded sha256 differs from the
    latest bundle's file (a job with that bundle fails so; see repair_database).
    `drifted`: the newest drift check found differences.
    """
    blocks: list[dict[str, Any]] = []
    if bundle is not None:
        shas = {r["id"]: r["sha256"] for r in bundle.revisions}
        applied = session.execute(
            select(AppliedRevision.revision, AppliedRevision.sha256)
            .where(AppliedRevision.database_id == db.id)
            .order_by(AppliedRevision.revision)
        )
        for rev, sha in applied:
            if rev in shas and sha and shas[rev] != sha:
                blocks.append(
                    {
                        "code": "revision_changed",
                        "message": f"revision {rev} was applied from another file (sha256 "
                        f"{sha[:12]}) than the latest bundle carries ({shas[rev][:12]}): add a "
                        "new revision instead, or accept the bundle's file "
                        f"(POST /v1/databases/{db.name}/repair)",
                        "revision": rev,
                    }
                )
    if db.drifted:
        refuse = ((project.settings or {}).get("drift") or {}).get("refuse_when_drifted")
        blocks.append(
            {
                "code": "drifted",
                "message": "the newest drift check found the schema differs from what the "
                "bundle builds at its revision; "
                + (
                    "upgrades wait for approval (settings.drift.refuse_when_drifted)"
                    if refuse
                    else "upgrades still run (settings.drift.refuse_when_drifted is off)"
                ),
                "drift_checked_at": iso(db.drift_checked_at),
            }
        )
    return blocks


def show_live(view: DatabaseView, box: SecretBox, timeout_s: int) -> dict[str, Any]:
    """Add the target's current heads and what is pending to a view read earlier."""
    current, error = read_live_heads(view.url_encrypted, view.settings, box, timeout_s)
    out = {**view.stored, "current": current, "current_error": error}
    out["head"] = view.head
    out["bundle"] = view.bundle
    if view.revisions is not None and current is not None:
        out["pending"], out["unknown_current"] = pending_revisions(view.revisions, current)
    else:
        out["pending"] = None
        out["unknown_current"] = []
    out["lock"] = view.lock
    out["runtime"] = view.runtime
    unknown = [
        {
            "code": "unknown_current_revision",
            "message": f"the database is at {rev}, which the latest bundle does not contain: "
            "push or promote a bundle that includes it",
            "revision": rev,
        }
        for rev in out["unknown_current"]
    ]
    out["blocked_by"] = [*unknown, *view.blocked_by]
    return out


def unlock_database(session: Session, name: str, actor: str, who: Principal | None) -> dict:
    """Free a lease whose holder stopped renewing it, failing the job that held it.

    Refused while the holder is alive (its heartbeat keeps the lease fresh): a
    live migration is never cut off this way. The sweeper does the same on its
    own (it runs the job again instead); this is for a human when it is not running.
    """
    from service.db import epoch_now
    from service.locks import ops as leases

    db = get_database(session, name, who)
    project = session.get(Project, db.project_id)
    lease = session.execute(
        select(Lease).where(Lease.database_id == db.id).with_for_update()
    ).scalar_one_or_none()
    if lease is None or lease.holder_job_id is None:
        raise ConflictError(
            f"database {name} is not locked: no job holds its lease",
            {"database": name},
            code="not_locked",
        )
    now = float(session.scalar(select(epoch_now(session.bind.dialect.name))))
    holder = {"job": lease.holder_job_id, "worker": lease.holder, "fencing_token": lease.token}
    if lease.expires_at is not None and lease.expires_at >= now:
        raise ConflictError(
            f"job {lease.holder_job_id} holds the lease on {name} and its worker "
            f"({lease.holder}) is alive: it renewed the lease, which expires in "
            f"{lease.expires_at - now:.0f} s. Cancel or wait for the job instead",
            {**holder, "expires_in_s": round(lease.expires_at - now, 1)},
            code="lease_held",
        )
    expired_s = round(now - lease.expires_at, 1) if lease.expires_at is not None else None
    leases.release(session, db.id, lease.token)  # the lease object now shows no holder
    job = session.get(Job, holder["job"])
    failed = session.execute(
        update(Job)
        .where(Job.id == holder["job"], Job.state.in_(STARTED_STATES))
        .values(
            state=JobState.FAILED,
            finished_at=utcnow(),
            claim_expires_at=None,
            error={
                "code": "unlocked",
                "message": f"{actor} released this job's lease {expired_s} s after it expired "
                "(its worker was gone); check the database's current heads before retrying",
                "revision": None,
                "statement": None,
            },
        )
    ).rowcount

    def audit(event: str, data: dict) -> None:
        record_event(
            session,
            event,
            actor=actor,
            project=project.name,
            database=db.name,
            job_id=holder["job"],
            fencing_token=holder["fencing_token"],
            data=data,
        )

    audit(AuditAction.LEASE_UNLOCKED, {**holder, "expired_s_ago": expired_s})
    if failed:
        audit(AuditAction.JOB_FAILED, {"code": "unlocked"})
    return {
        "database": name,
        "released": {**holder, "expired_s_ago": expired_s},
        "job_state": JobState.FAILED if failed else (job.state if job else None),
    }
