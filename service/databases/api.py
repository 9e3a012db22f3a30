from flask import Blueprint

from service.databases.ops import (
    create_database,
    list_databases,
    remove_database,
    repair_database,
    serialize_database,
    show_live,
    unlock_database,
    update_database,
    view_database,
)
from service.databases.schemas import (
    DatabaseCreate,
    DatabaseList,
    DatabaseOut,
    DatabasePage,
    DatabasePatch,
    DatabaseShow,
    RepairCreate,
    RepairOut,
    UnlockOut,
)
from service.db import transaction
from service.openapi import operation
from service.web import actor, parse_json, parse_query, principal, require, services

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
    """Show a database; `?live=false` skips reading its current heads from the target.

    `blocked_by` lists what stops jobs on it now: `revision_changed` (an applied
    revision's file differs from the latest bundle's; see `…/repair`), `drifted` (the
    newest drift check found differences) and, read live, `unknown_current_revision`."""
    live = parse_query(DatabaseShow).live
    with transaction(services().sessions) as s:
        view = view_database(s, name, principal())
    if not live:
        return view.stored
    # The state transaction is over before the target is asked: a target that
    # never answers holds this request only (for at most connect_timeout_s per
    # wait), never a state connection or SQLite's write lock.
    return show_live(view, services().box, services().config.connect_timeout_s)


@bp.patch("/databases/<name>")
@operation(
    "Change a database's URL or tags (admin; refused while a job is active)",
    role="admin",
    body=DatabasePatch,
    responses={200: DatabaseOut},
)
def patch_database(name: str):
    """A new `url` is validated as on registration (422 naming the field), stored encrypted
    and shown masked; another dialect only while no job ever ran on the database (else 422
    `dialect_change`). `tags` replace the old ones whole. 409 `database_busy` while a job is
    queued, waiting or running. Audited as `database.updated` (masked URLs, tags)."""
    require("admin")
    body = parse_json(DatabasePatch)
    with transaction(services().sessions) as s:
        db, project = update_database(
            s, name, body, services().box, actor(), principal(), services().config
        )
        return serialize_database(db, project)


@bp.delete("/databases/<name>")
@operation(
    "Remove a database's registration (admin; refused while a job is active)",
    role="admin",
    responses={204: None},
)
def delete_database(name: str):
    """The name is free again at once; the jobs that ran on it stay readable (their
    `database` shows as `name~id`). 409 `database_busy` while a job is queued, waiting or
    running. Audited as `database.removed`."""
    require("admin")
    with transaction(services().sessions) as s:
        remove_database(s, name, services().box, actor(), principal())
    return "", 204


@bp.post("/databases/<name>/repair")
@operation(
    "Accept the latest bundle's file for an applied revision whose file changed (admin)",
    role="admin",
    body=RepairCreate,
    responses={200: RepairOut},
)
def repair(name: str):
    """The way out of `revision_changed` when the change is harmless: the revision's
    recorded sha256 becomes the latest bundle's. 422 `revision_not_applied`,
    `revision_not_in_bundle`; 409 `nothing_to_repair` when they already match. Audited as
    `database.repaired` with `old_sha256` and `new_sha256`."""
    require("admin")
    body = parse_json(RepairCreate)
    with transaction(services().sessions) as s:
        return repair_database(s, name, body, actor(), principal())


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
