"""job recovery: attempts, resolved relative targets, claim heartbeat

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("attempt", sa.Integer(), server_default="1", nullable=False))
        batch.add_column(sa.Column("resolved_target", sa.String(length=200), nullable=True))
        batch.add_column(sa.Column("claim_expires_at", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("claim_expires_at")
        batch.drop_column("resolved_target")
        batch.drop_column("attempt")
