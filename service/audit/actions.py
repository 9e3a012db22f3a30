"""What the audit log records: every event's action (audit_events.action), written once.

A StrEnum: each action is the string stored in the chain (and hashed) and sent
in JSON and webhooks, and compares equal to it. The runner names its own few
events (target.*) without importing this: it imports nothing of the state side.
"""

from __future__ import annotations

from enum import StrEnum


class AuditAction(StrEnum):
    # The chain itself (service.audit.chain).
    AUDIT_REKEYED = "audit.rekeyed"
    AUDIT_CHECKPOINT = "audit.checkpoint"

    PROJECT_CREATED = "project.created"
    PROJECT_UPDATED = "project.updated"
    BUNDLE_UPLOADED = "bundle.uploaded"
    BUNDLE_PROMOTED = "bundle.promoted"
    BUNDLE_CACHE_DISCARDED = "bundle.cache_discarded"
    DATABASE_REGISTERED = "database.registered"
    DATABASE_UPDATED = "database.updated"
    DATABASE_REMOVED = "database.removed"
    DATABASE_REPAIRED = "database.repaired"
    DATABASE_DRIFT_CHECKED = "database.drift_checked"
    DATABASE_DRIFT_DETECTED = "database.drift_detected"
    TOKEN_CREATED = "token.created"
    TOKEN_REVOKED = "token.revoked"
    WEBHOOK_CREATED = "webhook.created"
    WEBHOOK_DELETED = "webhook.deleted"
    SECRETS_ROTATED = "secrets.rotated"
    REQUEST_REFUSED = "request.refused"

    # A job's life (service.jobs, service.jobs.run).
    JOB_REQUESTED = "job.requested"
    JOB_COALESCED = "job.coalesced"
    JOB_CLAIMED = "job.claimed"
    JOB_PARKED = "job.parked"
    JOB_STARTED = "job.started"
    JOB_RESUMED = "job.resumed"
    JOB_RECOVERING = "job.recovering"
    JOB_FINDINGS_ALLOWED = "job.findings_allowed"
    JOB_WAITING_FOR_APPROVAL = "job.waiting_for_approval"
    JOB_APPROVED = "job.approved"
    JOB_REJECTED = "job.rejected"
    JOB_SUCCEEDED = "job.succeeded"
    JOB_FAILED = "job.failed"
    JOB_CANCELLED = "job.cancelled"
    ENVIRONMENT_BUILDING = "environment.building"
    ENVIRONMENT_BUILT = "environment.built"
    LEASE_GRANTED = "lease.granted"
    LEASE_RELEASED = "lease.released"
    LEASE_UNLOCKED = "lease.unlocked"
    STEP_APPLIED = "step.applied"
    STEP_FAILED = "step.failed"
    STEP_RECOVERED = "step.recovered"
    WRITE_FENCED_OUT = "write.fenced_out"
    # What the runner reports of its target (service.jobs.run.migrate names them).
    TARGET_CONNECT_RETRY = "target.connect_retry"
    TARGET_CONNECTION_LOST = "target.connection_lost"
    TARGET_RECONNECTED = "target.reconnected"

    # A rollout's (service.rollouts).
    ROLLOUT_STARTED = "rollout.started"
    ROLLOUT_WAVE_FINISHED = "rollout.wave_finished"
    ROLLOUT_WAITING_FOR_APPROVAL = "rollout.waiting_for_approval"
    ROLLOUT_PAUSED = "rollout.paused"
    ROLLOUT_RESUMED = "rollout.resumed"
    ROLLOUT_RETRIED = "rollout.retried"
    ROLLOUT_HALTED = "rollout.halted"
    ROLLOUT_SUCCEEDED = "rollout.succeeded"
    ROLLOUT_FAILED = "rollout.failed"
    ROLLOUT_ABORTED = "rollout.aborted"
