"""jobs.kind/options/result/findings/approval; databases.drift_*: plans, lint, approvals, drift

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-09
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        # "migrate" (applies revisions), "plan" (a dry run: shows the SQL, changes
        # nothing) or "drift" (compares the live schema with the bundle's).
        batch.add_column(sa.Column("kind", sa.String(10), nullable=False, server_default="migrate"))
        # What the request asked besides action and target: plan_mode, allow.
        batch.add_column(sa.Column("options", sa.JSON, nullable=True))
        # A plan's or a drift check's answer.
        batch.add_column(sa.Column("result", sa.JSON, nullable=True))
        # The lint's findings of the job's last look at its database.
        batch.add_column(sa.Column("findings", sa.JSON, nullable=True))
        # Who approved or rejected the job's blocking findings, when, which codes.
        batch.add_column(sa.Column("approval", sa.JSON, nullable=True))
    with op.batch_alter_table("databases") as batch:
        # The newest drift check: when, and whether it found differences.
        batch.add_column(sa.Column("drift_checked_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("drifted", sa.Boolean, nullable=True))
        batch.add_column(sa.Column("drift_job_id", sa.Integer, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("databases") as batch:
        batch.drop_column("drift_job_id")
        batch.drop_column("drifted")
        batch.drop_column("drift_checked_at")
    with op.batch_alter_table("jobs") as batch:
        for column in ("approval", "findings", "result", "options", "kind"):
            batch.drop_column(column)
