from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Job events a project can subscribe to (the audit actions of the same name).
EVENTS = ("job.started", "job.succeeded", "job.failed", "job.cancelled", "job.waiting_for_approval")
Event = Literal[
    "job.started", "job.succeeded", "job.failed", "job.cancelled", "job.waiting_for_approval"
]


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=2000)
    events: list[Event] = Field(min_length=1)
    # Without one, Retort makes one and shows it once, in the creation response.
    secret: str | None = Field(default=None, min_length=16, max_length=200)


class DeliveryList(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(default=50, ge=1, le=500)
    cursor: str | None = None
