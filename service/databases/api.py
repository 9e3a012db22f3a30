from flask import Blueprint

from service.app import actor, parse_json, parse_query, principal, require, services
from service.databases.ops import (
    create_database,
    list_databases,
    serialize_database,
    show_live,
    unlock_database,
    view_database,
)
from service.databases.schemas import (
    DatabaseCreate,
    DatabaseList,
    DatabaseOut,
    DatabasePage,
    DatabaseShow,
    UnlockOut,
)
from service.db import transaction
from service.openapi import operation

bp = Blueprint("databases", __name__)


@bp.post("/databases")
@operation(
    "Register a target database", role="admin", body=DatabaseCreate, responses={201: DatabaseOut}
)
def post_database():
    require("admin")
    body = parse_json(DatabaseCreate)
    with transaction(services().sessions) as s:
        db, project = create_database(
            s, body, services().box, actor(), principal(), services().config
        )
        return serialize_database(db, project), 201


@bp.get("/databases")
@operation("List databases", query=DatabaseList, responses={200: DatabasePage})
def index_databases():
    params = parse_query(DatabaseList)
    with transaction(services().sessions) as s:
        rows = list_databases(s, params.project, params.tag, principal())
        return {"databases": [serialize_database(d, p) for d, p in rows]}


@bp.get("/databases/<name>")
@operation(
    "Show a database with its live current revisions and what is pending",
    query=DatabaseShow,
    responses={200: DatabaseOut},
)
def show_database(name: str):
    """Show a database; `?live=false` skips reading its current heads from the target."""
    live = parse_query(DatabaseShow).live
    with transaction(services().sessions) as s:
        view = view_database(s, name, principal())
    if not live:
        return view.stored
    # The state transaction is over before the target is asked: a target that
    # never answers holds this request only (for at most connect_timeout_s per
    # wait), never a state connection or SQLite's write lock.
    return show_live(view, services().box, services().config.connect_timeout_s)


@bp.post("/databases/<name>/unlock")
@operation(
    "Free the lease of a database whose holder is gone (admin; refused while it is alive)",
    role="admin",
    responses={200: UnlockOut},
)
def unlock(name: str):
    """Release an expired lease and fail the job that held it; 409 while the holder renews it."""
    require("admin")
    with transaction(services().sessions) as s:
        return unlock_database(s, name, actor(), principal())
