"""Projects: one lineage of revision scripts each."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.audit.actions import AuditAction
from service.audit.ops import record_event
from service.crypto import SecretBox
from service.db import iso
from service.errors import ConflictError, InvalidError, NotFoundError, invalid_from
from service.principal import Principal
from service.projects.models import Project
from service.projects.schemas import ProjectCreate, ProjectPatch, ProjectSettings

# As ProjectCreate.secret_env allows.
MAX_SECRET_ENV = 200


def create_project(
    session: Session, body: ProjectCreate, actor: str, box: SecretBox | None = None
) -> Project:
    if session.scalar(select(Project.id).where(Project.name == body.name)) is not None:
        raise ConflictError(f"project {body.name!r} already exists", {"name": body.name})
    if body.secret_env and box is None:
        raise RuntimeError("secret_env needs the secret box to be stored")
    project = Project(
        name=body.name,
        settings=body.settings.model_dump(),
        secret_env={k: box.encrypt(v) for k, v in body.secret_env.items()},
    )
    session.add(project)
    session.flush()
    record_event(
        session,
        AuditAction.PROJECT_CREATED,
        actor=actor,
        project=project.name,
        data={"settings": project.settings, "secret_env_names": sorted(project.secret_env)},
    )
    return project


def get_project(
    session: Session, name: str, who: Principal | None = None, *, for_update: bool = False
) -> Project:
    """Find a project by name; one the principal may not see is as missing as one that is."""
    query = select(Project).where(Project.name == name)
    if for_update:
        query = query.with_for_update()
    project = session.scalar(query)
    if project is None or (who is not None and not who.sees(name)):
        raise NotFoundError(f"no project named {name!r}", {"project": name})
    return project


def update_project(
    session: Session,
    name: str,
    patch: ProjectPatch,
    actor: str,
    box: SecretBox,
    who: Principal | None = None,
) -> Project:
    """Apply a merge patch to a project's settings and secret variables (PATCH /v1/projects/{name}).

    A named setting replaces the old value whole (maps and lists too), null
    restores its default, and the merged settings must be valid ProjectSettings.
    A secret_env value is encrypted and stored, null removes the variable. The
    row is locked, so two patches at once apply one after the other. Jobs read
    their project's settings when a worker claims them (service.jobs.run.claim),
    so a job still queued runs with these. Audited as `project.updated` with the
    settings that changed and their new values, and for secrets the names only.
    """
    project = get_project(session, name, who, for_update=True)
    # As stored, defaults filled in (not re-validated here: the merged result is).
    before = {**ProjectSettings().model_dump(), **(project.settings or {})}
    merged = dict(before)
    if patch.settings is not None:
        for field in patch.settings.model_fields_set:
            value = getattr(patch.settings, field)
            if value is None:
                merged.pop(field, None)  # ProjectSettings fills in the default
            else:
                merged[field] = value
    after = _valid_settings(merged)

    secrets = dict(project.secret_env or {})
    secrets_set, secrets_removed = [], []
    for var, value in (patch.secret_env or {}).items():
        if value is None:
            if secrets.pop(var, None) is not None:
                secrets_removed.append(var)
        else:
            secrets[var] = box.encrypt(value)
            secrets_set.append(var)
    if len(secrets) > MAX_SECRET_ENV:
        raise InvalidError(
            f"secret_env: a project has at most {MAX_SECRET_ENV} secret variables "
            f"(this would make {len(secrets)})",
            {"field": "secret_env", "limit": MAX_SECRET_ENV},
        )

    # New objects, not mutated ones: the JSON columns are saved when reassigned.
    project.settings = after
    project.secret_env = secrets
    session.flush()
    record_event(
        session,
        AuditAction.PROJECT_UPDATED,
        actor=actor,
        project=project.name,
        data={
            "settings": {k: v for k, v in after.items() if before.get(k) != v},
            "secret_env_set": sorted(secrets_set),
            "secret_env_removed": sorted(secrets_removed),
        },
    )
    return project


def _valid_settings(merged: dict[str, Any]) -> dict[str, Any]:
    """The merged settings as ProjectSettings, or a 422 naming the field (`settings.<name>`)."""
    try:
        return ProjectSettings.model_validate(merged).model_dump()
    except ValidationError as exc:
        raise invalid_from(exc, ("settings",)) from None


def list_projects(session: Session, who: Principal | None = None) -> list[Project]:
    query = select(Project)
    if who is not None and not who.everywhere:
        query = query.where(Project.name.in_(who.projects))
    return list(session.scalars(query.order_by(Project.name)))


def serialize_project(project: Project) -> dict[str, Any]:
    return {
        "name": project.name,
        "settings": project.settings,
        "secret_env_names": sorted(project.secret_env or {}),
        "created_at": iso(project.created_at),
    }
