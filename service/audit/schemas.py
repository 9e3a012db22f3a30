from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from service.projects.schemas import Out


class AuditList(BaseModel):
    model_config = ConfigDict(extra="forbid")

    database: str | None = None
    project: str | None = None
    job: int | None = Field(default=None, ge=1, lt=2**63)
    limit: int = Field(default=100, ge=1, le=1000)
    cursor: str | None = None


class AuditEventOut(Out):
    seq: int
    ts: str
    actor: str
    action: str
    project: str | None
    database: str | None
    job_id: int | None
    fencing_token: int | None
    data: dict[str, Any]
    prev_hash: str
    hash: str
    mac: str | None = Field(description="<key id>:<HMAC-SHA256 of hash>; none before audit.rekeyed")


class AuditPage(Out):
    events: list[AuditEventOut]
    next_cursor: str | None


class AuditVerifyOut(Out):
    ok: bool
    events: int
    first_bad: int | None
    reason: str | None = None
    checkpoints: int = Field(0, description="signed checkpoints the chain was checked against")
    last_checkpoint: int | None = None
    signatures: str = Field(
        "unchecked", description="checked: with the public key beside the signing key"
    )
