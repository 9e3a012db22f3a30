from flask import Blueprint

from service.app import actor, parse_json, principal, require, services
from service.db import transaction
from service.openapi import operation
from service.projects.ops import create_project, get_project, list_projects, serialize_project
from service.projects.schemas import ProjectCreate, ProjectOut, ProjectPage

bp = Blueprint("projects", __name__)


@bp.post("/projects")
@operation("Create a project", role="admin", body=ProjectCreate, responses={201: ProjectOut})
def post_project():
    require("admin", everywhere=True)
    body = parse_json(ProjectCreate)
    with transaction(services().sessions) as s:
        project = create_project(s, body, actor())
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
