"""rollout_databases.settle, settle_started_at: databases already at the target settled in batches

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rollout_databases") as batch:
        batch.add_column(sa.Column("settle", sa.String(10), nullable=True))
        batch.add_column(sa.Column("settle_started_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rollout_databases") as batch:
        batch.drop_column("settle_started_at")
        batch.drop_column("settle")
