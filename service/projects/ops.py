"""Projects: one lineage of revision scripts each."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.audit.ops import record_event
from service.db import iso
from service.errors import ConflictError, NotFoundError
from service.principal import Principal
from service.projects.models import Project
from service.projects.schemas import ProjectCreate


def create_project(session: Session, body: ProjectCreate, actor: str) -> Project:
    if session.scalar(select(Project.id).where(Project.name == body.name)) is not None:
        raise ConflictError(f"project {body.name!r} already exists", {"name": body.name})
    project = Project(name=body.name, settings=body.settings.model_dump())
    session.add(project)
    session.flush()
    record_event(
        session,
        "project.created",
        actor=actor,
        project=project.name,
        data={"settings": project.settings},
    )
    return project


def get_project(session: Session, name: str, who: Principal | None = None) -> Project:
    """Find a project by name; one the principal may not see is as missing as one that is."""
    project = session.scalar(select(Project).where(Project.name == name))
    if project is None or (who is not None and not who.sees(name)):
        raise NotFoundError(f"no project named {name!r}", {"project": name})
    return project


def list_projects(session: Session, who: Principal | None = None) -> list[Project]:
    query = select(Project)
    if who is not None and not who.everywhere:
        query = query.where(Project.name.in_(who.projects))
    return list(session.scalars(query.order_by(Project.name)))


def serialize_project(project: Project) -> dict[str, Any]:
    return {
        "name": project.name,
        "settings": project.settings,
        "created_at": iso(project.created_at),
    }
