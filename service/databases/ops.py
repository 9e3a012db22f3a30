"""Target databases: registration, encrypted URLs and their live state."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from service import targets
from service.audit.ops import record_event
from service.bundles.models import Bundle
from service.config import Config
from service.crypto import SecretBox
from service.databases.models import Database
from service.databases.schemas import DatabaseCreate
from service.db import iso
from service.errors import ConflictError, NotFoundError
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
        "database.registered",
        actor=actor,
        project=project.name,
        database=db.name,
        data={"url": db.url_masked, "tags": db.tags},
    )
    return db, project


def get_database(session: Session, name: str, who: Principal | None = None) -> Database:
    """Find a database by name; one in a project the principal may not see answers 404."""
    db = session.scalar(select(Database).where(Database.name == name))
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
    query = select(Database, Project).join(Project, Project.id == Database.project_id)
    if who is not None and not who.everywhere:
        query = query.where(Project.name.in_(who.projects))
    if project:
        query = query.where(Project.name == project)
    rows = list(session.execute(query.order_by(Database.name)).tuples())
    if tag:
        key, _, value = tag.partition("=")
        rows = [(d, p) for d, p in rows if key in d.tags and (not value or d.tags[key] == value)]
    return rows


def latest_bundle(session: Session, project: Project) -> Bundle | None:
    return session.scalar(
        select(Bundle).where(Bundle.project_id == project.id).order_by(Bundle.pk.desc()).limit(1)
    )


def read_live_heads(
    url_encrypted: str, settings: dict[str, Any], box: SecretBox, timeout_s: int
) -> tuple[list[str] | None, str | None]:
    """Read the target's current heads; return (heads, None) or (None, why not).

    Every wait is bounded by `timeout_s` (connecting, then the read). Call it
    with no state transaction open: a silent target must hold up nobody else.
    """
    url = targets.normalize_url(box.decrypt(url_encrypted))
    if url.get_backend_name() == "sqlite" and not os.path.exists(url.database):
        return [], None  # not created yet: at base (and a read must not create it)
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


def view_database(session: Session, name: str, who: Principal | None) -> DatabaseView:
    """Read a database, its project's latest bundle and its lease (state only, no target)."""
    db = get_database(session, name, who)
    project = session.get_one(Project, db.project_id)
    bundle = latest_bundle(session, project)
    lease = session.get(Lease, db.id)
    from service.jobs.models import Job  # jobs import databases

    runtime = session.scalar(
        select(Job.runtime)
        .where(Job.database_id == db.id, Job.started_at.is_not(None), Job.runtime.is_not(None))
        .order_by(Job.id.desc())
        .limit(1)
    )
    return DatabaseView(
        stored=serialize_database(db, project),
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
    )


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
    return out


def unlock_database(session: Session, name: str, actor: str, who: Principal | None) -> dict:
    """Free a lease whose holder stopped renewing it, failing the job that held it.

    Refused while the holder is alive (its heartbeat keeps the lease fresh): a
    live migration is never cut off this way. The sweeper does the same on its
    own (it runs the job again instead); this is for a human when it is not running.
    """
    from service.db import epoch_now, utcnow
    from service.jobs.models import Job
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
        .where(Job.id == holder["job"], Job.state.in_(("waiting_for_lock", "running")))
        .values(
            state="failed",
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

    audit("lease.unlocked", {**holder, "expired_s_ago": expired_s})
    if failed:
        audit("job.failed", {"code": "unlocked"})
    return {
        "database": name,
        "released": {**holder, "expired_s_ago": expired_s},
        "job_state": "failed" if failed else (job.state if job else None),
    }
