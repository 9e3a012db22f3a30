from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from service.audit.actions import AuditAction
from service.projects.schemas import Out

# Events a project can subscribe to (the audit actions of the same name).
WEBHOOK_ACTIONS = (
    AuditAction.JOB_STARTED,
    AuditAction.JOB_SUCCEEDED,
    AuditAction.JOB_FAILED,
    AuditAction.JOB_CANCELLED,
    AuditAction.JOB_WAITING_FOR_APPROVAL,
    AuditAction.JOB_APPROVED,
    AuditAction.JOB_REJECTED,
    AuditAction.DATABASE_DRIFT_DETECTED,
    # A rollout's (docs/rollouts.md): the payload carries the rollout, not a job.
    AuditAction.ROLLOUT_STARTED,
    AuditAction.ROLLOUT_WAVE_FINISHED,
    AuditAction.ROLLOUT_HALTED,
    AuditAction.ROLLOUT_SUCCEEDED,
    AuditAction.ROLLOUT_FAILED,
    AuditAction.ROLLOUT_ABORTED,
)
# The same, as the plain strings the API's schema lists.
EVENTS = tuple(action.value for action in WEBHOOK_ACTIONS)
Event = Literal[EVENTS]  # type: ignore[valid-type] - the same names, written once


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=2000, pattern=r"^https?://[^\s/?#@]+[^\s]*$")
    events: list[Event] = Field(min_length=1)
    # Without one, Retort makes one and shows it once, in the creation response.
    secret: str | None = Field(default=None, min_length=16, max_length=200)


class DeliveryList(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(default=50, ge=1, le=500)
    cursor: str | None = None


class WebhookOut(Out):
    id: int
    project: str
    url: str
    events: list[str]
    created_by: str
    created_at: str
    # Only in the answer to its creation.
    secret: str | None = None


class WebhookPage(Out):
    webhooks: list[WebhookOut]


class AttemptOut(Out):
    attempt: int
    at: str
    status_code: int | None
    error: str | None
    duration_ms: float


class DeliveryOut(Out):
    id: int
    uid: str
    event: str
    job: int | None
    state: Literal["pending", "delivered", "failed"]
    attempts: int
    status_code: int | None
    error: str | None
    next_attempt_at: str | None
    created_at: str
    delivered_at: str | None
    attempt_log: list[AttemptOut]


class DeliveryPage(Out):
    deliveries: list[DeliveryOut]
    next_cursor: str | None
