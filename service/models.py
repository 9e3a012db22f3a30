"""Import every model so Base.metadata is complete (Alembic and tests use this)."""

from service.audit.models import AuditEvent, AuditHead
from service.bundles.models import Bundle, BundleFile
from service.databases.models import AppliedRevision, Database
from service.db import Base
from service.idempotency.models import IdempotencyKey
from service.jobs.models import Job, JobStep
from service.locks.models import Lease
from service.projects.models import Project
from service.rollouts.models import Rollout, RolloutDatabase
from service.tokens.models import ApiToken
from service.webhooks.models import Webhook, WebhookDelivery

__all__ = [
    "ApiToken",
    "AppliedRevision",
    "AuditEvent",
    "AuditHead",
    "Base",
    "Bundle",
    "BundleFile",
    "Database",
    "IdempotencyKey",
    "Job",
    "JobStep",
    "Lease",
    "Project",
    "Rollout",
    "RolloutDatabase",
    "Webhook",
    "WebhookDelivery",
]
