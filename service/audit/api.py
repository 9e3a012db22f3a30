from flask import Blueprint

from service.app import parse_query, principal, require, services
from service.audit.ops import list_events, serialize_event, verify_chain
from service.audit.schemas import AuditList, AuditPage, AuditVerifyOut
from service.db import transaction
from service.jobs.ops import decode_cursor, encode_cursor
from service.openapi import operation

bp = Blueprint("audit", __name__)


@bp.get("/audit")
@operation("List audit events, newest first", query=AuditList, responses={200: AuditPage})
def index_audit():
    params = parse_query(AuditList)
    with transaction(services().sessions) as s:
        events, cursor = list_events(
            s,
            database=params.database,
            project=params.project,
            job=params.job,
            limit=params.limit,
            before=decode_cursor(params.cursor) if params.cursor else None,
            projects=principal().projects,
        )
    return {
        "events": [serialize_event(e) for e in events],
        "next_cursor": encode_cursor(cursor) if cursor else None,
    }


@bp.get("/audit/verify")
@operation("Recompute the hash chain of the whole audit log", responses={200: AuditVerifyOut})
def verify_audit():
    # The chain spans every project: verifying it is for tokens that see them all.
    require("viewer", everywhere=True)
    with transaction(services().sessions) as s:
        return verify_chain(s)
