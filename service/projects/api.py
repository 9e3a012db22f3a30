from flask import Blueprint

from service.db import transaction
from service.openapi import operation
from service.projects.ops import (
    create_project,
    get_project,
    list_projects,
    serialize_project,
    update_project,
)
from service.projects.schemas import ProjectCreate, ProjectOut, ProjectPage, ProjectPatch
from service.web import actor, parse_json, principal, require, services

bp = Blueprint("projects", __name__)


@bp.post("/projects")
@operation("Create a project", role="admin", body=ProjectCreate, responses={201: ProjectOut})
def post_project():
    require("admin", everywhere=True)
    body = parse_json(ProjectCreate)
    with transaction(services().sessions) as s:
        project = create_project(s, body, actor(), services().box)
        return serialize_project(project), 201


@bp.get("/projects")
@operation("List projects", responses={200: ProjectPage})
def index_projects():
    with transaction(services().sessions) as s:
        return {"projects": [serialize_project(p) for p in list_projects(s, principal())]}


@bp.get("/projects/<name>")
@operation("Show a project", responses={200: ProjectOut})
def show_project(name: str):
    with transaction(services().sessions) as s:
        return serialize_project(get_project(s, name, principal()))


@bp.patch("/projects/<name>")
@operation(
    "Change a project's settings and secret variables",
    role="deployer",
    body=ProjectPatch,
    responses={200: ProjectOut},
)
def patch_project(name: str):
    """A JSON merge patch (RFC 7386), one level deep: in `settings`, a setting left out
    stays, null restores its default, a value replaces it whole (`env`, `requirements`
    and `naming_convention` too); the merged settings are validated as on creation. In
    `secret_env`, a value sets the variable (stored encrypted, never shown), null
    removes it. A deployer of the project (or an admin) may; a job reads the settings
    when a worker picks it up, so jobs still queued run with the new ones. Audited as
    `project.updated` (setting names and new values; secret variables by name only).
    """
    require("deployer")
    body = parse_json(ProjectPatch)
    with transaction(services().sessions) as s:
        project = update_project(s, name, body, actor(), services().box, principal())
        return serialize_project(project)
