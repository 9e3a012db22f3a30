import json

from flask import Blueprint, Response
from sqlalchemy import select

from service.audit.checkpoints import read_outside_checkpoints, trusted_public_keys
from service.audit.models import AuditCheckpoint, AuditEvent, AuditHead
from service.audit.ops import export_checkpoint, list_events, serialize_event, verify_chain
from service.audit.schemas import AuditList, AuditPage, AuditVerifyOut
from service.db import transaction
from service.jobs.ops import decode_cursor, encode_cursor
from service.openapi import operation
from service.web import parse_query, principal, require, services

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
    config = services().config
    public_keys = trusted_public_keys(config.audit_signing_key_path)
    outside = read_outside_checkpoints(config.data_dir)
    with transaction(services().sessions) as s:
        result = verify_chain(s, public_keys=public_keys, outside_checkpoints=outside)
    result["signatures"] = "checked" if public_keys is not None else "unchecked"
    return result


EXPORT_BATCH = 2000


@bp.get("/audit/export")
@operation(
    "The whole audit log and its signed checkpoints, as JSON lines",
    responses={200: "application/jsonl"},
)
def export_audit():
    """Events in order, then checkpoints: `retort audit verify --file` checks them offline."""
    require("viewer", everywhere=True)
    sessions = services().sessions
    with transaction(sessions) as s:
        head = s.get(AuditHead, 1)
        end = head.seq if head is not None else 0

    def lines():
        last = 0
        while last < end:
            with transaction(sessions) as s:
                events = s.scalars(
                    select(AuditEvent)
                    .where(AuditEvent.seq > last, AuditEvent.seq <= end)
                    .order_by(AuditEvent.seq)
                    .limit(EXPORT_BATCH)
                ).all()
            if not events:
                break
            for event in events:
                yield json.dumps({"type": "event", **serialize_event(event)}) + "\n"
            last = events[-1].seq
        with transaction(sessions) as s:
            cps = s.scalars(
                select(AuditCheckpoint)
                .where(AuditCheckpoint.seq <= end)
                .order_by(AuditCheckpoint.seq)
            ).all()
        for cp in cps:
            yield json.dumps(export_checkpoint(cp)) + "\n"

    return Response(lines(), mimetype="application/jsonl")
