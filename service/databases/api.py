from flask import Blueprint, request

from service.app import actor, parse_json, principal, require, services
from service.databases.ops import create_database, get_database, list_databases, serialize_database
from service.databases.schemas import DatabaseCreate
from service.db import transaction
from service.projects.models import Project

bp = Blueprint("databases", __name__)


@bp.post("/databases")
def post_database():
    require("admin")
    body = parse_json(DatabaseCreate)
    with transaction(services().sessions) as s:
        db, project = create_database(s, body, services().box, actor(), principal())
        return serialize_database(s, db, project, box=None), 201


@bp.get("/databases")
def index_databases():
    project = request.args.get("project")
    tag = request.args.get("tag")
    with transaction(services().sessions) as s:
        rows = list_databases(s, project, tag, principal())
        return {"databases": [serialize_database(s, d, p, box=None) for d, p in rows]}


@bp.get("/databases/<name>")
def show_database(name: str):
    """Show a database; `?live=false` skips reading its current heads from the target."""
    live = request.args.get("live", "true").lower() not in ("0", "false", "no")
    with transaction(services().sessions) as s:
        db = get_database(s, name, principal())
        project = s.get(Project, db.project_id)
        return serialize_database(s, db, project, box=services().box if live else None)
