from flask import Blueprint
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from service.app import parse_query, services
from service.audit.models import AuditEvent
from service.audit.ops import serialize_event, verify_chain
from service.db import transaction
from service.jobs.ops import decode_cursor, encode_cursor

bp = Blueprint("audit", __name__)


class AuditList(BaseModel):
    model_config = ConfigDict(extra="forbid")

    database: str | None = None
    project: str | None = None
    job: int | None = None
    limit: int = Field(default=100, ge=1, le=1000)
    cursor: str | None = None


@bp.get("/audit")
def index_audit():
    params = parse_query(AuditList)
    query = select(AuditEvent)
    if params.database:
        query = query.where(AuditEvent.database == params.database)
    if params.project:
        query = query.where(AuditEvent.project == params.project)
    if params.job:
        query = query.where(AuditEvent.job_id == params.job)
    if params.cursor:
        query = query.where(AuditEvent.seq < decode_cursor(params.cursor))
    with transaction(services().sessions) as s:
        events = list(s.scalars(query.order_by(AuditEvent.seq.desc()).limit(params.limit + 1)))
    more = len(events) > params.limit
    events = events[: params.limit]
    return {
        "events": [serialize_event(e) for e in events],
        "next_cursor": encode_cursor(events[-1].seq) if more else None,
    }


@bp.get("/audit/verify")
def verify_audit():
    with transaction(services().sessions) as s:
        return verify_chain(s)
